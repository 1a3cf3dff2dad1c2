"""Connect sessions: short-lived grants that let a browser manage one group's integrations.

The host platform's backend asks for one (``POST /connect-sessions`` with a service token)
and hands the token to its frontend, which gives it to the connect page by ``postMessage``,
or sends the ``connect_url`` link (the token in its fragment). A session can list, connect
and disconnect its group's integrations (optionally an allow-list of them) and nothing else:
never read a credential, never touch another group. It travels only as a bearer token,
never as a query parameter. Only the token's SHA-256 is stored. ``display_name`` is the
workspace's name as the host platform gave it: the connect page shows it, and asks before
connecting anything when it got the session from a link.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from .oauth.flows import hash_secret
from .store.models import ConnectSession

__all__ = [
    "SESSION_PREFIX",
    "SessionGrant",
    "create_session",
    "find_session",
    "find_session_by_hash",
    "prune_sessions",
]

SESSION_PREFIX = "bcs_"
DEFAULT_TTL = timedelta(minutes=30)


@dataclass(frozen=True)
class SessionGrant:
    token_hash: str
    group_id: str
    integrations: list[str] | None
    expires_at: datetime
    display_name: str | None = None

    def allows(self, integration: str) -> bool:
        return self.integrations is None or integration in self.integrations


async def create_session(
    db: AsyncSession,
    *,
    group_id: str,
    integrations: list[str] | None,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
    display_name: str | None = None,
) -> tuple[str, SessionGrant]:
    """A new session; returns ``(token, grant)``. The token is not stored anywhere."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    grant = SessionGrant(hash_secret(token), group_id, integrations, now + ttl, display_name)
    db.add(
        ConnectSession(
            token_hash=grant.token_hash,
            group_id=group_id,
            integrations=integrations,
            display_name=display_name,
            created_at=now,
            expires_at=grant.expires_at,
        )
    )
    # The sweep prunes expired sessions; a few more go on the way (a broker serving with
    # --no-refresh may be far from a sweeping one).
    await prune_sessions(db, now=now, limit=20)
    return token, grant


async def find_session(db: AsyncSession, token: str) -> SessionGrant | None:
    """The session for ``token`` whether or not it has expired; None when unknown."""
    return await find_session_by_hash(db, hash_secret(token))


async def find_session_by_hash(db: AsyncSession, token_hash: str) -> SessionGrant | None:
    """The session whose token hashes to ``token_hash`` (expired or not); None if none."""
    row = await db.scalar(select(ConnectSession).where(ConnectSession.token_hash == token_hash))
    if row is None:
        return None
    return SessionGrant(
        row.token_hash, row.group_id, row.integrations, row.expires_at, row.display_name
    )


async def prune_sessions(db: AsyncSession, *, now: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` sessions that expired before ``now``; return how many."""
    expired = (
        select(ConnectSession.token_hash)
        .where(ConnectSession.expires_at < now)
        .order_by(ConnectSession.expires_at)
        .limit(limit)
    )
    result = await db.execute(
        delete(ConnectSession)
        .where(ConnectSession.token_hash.in_(expired.scalar_subquery()))
        .returning(ConnectSession.token_hash)
    )
    return len(result.all())
