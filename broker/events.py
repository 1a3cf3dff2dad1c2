"""Events: what happened to each connection, kept in the ``events`` table and optionally
POSTed to configured webhooks.

Recorded in the same transaction as the change they describe, so none is lost. Webhook
deliveries are outbox rows written in that transaction too, and sent by the scheduler with
retries (capped exponential backoff) until delivered or given up after ``MAX_ATTEMPTS``.

Each POST carries ``Broker-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``;
a receiver recomputes it with ``verify_signature`` and rejects old timestamps.
No event holds a secret: kinds, names, statuses and error codes only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .logs import redact_url
from .store.models import Event, WebhookDelivery, events_table, webhook_deliveries_table

if TYPE_CHECKING:
    from .config import WebhookSettings
    from .runtime import Broker

__all__ = [
    "KINDS",
    "Recorded",
    "deliver_due",
    "list_events",
    "record",
    "record_many",
    "sign",
    "verify_signature",
]

log = logging.getLogger("broker.events")

KINDS = (
    "connected",
    "refreshed",
    "refresh_failed",
    "reauth_required",
    "recovered",
    "disconnected",
    "corrupt",
)
MAX_ATTEMPTS = 8
DELIVERY_TIMEOUT = 10.0
"""Seconds one delivery attempt may take, all of it (not per read)."""
CLAIM_MARGIN = 5.0
"""Seconds a delivery's claim outlasts its attempt by."""
# Built once, parameters bound per call: no statement built, no cache key computed and no
# ORM bulk-insert machinery per event (events are written on every refresh).
_INSERT_EVENT = insert(events_table)
SIGNATURE_HEADER = "Broker-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, *, now: int, tolerance: int = 300
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance`` s."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def delivery_backoff(attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before the next delivery attempt: 2^n, capped at 1 hour, with jitter."""
    base = min(3600.0, 2.0 ** max(attempts, 0))
    return base * (rng or random).uniform(0.5, 1.0)


async def record(
    db: AsyncSession,
    *,
    group_id: str,
    integration: str,
    kind: str,
    now: datetime,
    webhooks: Sequence[WebhookSettings] = (),
    **detail: Any,
) -> None:
    """Add an event (and its webhook deliveries) to the caller's transaction."""
    assert kind in KINDS, kind
    # Core INSERTs, not ``db.add``: no unit-of-work flush on the refresh path.
    values = {
        "group_id": group_id, "integration": integration, "kind": kind, "detail": detail,
        "created_at": now,
    }
    # Read by the session's after_commit hook: the credential cache drops these keys.
    db.info.setdefault("broker.changed", set()).add((group_id, integration))
    if not webhooks:
        await db.execute(_INSERT_EVENT, values)
        return
    event_id = (await db.execute(_INSERT_EVENT.returning(events_table.c.id), values)).scalar_one()
    await db.execute(
        insert(webhook_deliveries_table),
        [
            {"event_id": event_id, "url": hook.url, "attempts": 0, "next_attempt_at": now,
             "status": "pending"}
            for hook in webhooks
        ],
    )


@dataclass(frozen=True)
class Recorded:
    """One event for ``record_many``."""

    group_id: str
    integration: str
    kind: str
    now: datetime
    detail: dict[str, Any]


async def record_many(
    db: AsyncSession, events: Sequence[Recorded], webhooks: Sequence[WebhookSettings] = ()
) -> None:
    """``record`` for several events: one INSERT for all of them when no webhook is set."""
    if webhooks or len(events) < 2:
        for e in events:
            await record(
                db, group_id=e.group_id, integration=e.integration, kind=e.kind, now=e.now,
                webhooks=webhooks, **e.detail,
            )
        return
    changed = db.info.setdefault("broker.changed", set())
    rows = []
    for e in events:
        assert e.kind in KINDS, e.kind
        changed.add((e.group_id, e.integration))
        rows.append({
            "group_id": e.group_id, "integration": e.integration, "kind": e.kind,
            "detail": e.detail, "created_at": e.now,
        })
    await db.execute(_INSERT_EVENT, rows)


def event_dict(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "group_id": event.group_id,
        "integration": event.integration,
        "kind": event.kind,
        "detail": event.detail,
        "created_at": event.created_at.isoformat(),
    }


async def list_events(
    db: AsyncSession, group_id: str, *, limit: int = 100, before: int | None = None
) -> list[dict[str, Any]]:
    """A group's events, newest first."""
    query = select(Event).where(Event.group_id == group_id)
    if before is not None:
        query = query.where(Event.id < before)
    rows = await db.scalars(query.order_by(Event.id.desc()).limit(limit))
    return [event_dict(e) for e in rows]


