"""Retention on real SQLite and PostgreSQL: events past their kind's retention are deleted
with their finished webhook deliveries, by the sweep, in bounded batches walking the
``(kind, created_at)`` index; recent events, events with a pending delivery and the newest
event stay; replicas prune side by side; the credential cache's change feed still sees
every change after a prune."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import PG_ENV, reset_postgres
from sqlalchemy import event, func, select, text, update

from broker.config import EventsSettings, Settings, WebhookSettings
from broker.errors import ConfigError
from broker.events import KINDS, record
from broker.integrations import Group, register_custom_integration
from broker.retention import prune, rules
from broker.runtime import Broker
from broker.scheduler import sweep
from broker.store.models import Event, WebhookDelivery

HOOK = WebhookSettings.model_validate(
    {"url": "http://127.0.0.1:9/hook", "secret": "whsec-0123456789abcdef"}
)
DAY = timedelta(days=1)


@pytest.fixture
def open_broker(
    store_url: str, make_settings: Callable[..., Settings]
) -> Callable[..., Any]:
    """``async with open_broker(events={...}) as broker``: a broker on the test store."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def make(**settings: Any) -> AsyncIterator[Broker]:
        broker = await Broker.open(make_settings(database_url=store_url, **settings))
        try:
            yield broker
        finally:
            await broker.close()

    return make


def advance(broker: Broker, by: timedelta) -> None:
    base = broker.clock
    broker.clock = lambda: base() + by


async def add_event(
    broker: Broker, kind: str, age: timedelta, *, group: str = "g1", hooked: bool = False
) -> int:
    """Record one event ``age`` ago (with a pending delivery when ``hooked``); its id."""
    async with broker.session() as db, db.begin():
        await record(
            db, group_id=group, integration="acme", kind=kind, now=broker.now() - age,
            webhooks=[HOOK] if hooked else (),
        )
        return int(await db.scalar(select(func.max(Event.id))) or 0)


async def finish_delivery(broker: Broker, event_id: int, status: str) -> None:
    async with broker.session() as db, db.begin():
        await db.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.event_id == event_id)
            .values(status=status, next_attempt_at=None)
        )


async def event_ids(broker: Broker) -> set[int]:
    async with broker.session() as db:
        return set(await db.scalars(select(Event.id)))


async def delivery_event_ids(broker: Broker) -> list[int]:
    async with broker.session() as db:
        return sorted(await db.scalars(select(WebhookDelivery.event_id)))


# --- the rules (pure) ----------------------------------------------------------------------


def test_rules_keep_refreshed_events_shorter() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    found = {r.kind: r.cutoff for r in rules(now, EventsSettings())}
    assert set(found) == set(KINDS)
    assert found.pop("refreshed") == now - 3 * DAY
    assert set(found.values()) == {now - 30 * DAY}
    custom = rules(now, EventsSettings(retention_days=90, refreshed_retention_days=1))
    assert {r.kind: r.cutoff for r in custom}["refreshed"] == now - DAY
    assert custom[-1].kind == "refreshed"  # a backlog of them does not hold the rest back


def test_retention_settings_are_checked(make_settings: Callable[..., Settings]) -> None:
    assert make_settings().events == EventsSettings(
        retention_days=30, refreshed_retention_days=3, prune_batch_size=1000,
        prune_batches_per_sweep=20,
    )
    with pytest.raises(ConfigError, match=r"events: .*refreshed_retention_days \(40\) must not"):
        make_settings(events={"refreshed_retention_days": 40})
    with pytest.raises(ConfigError, match=r"events\.retention_days: .*greater than or equal to 1"):
        make_settings(events={"retention_days": 0})
    with pytest.raises(ConfigError, match=r"events\.keep_forever: unknown key"):
        make_settings(events={"keep_forever": True})


# --- what goes, what stays -------------------------------------------------------------------


