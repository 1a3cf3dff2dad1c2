"""Authorization-code flows in progress: state, PKCE verifier, single use.

A flow is bound to the browser that started it by a random nonce in an HttpOnly cookie
(only its hash is stored), so a state finished in another browser is refused.

``state`` is 32 random bytes (url-safe base64). Only its SHA-256 is stored, so a database
reader cannot finish someone's flow. The PKCE verifier and the per-connection settings are
sealed (Fernet) in the row. The callback consumes the row with one ``DELETE ... RETURNING``:
of two callbacks racing with one state, exactly one gets the flow.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from ..crypto import Keyring
from ..store.models import OAuthFlow

__all__ = ["FLOW_TTL", "Flow", "consume_flow", "hash_secret", "new_state", "start_flow"]

FLOW_TTL = timedelta(minutes=10)
_FLOW_SCOPE = "oauth-flow"


def new_state() -> str:
    return secrets.token_urlsafe(32)


def new_verifier() -> str:
    # RFC 7636: 43-128 characters from the unreserved set; 64 random bytes -> 86 characters.
    return secrets.token_urlsafe(64)


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class Flow:
    group_id: str
    integration: str
    session_hash: str | None
    verifier: str | None
    settings: dict[str, str]
    return_to: str | None
    browser_hash: str | None
    issuer: str | None
    expires_at: datetime


async def start_flow(
    db: AsyncSession,
    keyring: Keyring,
    *,
    group_id: str,
    integration: str,
    session_hash: str | None,
    verifier: str | None,
    settings: dict[str, str],
    return_to: str | None,
    browser_hash: str,
    issuer: str | None,
    now: datetime,
) -> str:
    """Record a new flow; return its ``state`` (the only copy of it)."""
    state = new_state()
    sealed = keyring.seal(
        _FLOW_SCOPE,
        hash_secret(state),
        {
            "verifier": verifier,
            "settings": settings,
            "return_to": return_to,
            "browser": browser_hash,
        },
    )
    db.add(
        OAuthFlow(
            state_hash=hash_secret(state),
            group_id=group_id,
            integration=integration,
            session_hash=session_hash,
            sealed=sealed.token,
            issuer=issuer,
            created_at=now,
            expires_at=now + FLOW_TTL,
        )
    )
    # Flows abandoned long ago are of no use: prune a few on the way.
    await db.execute(delete(OAuthFlow).where(OAuthFlow.expires_at < now - timedelta(days=1)))
    await db.flush()
    return state


async def consume_flow(db: AsyncSession, keyring: Keyring, state: str) -> Flow | None:
    """Delete and return the flow for ``state``; None when there is none (forged, used).

    Expired flows are returned too (with their ``expires_at``): the caller rejects them,
    and they are consumed either way.
    """
    state_hash = hash_secret(state)
    row = (
        await db.execute(
            delete(OAuthFlow)
            .where(OAuthFlow.state_hash == state_hash)
            .returning(
                OAuthFlow.group_id,
                OAuthFlow.integration,
                OAuthFlow.session_hash,
                OAuthFlow.sealed,
                OAuthFlow.issuer,
                OAuthFlow.expires_at,
            )
        )
    ).first()
    if row is None:
        return None
    group_id, integration, session_hash, sealed, issuer, expires_at = row
    data: dict[str, Any] = keyring.open(_FLOW_SCOPE, state_hash, sealed)
    return Flow(
        group_id=group_id,
        integration=integration,
        session_hash=session_hash,
        verifier=data.get("verifier"),
        settings=dict(data.get("settings") or {}),
        return_to=data.get("return_to"),
        browser_hash=data.get("browser"),
        issuer=issuer,
        expires_at=expires_at,
    )
