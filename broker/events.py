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

__all__ = [
    "KINDS", "RESCAN_SECONDS", "Cursor", "Recorded", "event_dict", "events_after",
    "list_events", "record", "record_many",
]

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


RESCAN_SECONDS = 10.0
"""How far back (in time) a reader of the feed looks again for ids committed late."""


class Cursor:
    """A reader's place in the events feed (ids in order), missing no late commit.

    On PostgreSQL an id is assigned at insert and becomes visible at commit, so a smaller id
    can appear after a larger one was read. Each read therefore starts at ``floor(now)``:
    the highest id seen ``RESCAN_SECONDS`` ago (``rescan``), or the highest seen at all
    (SQLite, which commits one writer at a time, in id order). ``take`` returns the ids not
    seen before, so an event read twice is handed on once."""

    def __init__(
        self, since: int, *, rescan: bool, floor: int | None = None,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        self.since = since
        self.rescan = rescan
        self.rescan_seconds = rescan_seconds
        self._floor = since if floor is None else floor
        self._marks: list[tuple[float, int]] = []  # (when read, highest id seen by then)
        self._seen: set[int] = set()  # ids seen above the floor

    def floor(self, now: float) -> int:
        """Read ids above this (``now``: a monotonic time)."""
        if not self.rescan:
            return self.since
        while self._marks and now - self._marks[0][0] >= self.rescan_seconds:
            self._floor = self._marks.pop(0)[1]
        return self._floor

    def take(self, ids: list[int], now: float) -> set[int]:
        """Of ``ids`` (read above ``floor(now)``), those not seen before."""
        fresh = {n for n in ids if n not in self._seen}
        if fresh:
            self._seen |= fresh
            self.since = max(self.since, max(fresh))
        floor = self.floor(now)
        self._seen = {n for n in self._seen if n > floor}
        self._marks.append((now, self.since))
        return fresh


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
    db: AsyncSession, group_id: str | None, *, limit: int = 100, before: int | None = None
) -> list[dict[str, Any]]:
    """A group's events (every group's, for None), newest first."""
    query = select(Event)
    if group_id is not None:
        query = query.where(Event.group_id == group_id)
    if before is not None:
        query = query.where(Event.id < before)
    rows = await db.scalars(query.order_by(Event.id.desc()).limit(limit))
    return [event_dict(e) for e in rows]


async def events_after(
    db: AsyncSession, after: int, *, group_id: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Events with an id above ``after`` (one group's, or all), oldest first."""
    query = select(Event).where(Event.id > after)
    if group_id is not None:
        query = query.where(Event.group_id == group_id)
    rows = await db.scalars(query.order_by(Event.id).limit(limit))
    return [event_dict(e) for e in rows]