async def test_old_events_and_their_finished_deliveries_go_recent_ones_stay(
    broker: Broker,
) -> None:
    old_connected = await add_event(broker, "connected", 31 * DAY, hooked=True)
    old_failed = await add_event(broker, "refresh_failed", 40 * DAY, hooked=True)
    old_pending = await add_event(broker, "reauth_required", 45 * DAY, hooked=True)
    old_refreshed = await add_event(broker, "refreshed", 4 * DAY, hooked=True)
    unhooked = await add_event(broker, "disconnected", 60 * DAY)
    recent_connected = await add_event(broker, "connected", 29 * DAY, hooked=True)
    recent_refreshed = await add_event(broker, "refreshed", 2 * DAY)
    newest = await add_event(broker, "recovered", timedelta(0))
    await finish_delivery(broker, old_connected, "delivered")
    await finish_delivery(broker, old_failed, "failed")  # given up
    await finish_delivery(broker, old_refreshed, "delivered")

    pruned = await prune(broker)

    assert (pruned.events, pruned.deliveries, pruned.complete) == (4, 3, True)
    assert await event_ids(broker) == {
        old_pending,  # its delivery is still pending: kept until it is done
        recent_connected, recent_refreshed, newest,
    }
    assert unhooked not in await event_ids(broker)
    assert await delivery_event_ids(broker) == [old_pending, recent_connected]
    assert (await prune(broker)).events == 0  # nothing more

    await finish_delivery(broker, old_pending, "delivered")
    pruned = await prune(broker)
    assert (pruned.events, pruned.deliveries) == (1, 1)
    assert await event_ids(broker) == {recent_connected, recent_refreshed, newest}


async def test_retention_follows_the_settings(open_broker: Callable[..., Any]) -> None:
    async with open_broker(
        events={"retention_days": 10, "refreshed_retention_days": 1}
    ) as broker:
        kept = await add_event(broker, "connected", 9 * DAY)
        await add_event(broker, "connected", 11 * DAY)
        await add_event(broker, "refreshed", 30 * 3600 * timedelta(seconds=1))
        fresh = await add_event(broker, "refreshed", 20 * 3600 * timedelta(seconds=1))
        assert (await prune(broker)).events == 2
        assert await event_ids(broker) == {kept, fresh}


async def test_pruning_is_bounded_per_call_and_walks_the_kind_created_at_index(
    open_broker: Callable[..., Any],
) -> None:
    async with open_broker(events={"prune_batch_size": 5, "prune_batches_per_sweep": 3}) as broker:
        async with broker.session() as db, db.begin():
            for i in range(40):
                await record(db, group_id=f"g{i}", integration="acme", kind="refreshed",
                             now=broker.now() - 10 * DAY + i * timedelta(seconds=1))
        recent = await add_event(broker, "refreshed", timedelta(0))
        deletes: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
            if statement.startswith("DELETE FROM events"):
                deletes.append((statement, params))

        engine = broker.database.engine.sync_engine
        event.listen(engine, "before_cursor_execute", capture)
        try:
            first = await prune(broker)
            # Three transactions of at most five events: 15 of 40, and it says there is more.
            assert (first.events, first.batches, first.complete) == (15, 3, False)
            assert len(deletes) == 3 and len(await event_ids(broker)) == 41 - 15
            second, third = await prune(broker), await prune(broker)
            assert (second.events, third.events) == (15, 10)
            assert third.complete and third.batches == 3  # the last one found nothing left
            assert await event_ids(broker) == {recent}
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        plan = await explain(broker, *deletes[0])
        assert "ix_events_kind_created_at" in plan, plan  # the oldest entries of the kind
        if broker.database.is_sqlite:
            assert "USING INTEGER PRIMARY KEY" in plan, plan
        else:
            assert "pk_events" in plan and "= ANY" in plan, plan  # ids found by key
            assert "SKIP LOCKED" in deletes[0][0]


async def explain(broker: Broker, statement: str, params: Any) -> str:
    """The plan of a captured statement. PostgreSQL with sequential scans off: a table of a
    few dozen rows is cheaper to scan, so this shows the index can serve the statement (the
    benchmark shows the plan chosen on a large table)."""
    async with broker.database.engine.connect() as conn:
        if broker.database.is_sqlite:
            rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            return "\n".join(str(r[-1]) for r in rows)
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        async with raw.transaction():
            await raw.execute("SET LOCAL enable_seqscan = off")
            found = await raw.fetch("EXPLAIN " + statement, *params)
        return "\n".join(r[0] for r in found)


async def test_the_sweep_prunes(broker: Broker) -> None:
    old = [await add_event(broker, "connected", 31 * DAY, group=f"g{i}") for i in range(3)]
    await add_event(broker, "refreshed", 4 * DAY)
    newest = await add_event(broker, "connected", timedelta(0))
    result = await sweep(broker)
    assert result.claimed == 0
    assert (result.pruned.events, result.pruned.complete) == (4, True)
    assert await event_ids(broker) == {newest}
    assert not set(old) & await event_ids(broker)


