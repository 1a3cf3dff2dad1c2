"""What an operator sees of the connections: for ``broker connections list``, ``broker
connections show`` and the ``/admin`` page. Read-only queries; never a credential (the
encrypted column is not even selected). ``last_error`` is the broker's own text: an
error code or an HTTP status, never a provider's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, not_, select
from sqlalchemy.ext.asyncio import AsyncSession

from .events import list_events
from .refresh import shown_status
from .store.models import Connection, Event

__all__ = [
    "ATTENTION",
    "OUTCOME_KINDS",
    "Overview",
    "connection_rows",
    "counts_by_status",
    "hour_starts",
    "overview",
]

ATTENTION = ("reauth_required", "unavailable", "corrupt")
"""The statuses that need someone: the user (reauth), the provider or the operator."""
OUTCOME_KINDS = ("refreshed", "recovered", "refresh_failed", "reauth_required")
"""The events that are a refresh's outcome (the chart's series)."""

_COLUMNS = (
    Connection.group_id, Connection.integration, Connection.auth_type, Connection.status,
    Connection.expires_at, Connection.next_refresh_at, Connection.failure_count,
    Connection.last_error, Connection.updated_at,
)


def _unavailable(now: datetime) -> Any:
    """``refresh.shown_status``'s rule for ``unavailable``, as SQL (to filter and count)."""
    return and_(Connection.status == "connected", Connection.last_error.is_not(None),
                Connection.expires_at <= now)


def _where_status(query: Select[Any], status: str, now: datetime) -> Select[Any]:
    """Rows whose *shown* status is ``status`` (``unavailable`` is derived)."""
    if status == "unavailable":
        return query.where(_unavailable(now))
    query = query.where(Connection.status == status)
    return query.where(not_(_unavailable(now))) if status == "connected" else query


async def connection_rows(
    db: AsyncSession, *, now: datetime, group_id: str | None = None,
    integration: str | None = None, status: str | None = None, limit: int | None = None,
) -> list[dict[str, Any]]:
    """Connections as dicts (shown status), by group then integration."""
    query: Select[Any] = select(*_COLUMNS).order_by(  # type: ignore[assignment]
        Connection.group_id, Connection.integration
    )
    if group_id is not None:
        query = query.where(Connection.group_id == group_id)
    if integration is not None:
        query = query.where(Connection.integration == integration)
    if status is not None:
        query = _where_status(query, status, now)
    if limit is not None:
        query = query.limit(limit)
    return [_row(r, now) for r in (await db.execute(query)).all()]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _row(r: Any, now: datetime) -> dict[str, Any]:
    return {
        "group": r.group_id, "integration": r.integration, "auth_type": r.auth_type,
        "status": shown_status(r.status, r.last_error, r.expires_at, now),
        "expires_at": _iso(r.expires_at), "next_refresh_at": _iso(r.next_refresh_at),
        "failures": r.failure_count, "last_error": r.last_error,
        "updated_at": _iso(r.updated_at),
    }


def hour_starts(now: datetime, hours: int = 24) -> list[datetime]:
    """The starts of the last ``hours`` whole hours up to and including ``now``'s, oldest
    first (the chart's buckets; the last one is the hour in progress)."""
    last = now.replace(minute=0, second=0, microsecond=0)
    return [last - timedelta(hours=hours - 1 - i) for i in range(hours)]


@dataclass
class Overview:
    """Everything ``/admin`` shows."""

    now: datetime
    by_provider: dict[str, dict[str, int]] = field(default_factory=dict)
    attention: list[dict[str, Any]] = field(default_factory=list)
    hourly: list[dict[str, Any]] = field(default_factory=list)
    recent: list[dict[str, Any]] = field(default_factory=list)


async def counts_by_status(db: AsyncSession, *, now: datetime) -> dict[str, dict[str, int]]:
    """Connections per integration and shown status (``unavailable`` included), counted in
    the database: ``/admin``'s table and the ``broker_connections`` gauge."""
    counts = (await db.execute(
        select(Connection.integration, Connection.status,
               _unavailable(now).label("unavailable"), func.count())
        .group_by(Connection.integration, Connection.status, "unavailable")
    )).all()
    found: dict[str, dict[str, int]] = {}
    for integration, status, unavailable, count in counts:
        shown = "unavailable" if unavailable else status
        per = found.setdefault(integration, {})
        per[shown] = per.get(shown, 0) + int(count)
    return found


async def overview(
    db: AsyncSession, *, now: datetime, attention_limit: int = 100, recent_limit: int = 50
) -> Overview:
    """Counts by provider and shown status, the connections needing attention, refresh
    outcomes per hour over 24 hours, and the newest events."""
    found = Overview(now=now, by_provider=await counts_by_status(db, now=now))
    attention = select(*_COLUMNS).where(
        Connection.status.in_(["reauth_required", "corrupt"]) | _unavailable(now)
    ).order_by(Connection.updated_at.desc()).limit(attention_limit)
    found.attention = [_row(r, now) for r in (await db.execute(attention)).all()]
    # One count per hour (an index range on (kind, created_at) each): a day of refreshes
    # at 10,000 connections is 240,000 events, counted in the database, not read out.
    for start in hour_starts(now):
        counted = dict((await db.execute(
            select(Event.kind, func.count())
            .where(Event.kind.in_(OUTCOME_KINDS), Event.created_at >= start,
                   Event.created_at < start + timedelta(hours=1))
            .group_by(Event.kind)
        )).all())
        found.hourly.append({"hour": start.isoformat(),
                             **{k: int(counted.get(k, 0)) for k in OUTCOME_KINDS}})
    found.recent = await list_events(db, None, limit=recent_limit)
    return found