def claim_covers(held_until: datetime, now: datetime, *, timeout: float, margin: float) -> bool:
    """Whether a claim held until ``held_until`` outlasts an attempt starting ``now`` (at most
    ``timeout`` seconds) with half the ``margin`` to spare for recording its outcome."""
    return (held_until - now).total_seconds() >= timeout + margin / 2


async def deliver_due(
    broker: Broker,
    *,
    limit: int = 20,
    attempt_timeout: float = DELIVERY_TIMEOUT,
    claim_margin: float = CLAIM_MARGIN,
) -> int:
    """Send the webhook deliveries that are due, one after another; return how many
    succeeded.

    A delivery is claimed by pushing its ``next_attempt_at`` out, so no other replica finds
    it due; the time it is pushed to identifies the claim (each claim pushes it past the
    last one's). An attempt takes at most ``attempt_timeout`` seconds as a whole
    (connecting, sending and reading the answer: a receiver trickling its answer is cut
    off), and starts only under a claim that outlasts it by ``claim_margin / 2`` at least:
    the batch is claimed for ``attempt_timeout + claim_margin``, and a delivery whose turn
    comes later has its claim renewed first. A claim lost meanwhile (it ran out, and
    another replica claimed the delivery) means the delivery is skipped here. So a delivery
    is never sent twice while an attempt at it is running. The outcome is recorded only
    under the claim too. A timed-out attempt may still have reached the receiver: it is
    retried later, like any failed one (receivers dedupe by event id).
    """
    hooks = {h.url: h.secret.get_secret_value() for h in broker.settings.webhooks}
    if not hooks:
        return 0
    timeout, margin = attempt_timeout, claim_margin
    claim = timedelta(seconds=timeout + margin)
    now = broker.now()
    held_until = now + claim
    async with broker.session() as db, db.begin():
        # Claim: push the due rows' next attempt out, so another replica skips them.
        due = select(WebhookDelivery.id).where(WebhookDelivery.next_attempt_at <= now)
        due = due.order_by(WebhookDelivery.next_attempt_at).limit(limit)
        if not broker.database.is_sqlite:
            due = due.with_for_update(skip_locked=True)
        claimed = (
            await db.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(due.scalar_subquery()))
                .values(next_attempt_at=held_until)
                .returning(WebhookDelivery.id, WebhookDelivery.event_id, WebhookDelivery.url,
                           WebhookDelivery.attempts)
            )
        ).all()
        events = {
            e.id: e
            for e in await db.scalars(
                select(Event).where(Event.id.in_([c.event_id for c in claimed]))
            )
        }
    if not claimed:
        return 0  # and no HTTP client (building its TLS context is the costly part) either
    delivered = 0
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as http:
        for delivery_id, event_id, url, attempts in claimed:
            held = held_until
            if not claim_covers(held, broker.now(), timeout=timeout, margin=margin):
                renewed = await _renew_claim(broker, delivery_id, held, broker.now() + claim)
                if renewed is None:
                    continue  # our claim ran out and another replica has the delivery now
                held = renewed
            secret = hooks.get(url)
            event = events.get(event_id)
            error: str | None = None
            if secret is None or event is None:
                error = "webhook no longer configured"
            else:
                body = json.dumps(event_dict(event), separators=(",", ":")).encode()
                headers = {
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(secret, int(broker.now().timestamp()), body),
                }
                try:
                    async with asyncio.timeout(timeout):
                        response = await http.post(url, content=body, headers=headers)
                    if not response.is_success:
                        error = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    error = type(exc).__name__
                except TimeoutError:
                    error = "timeout"
            attempts += 1
            values: dict[str, Any]
            if error is None:
                delivered += 1
                values = {"status": "delivered", "next_attempt_at": None, "last_error": None}
            elif attempts >= MAX_ATTEMPTS or secret is None:
                log.error(
                    "webhook delivery %s to %s given up: %s", delivery_id, redact_url(url), error
                )
                values = {"status": "failed", "next_attempt_at": None, "last_error": error}
            else:
                retry = broker.now() + timedelta(seconds=delivery_backoff(attempts))
                values = {"next_attempt_at": retry, "last_error": error}
            async with broker.session() as db, db.begin():
                await db.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == delivery_id,
                           WebhookDelivery.next_attempt_at == held)
                    .values(attempts=attempts, **values)
                )
    return delivered


async def _renew_claim(
    broker: Broker, delivery_id: int, held: datetime, until: datetime
) -> datetime | None:
    """Push our claim on a delivery (its ``next_attempt_at`` is still ``held``) out to
    ``until``; None when it is not ours any more."""
    async with broker.session() as db, db.begin():
        result = await db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.next_attempt_at == held)
            .values(next_attempt_at=until)
            .returning(WebhookDelivery.id)
        )
        return until if result.first() is not None else None