async def test_the_newest_event_stays_however_old(broker: Broker) -> None:
    first = await add_event(broker, "connected", 100 * DAY)
    last = await add_event(broker, "connected", 90 * DAY)
    assert (await prune(broker)).events == 1
    assert await event_ids(broker) == {last}
    assert first != last


# --- the change feed -----------------------------------------------------------------------

KEY_A = "0123456789abcdef0123456789abcdef"
KEY_B = "fedcba9876543210fedcba9876543210"


async def connect_key(broker: Broker, group: str, key: str) -> None:
    async with broker.session() as db, db.begin():
        await register_custom_integration(db, Group(group), "openweathermap", {"api_key": key})


async def test_the_change_feed_sees_a_change_made_after_a_prune(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """Replica ``a`` serves a cached key; replica ``b``, a month later by its clock, prunes
    every event it may, then replaces the key. ``a`` must see the change within the cache's
    bound. On SQLite a new row takes ``max(rowid) + 1``: had the prune deleted the newest
    event too, the replacement's event would reuse an id the feed has already read past,
    and ``a`` would serve the old key for as long as it runs."""
    settings = make_settings(database_url=store_url)
    a, b = await Broker.open(settings), await Broker.open(settings)
    try:
        for group in ("g2", "g3", "g1"):
            await connect_key(a, group, KEY_A)
        assert await a.credentials("g1", "openweathermap") == {"api_key": KEY_A}
        await asyncio.sleep(0.4)  # the watcher has read every event: the cache is trusted
        assert await a.credentials("g1", "openweathermap") == {"api_key": KEY_A}
        assert a.tokens.cache.get(("g1", "openweathermap")) is not None  # served from it

        advance(b, 31 * DAY)
        pruned = await prune(b)
        assert pruned.events >= 2
        await connect_key(b, "g1", KEY_B)

        started = time.monotonic()
        while await a.credentials("g1", "openweathermap") != {"api_key": KEY_B}:
            assert time.monotonic() - started < 3.0, "replica a never saw the new key"
            await asyncio.sleep(0.02)
        assert time.monotonic() - started <= 1.5
        assert pruned.events == 2  # the newest event stayed
    finally:
        await a.close()
        await b.close()


# --- replicas pruning side by side ---------------------------------------------------------


async def test_replicas_prune_side_by_side_without_counting_twice(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        database_url=store_url, events={"prune_batch_size": 4, "prune_batches_per_sweep": 100}
    )
    a, b = await Broker.open(settings), await Broker.open(settings)
    try:
        async with a.session() as db, db.begin():
            for i in range(60):
                await record(db, group_id=f"g{i}", integration="acme", kind="refreshed",
                             now=a.now() - 5 * DAY)
        newest = await add_event(a, "refreshed", timedelta(0))
        first, second = await asyncio.gather(prune(a), prune(b))
        assert first.events + second.events == 60
        assert await event_ids(a) == {newest}
    finally:
        await a.close()
        await b.close()


@pytest.fixture
async def postgres_url(pg_server_url: str | None) -> str:
    """PostgreSQL only (SQLite has one writer: a second pruner simply waits its turn)."""
    if pg_server_url is None:
        pytest.skip(f"PostgreSQL case: set {PG_ENV} to run it")
    await reset_postgres(pg_server_url)
    return pg_server_url


async def test_a_pruner_skips_event_rows_another_transaction_holds(
    postgres_url: str, make_settings: Callable[..., Settings]
) -> None:
    """PostgreSQL: rows locked by another transaction (another replica's batch) are skipped,
    not waited for; they go in a later batch."""
    settings = make_settings(database_url=postgres_url)
    broker = await Broker.open(settings)
    try:
        held = [await add_event(broker, "refreshed", 5 * DAY) for _ in range(3)]
        others = [await add_event(broker, "refreshed", 4 * DAY) for _ in range(3)]
        newest = await add_event(broker, "refreshed", timedelta(0))
        async with broker.database.engine.connect() as holder:
            await holder.execute(
                text("SELECT id FROM events WHERE id = ANY(:ids) FOR UPDATE"), {"ids": held}
            )
            pruned = await asyncio.wait_for(prune(broker), timeout=10)
            assert pruned.events == len(others)
            await holder.rollback()
        assert await event_ids(broker) == {*held, newest}
        assert (await prune(broker)).events == len(held)
    finally:
        await broker.close()
