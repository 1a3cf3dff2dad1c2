"""The operator's way into ``/admin``: one-time links and the sessions they open.

``broker admin-link`` stores the SHA-256 of a fresh link token (``bal_…``, valid
``LINK_TTL``) and prints the URL ``{public_url}/admin/enter#<token>``: the token is in the
fragment, which no browser sends to a server, puts in a Referer or leaves in an access log.
The page at that URL posts it once (``redeem_link``): the link is marked used in the same
statement that checks it (a second use, or one after its five minutes, is refused), and a
session token (``bas_…``, ``SESSION_TTL``) is returned, to be set as an HttpOnly,
SameSite=Strict cookie. Only hashes are stored. The page is read-only: a session can look,
never act.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .oauth.flows import hash_secret
from .store.models import AdminGrant

__all__ = [
    "LINK_PREFIX",
    "LINK_TTL",
    "SESSION_PREFIX",
    "SESSION_TTL",
    "create_link",
    "prune_admin_grants",
    "redeem_link",
    "session_ends",
]

LINK_PREFIX = "bal_"
SESSION_PREFIX = "bas_"
LINK_TTL = timedelta(minutes=5)
SESSION_TTL = timedelta(hours=1)


async def create_link(db: AsyncSession, *, now: datetime) -> str:
    """A new one-time link token (stored hashed; not stored anywhere itself)."""
    token = LINK_PREFIX + secrets.token_urlsafe(32)
    db.add(AdminGrant(token_hash=hash_secret(token), kind="link", created_at=now,
                      expires_at=now + LINK_TTL))
    return token


async def redeem_link(db: AsyncSession, token: str, *, now: datetime) -> str | None:
    """Use a link once: a new session token, or None when the link is unknown, used or
    expired (which one is not said: the caller's answer is the same for all three)."""
    if not token.startswith(LINK_PREFIX):
        return None
    used = await db.execute(
        update(AdminGrant)
        .where(AdminGrant.token_hash == hash_secret(token), AdminGrant.kind == "link",
               AdminGrant.used_at.is_(None), AdminGrant.expires_at > now)
        .values(used_at=now)
    )
    if getattr(used, "rowcount", 0) != 1:
        return None
    session = SESSION_PREFIX + secrets.token_urlsafe(32)
    db.add(AdminGrant(token_hash=hash_secret(session), kind="session", created_at=now,
                      expires_at=now + SESSION_TTL))
    return session


async def session_ends(db: AsyncSession, token: str, *, now: datetime) -> datetime | None:
    """When the session ``token`` ends, or None when it is unknown or has ended."""
    if not token.startswith(SESSION_PREFIX):
        return None
    found = await db.scalar(
        select(AdminGrant.expires_at).where(
            AdminGrant.token_hash == hash_secret(token), AdminGrant.kind == "session"
        )
    )
    return found if found is not None and found > now else None


async def prune_admin_grants(db: AsyncSession, *, now: datetime) -> int:
    """Delete links and sessions past their expiry; how many."""
    result = await db.execute(delete(AdminGrant).where(AdminGrant.expires_at <= now))
    return int(getattr(result, "rowcount", 0) or 0)
