"""Connect sessions: short-lived grants that let a browser manage one group's integrations.

The host platform's backend asks for one (``POST /connect-sessions`` with a service token)
and hands the token to its frontend. A session can list, connect and disconnect its group's
integrations (optionally an allow-list of them) and nothing else: never read a credential,
never touch another group. Only the token's SHA-256 is stored.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from .oauth.flows import hash_secret
from .store.models import ConnectSession

__all__ = ["SESSION_PREFIX", "SessionGrant", "create_session", "find_session"]

SESSION_PREFIX = "bcs_"
DEFAULT_TTL = timedelta(minutes=30)


@dataclass(frozen=True)
class SessionGrant:
    token_hash: str
    group_id: str
    integrations: list[str] | None
    expires_at: datetime

    def allows(self, integration: str) -> bool:
        return self.integrations is None or integration in self.integrations


async def create_session(
    db: AsyncSession,
    *,
    group_id: str,
    integrations: list[str] | None,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
) -> tuple[str, SessionGrant]:
    """A new session; returns ``(token, grant)``. The token is not stored anywhere."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    grant = SessionGrant(hash_secret(token), group_id, integrations, now + ttl)
    db.add(
        ConnectSession(
            token_hash=grant.token_hash,
            group_id=group_id,
            integrations=integrations,
            created_at=now,
            expires_at=grant.expires_at,
        )
    )
    # Expired sessions are of no use to anyone: prune a few on the way.
    await db.execute(delete(ConnectSession).where(ConnectSession.expires_at < now))
    return token, grant


async def find_session(db: AsyncSession, token: str) -> SessionGrant | None:
    """The session for ``token`` whether or not it has expired; None when unknown."""
    row = await db.scalar(
        select(ConnectSession).where(ConnectSession.token_hash == hash_secret(token))
    )
    if row is None:
        return None
    return SessionGrant(row.token_hash, row.group_id, row.integrations, row.expires_at)
