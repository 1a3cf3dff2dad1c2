"""Authorization-code flows in progress: tickets, state, PKCE verifier, single use.

A flow has three steps, each single use:

1. **Ticket** (``create_ticket``): the host platform's backend, or the connect page with
   its connect session, asks to connect an integration and gets a ticket (32 random
   bytes). The flow row is written then, with its ``state`` and PKCE verifier sealed in it;
   only the ticket's hash is stored, and the ticket lives ``TICKET_TTL``.
2. **Start** (``redeem_ticket``): a page of the broker's own (the popup's start page, or the
   connect page itself when popups are blocked) redeems the ticket from the broker's
   origin. That binds the flow to the browser doing it, by a random nonce in an HttpOnly
   cookie (only its hash is stored), and gives ``FLOW_TTL`` to finish. A ticket never
   travels in a URL, so a link cannot start a flow in someone else's browser.
3. **Finish** (``consume_flow``): the callback deletes the row with one
   ``DELETE ... RETURNING``: of two callbacks racing with one state, exactly one gets it.

``state`` and tickets are never stored in the clear, so a database reader can neither
start nor finish someone's flow. Each connect session (or, for tickets made with a
service token, each group) has at most ``MAX_FLOWS_PER_OWNER`` flows in progress: making
another drops its oldest.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..crypto import Keyring
from ..store.models import OAuthFlow

__all__ = [
    "FLOW_TTL",
    "MAX_FLOWS_PER_OWNER",
    "TICKET_PREFIX",
    "TICKET_TTL",
    "Flow",
    "consume_flow",
    "create_ticket",
    "hash_secret",
    "new_state",
    "prune_flows",
    "redeem_ticket",
    "remember",
]

FLOW_TTL = timedelta(minutes=10)
TICKET_TTL = timedelta(minutes=5)
MAX_FLOWS_PER_OWNER = 20
TICKET_PREFIX = "bft_"
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
    """A flow as read back from its row (its sealed part opened)."""

    group_id: str
    integration: str
    session_hash: str | None
    state: str = field(repr=False)
    verifier: str | None = field(repr=False)
    settings: dict[str, str]
    return_to: str | None
    browser_hash: str | None
    issuer: str | None
    expires_at: datetime
    extra: dict[str, str] = field(default_factory=dict, repr=False)
    """What the auth type's ``begin`` kept for its ``complete`` (OAuth 1.0a's temporary
    credentials), sealed with the rest."""


def _owner(group_id: str, session_hash: str | None) -> ColumnElement[bool]:
    """The flows counted together against ``MAX_FLOWS_PER_OWNER``."""
    if session_hash is not None:
        return OAuthFlow.session_hash == session_hash
    return and_(OAuthFlow.group_id == group_id, OAuthFlow.session_hash.is_(None))


async def create_ticket(
    db: AsyncSession,
    keyring: Keyring,
    *,
    group_id: str,
    integration: str,
    session_hash: str | None,
    verifier: str | None,
    settings: dict[str, str],
    return_to: str | None,
    issuer: str | None,
    now: datetime,
) -> tuple[str, datetime]:
    """Record a new flow awaiting its start; return its ticket (the only copy) and when
    the ticket expires."""
    state = new_state()
    ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
    state_hash = hash_secret(state)
    sealed = keyring.seal(
        _FLOW_SCOPE,
        state_hash,
        {"state": state, "verifier": verifier, "settings": settings, "return_to": return_to},
    )
    expires_at = now + TICKET_TTL
    # Make room first: this owner keeps its newest flows, at most the cap with this one.
    oldest = (
        select(OAuthFlow.state_hash)
        .where(_owner(group_id, session_hash))
        .order_by(OAuthFlow.created_at.desc(), OAuthFlow.state_hash)
        .offset(MAX_FLOWS_PER_OWNER - 1)
    )
    await db.execute(
        delete(OAuthFlow).where(OAuthFlow.state_hash.in_(oldest.scalar_subquery()))
    )
    await prune_flows(db, now=now - FLOW_TTL, limit=20)  # the sweep prunes the rest
    db.add(
        OAuthFlow(
            state_hash=state_hash,
            group_id=group_id,
            integration=integration,
            session_hash=session_hash,
            ticket_hash=hash_secret(ticket),
            browser_hash=None,
            sealed=sealed.token,
            issuer=issuer,
            created_at=now,
            expires_at=expires_at,
        )
    )
    await db.flush()
    return ticket, expires_at


async def redeem_ticket(
    db: AsyncSession, keyring: Keyring, ticket: str, *, browser_hash: str, now: datetime
) -> Flow | None:
    """Start the flow of ``ticket``: bind it to the browser and give it ``FLOW_TTL``.

    None when the ticket is unknown, expired or already redeemed. Raises
    ``CredentialCorrupt`` when the row's sealed part does not open.
    """
    row = (
        await db.execute(
            update(OAuthFlow)
            .where(OAuthFlow.ticket_hash == hash_secret(ticket), OAuthFlow.expires_at > now)
            .values(ticket_hash=None, browser_hash=browser_hash, expires_at=now + FLOW_TTL)
            .returning(*_RETURNED)
        )
    ).first()
    return _flow(keyring, row) if row is not None else None


async def remember(
    db: AsyncSession, keyring: Keyring, flow: Flow, extra: dict[str, str]
) -> None:
    """Seal ``extra`` into the started ``flow`` for its callback (``Flow.extra``)."""
    state_hash = hash_secret(flow.state)
    sealed = keyring.seal(_FLOW_SCOPE, state_hash, {
        "state": flow.state, "verifier": flow.verifier, "settings": flow.settings,
        "return_to": flow.return_to, "extra": extra,
    })
    await db.execute(
        update(OAuthFlow).where(OAuthFlow.state_hash == state_hash).values(sealed=sealed.token)
    )


async def consume_flow(db: AsyncSession, keyring: Keyring, state: str) -> Flow | None:
    """Delete and return the started flow for ``state``; None when there is none (forged,
    used, or never started).

    Expired flows are returned too (with their ``expires_at``): the caller rejects them,
    and they are consumed either way. Raises ``CredentialCorrupt`` (after the delete) when
    the row's sealed part does not open.
    """
    row = (
        await db.execute(
            delete(OAuthFlow)
            .where(OAuthFlow.state_hash == hash_secret(state), OAuthFlow.ticket_hash.is_(None))
            .returning(*_RETURNED)
        )
    ).first()
    return _flow(keyring, row) if row is not None else None


async def prune_flows(db: AsyncSession, *, now: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` flows whose ticket or time ran out before ``now``; return how
    many. (Callers pass a time a little in the past, so a callback just too late still
    hears that it was too late rather than that its flow does not exist.)"""
    expired = (
        select(OAuthFlow.state_hash)
        .where(OAuthFlow.expires_at < now)
        .order_by(OAuthFlow.expires_at)
        .limit(limit)
    )
    result = await db.execute(
        delete(OAuthFlow)
        .where(OAuthFlow.state_hash.in_(expired.scalar_subquery()))
        .returning(OAuthFlow.state_hash)
    )
    return len(result.all())


_RETURNED = (
    OAuthFlow.state_hash,
    OAuthFlow.group_id,
    OAuthFlow.integration,
    OAuthFlow.session_hash,
    OAuthFlow.browser_hash,
    OAuthFlow.sealed,
    OAuthFlow.issuer,
    OAuthFlow.expires_at,
)


def _flow(keyring: Keyring, row: Any) -> Flow:
    state_hash, group_id, integration, session_hash, browser_hash, sealed, issuer, expires = row
    data: dict[str, Any] = keyring.open(_FLOW_SCOPE, state_hash, sealed)
    return Flow(
        group_id=group_id,
        integration=integration,
        session_hash=session_hash,
        state=str(data.get("state") or ""),
        verifier=data.get("verifier"),
        settings=dict(data.get("settings") or {}),
        return_to=data.get("return_to"),
        browser_hash=browser_hash,
        issuer=issuer,
        expires_at=expires,
        extra={str(k): str(v) for k, v in (data.get("extra") or {}).items()},
    )
