"""Retention: events older than their kind's retention are deleted, with their finished
webhook deliveries, a bounded batch at a time, by the refresh sweep.

Every refresh records a ``refreshed`` event (about 240 bytes): at 1,000,000 connections with
one-hour tokens that is 24 million rows a day. ``events.retention_days`` (30) applies to
every kind, ``events.refreshed_retention_days`` (3) to ``refreshed`` events, nearly all of
the rows at scale.

How (``prune``, called at the end of every sweep):

- One rule per kind. A batch is one statement, ``DELETE FROM events WHERE id IN (SELECT id
  FROM events WHERE kind = :kind AND created_at < :cutoff ... ORDER BY created_at LIMIT
  :batch) RETURNING id``, plus the DELETE of those events' deliveries, in one short
  transaction. The subquery walks ``ix_events_kind_created_at`` from its oldest entry for
  the kind, so a batch costs the same with a year of events as with a day's. At most
  ``events.prune_batches_per_sweep`` batches of ``events.prune_batch_size`` per sweep: a
  backlog (a store that kept a year) is worked off over many sweeps instead of stalling one.
- Nothing to delete takes no write lock (a read-only probe first): SQLite has one writer,
  and the sweep's refreshes need it. On SQLite a batch takes its turn with the refresh
  path's writes (``Database.write``).
- Replicas prune concurrently: on PostgreSQL the subquery takes its rows ``FOR UPDATE SKIP
  LOCKED``, so two replicas delete disjoint batches and never wait for each other (nor
  for any other transaction holding an event row).
- An event whose webhook delivery is still pending is kept until the delivery is done
  (delivered or given up); the deliveries deleted are only those of deleted events.
- The newest event is never deleted. SQLite gives a new row ``max(rowid) + 1``: deleting the
  newest row would hand its id out again, and the credential cache's change feed, which
  reads the ids above the last one it saw, would miss the event that reuses it (and keep
  serving a credential changed by another process). PostgreSQL's sequence never reuses an
  id, and there the feed rescans the last 10 seconds of ids, which retention (a day at
  least) never reaches: an event is pruned only long after every feed has read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Select, any_, delete, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import ReturningDelete

from .events import KINDS
from .store.models import events_table, webhook_deliveries_table

if TYPE_CHECKING:
    from .config import EventsSettings
    from .runtime import Broker

__all__ = ["Pruned", "Rule", "prune", "prune_batch", "rules"]

_e = events_table.c
_d = webhook_deliveries_table.c


@dataclass(frozen=True)
class Rule:
    """Events of ``kind`` recorded before ``cutoff`` are due for deletion."""

    kind: str
    cutoff: datetime


@dataclass
class Pruned:
    """What one ``prune`` deleted."""

    events: int = 0
    deliveries: int = 0
    batches: int = 0
    complete: bool = True
    """False when the batch budget ran out with more left to delete (the next sweep goes on)."""


def rules(now: datetime, settings: EventsSettings) -> list[Rule]:
    """The retention rules at ``now``, one per kind (each an index range of its own):
    ``refreshed`` after ``refreshed_retention_days``, every other kind after
    ``retention_days``. ``refreshed`` comes last: a backlog of them does not hold the
    others back."""
    keep = timedelta(days=settings.retention_days)
    keep_refreshed = timedelta(days=settings.refreshed_retention_days)
    return [Rule(kind, now - keep) for kind in KINDS if kind != "refreshed"] + [
        Rule("refreshed", now - keep_refreshed)
    ]


def candidates(rule: Rule, limit: int, *, newest: int, skip_locked: bool) -> Select[int]:
    """The ids of up to ``limit`` events ``rule`` lets go, oldest first: a range of
    ``ix_events_kind_created_at``. Never ``newest`` or later, never an event with a pending
    delivery."""
    # Pending is ``next_attempt_at`` set (it is NULL once delivered or given up): should the
    # planner rather hash the pending deliveries than probe them per event (PostgreSQL may),
    # it reads them from the non-NULL range of their index, a few rows, not the table.
    pending = exists().where(_d.event_id == _e.id, _d.next_attempt_at.is_not(None))
    query = (
        select(_e.id)
        .where(_e.kind == rule.kind, _e.created_at < rule.cutoff, _e.id < newest, ~pending)
        .order_by(_e.created_at)
        .limit(limit)
    )
    return query.with_for_update(skip_locked=True) if skip_locked else query


def delete_events(
    rule: Rule, limit: int, *, newest: int, postgresql: bool
) -> ReturningDelete[int]:
    """One batch: ``DELETE FROM events WHERE id IN (candidates) RETURNING id``.

    On PostgreSQL the ids are gathered into an array first (``id = ANY(ARRAY(...))``), so
    the rows are found by primary key whatever the planner thinks of ``IN``: it may
    otherwise join the ids against a scan of the whole table."""
    ids = candidates(rule, limit, newest=newest, skip_locked=postgresql).scalar_subquery()
    where = _e.id == any_(func.array(ids)) if postgresql else _e.id.in_(ids)
    return delete(events_table).where(where).returning(_e.id)


async def newest_event(db: AsyncSession) -> int:
    """The highest event id (0 when there is none): pruning stops below it."""
    return int(await db.scalar(select(func.max(_e.id))) or 0)


async def prune_batch(
    db: AsyncSession, rule: Rule, limit: int, *, newest: int, postgresql: bool
) -> tuple[int, int]:
    """Delete one batch in the caller's transaction; (events, deliveries) deleted."""
    ids: Sequence[int] = (
        await db.execute(delete_events(rule, limit, newest=newest, postgresql=postgresql))
    ).scalars().all()
    if not ids:
        return 0, 0
    # Only finished deliveries are left for these events (a pending one kept its event).
    result = await db.execute(
        delete(webhook_deliveries_table).where(_d.event_id.in_(ids)).returning(_d.id)
    )
    return len(ids), len(result.all())


async def prune(
    broker: Broker, *, batch_size: int | None = None, max_batches: int | None = None
) -> Pruned:
    """Delete what the retention rules let go, at most ``max_batches`` transactions of
    ``batch_size`` events (defaults: ``events.prune_batch_size`` and
    ``events.prune_batches_per_sweep``). Returns the counts; raises the database's error."""
    settings = broker.settings.events
    size = batch_size or settings.prune_batch_size
    budget = max_batches or settings.prune_batches_per_sweep
    postgresql = not broker.database.is_sqlite
    result = Pruned()
    async with broker.session() as db:
        newest = await newest_event(db)
        # Read-only probes: a rule with nothing to delete takes no write lock.
        due = [
            rule for rule in rules(broker.now(), settings)
            if await db.scalar(candidates(rule, 1, newest=newest, skip_locked=False))
            is not None
        ]
    for rule in due:
        while True:
            if result.batches >= budget:
                result.complete = False
                return result
            async with broker.database.write() as db:
                events, deliveries = await prune_batch(
                    db, rule, size, newest=newest, postgresql=postgresql
                )
            result.batches += 1
            result.events += events
            result.deliveries += deliveries
            if events < size:
                break
    return result
