"""Events: what happened to each connection, kept in the ``events`` table.

Recorded in the same transaction as the change they describe, so none is lost. With
webhooks configured, each event's deliveries are outbox rows written in that transaction
too; ``webhooks`` sends them. No event holds a secret: kinds, names, statuses and error
codes only. (``retention`` deletes old ones.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from .store.models import Event, events_table, webhook_deliveries_table

if TYPE_CHECKING:
    from .config import WebhookSettings

__all__ = ["KINDS", "Recorded", "event_dict", "list_events", "record", "record_many"]

KINDS = (
    "connected",
    "refreshed",
    "refresh_failed",
    "reauth_required",
    "recovered",
    "disconnected",
    "revoked",
    "corrupt",
)
# Built once, parameters bound per call: no statement built, no cache key computed and no
# ORM bulk-insert machinery per event (events are written on every refresh).
_INSERT_EVENT = insert(events_table)


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
