"""Webhooks: delivering events to the configured URLs, signed, each at most once at a time.

``events.record`` writes one outbox row per configured webhook in the transaction of the
event; the sweep calls ``deliver_due``, which sends them with retries (capped exponential
backoff, jitter) until delivered or given up after ``MAX_ATTEMPTS``. A delivery for a URL
no longer configured is given up (so its event can be pruned).

Each POST carries ``Broker-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>``; a receiver recomputes it with ``verify_signature`` and rejects old
timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select, update

from .events import event_dict
from .logs import fields, redact_url
from .store.models import Event, WebhookDelivery

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = [
    "CLAIM_MARGIN",
    "DELIVERY_TIMEOUT",
    "MAX_ATTEMPTS",
    "SIGNATURE_HEADER",
    "claim_covers",
    "deliver_due",
    "delivery_backoff",
    "sign",
    "verify_signature",
]

log = logging.getLogger("broker.webhooks")

MAX_ATTEMPTS = 8
DELIVERY_TIMEOUT = 10.0
"""Seconds one delivery attempt may take, all of it (not per read)."""
CLAIM_MARGIN = 5.0
"""Seconds a delivery's claim outlasts its attempt by."""
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
    # No webhook configured at all: deliveries left from when one was are still claimed
    # (and given up, below), or their events would be kept for them forever.
    hooks = {h.url: h.secret.get_secret_value() for h in broker.settings.webhooks}
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
    # Built only when something is to be sent (not for deliveries merely given up).
    needed = any(url in hooks for _, _, url, _ in claimed)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        ) if needed else None
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
                assert http is not None  # a configured URL: the client was built
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
            outcome = "delivered" if error is None else (
                "failed" if attempts >= MAX_ATTEMPTS or secret is None else "retry")
            broker.metrics.webhook_deliveries.labels(outcome).inc()
            if error is None:
                delivered += 1
                values = {"status": "delivered", "next_attempt_at": None, "last_error": None}
            elif attempts >= MAX_ATTEMPTS or secret is None:
                log.error(
                    "webhook delivery %s to %s given up: %s", delivery_id, redact_url(url), error,
                    extra=fields(event="webhook", outcome="failed"),
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

