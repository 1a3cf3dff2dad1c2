"""The credential cache: fast reads, and a change on any replica seen within 1 second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from broker.cache import MAX_STALENESS
from broker.config import Settings
from broker.errors import IntegrationNotConnected
from broker.integrations import Group, register_custom_integration
from broker.runtime import Broker

KEY_A = "0123456789abcdef0123456789abcdef"
KEY_B = "fedcba9876543210fedcba9876543210"


async def connect(broker: Broker, group: str, key: str) -> None:
    async with broker.session() as db, db.begin():
        await register_custom_integration(db, Group(group), "openweathermap", {"api_key": key})


async def wait_until(predicate: Callable[[], Any], limit: float) -> float:
    """Seconds until ``await predicate()`` is true (fails after ``limit`` seconds)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if await predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {limit} s")


@pytest.fixture
async def replicas(
    store_url: str, make_settings: Callable[..., Settings]
) -> Any:
    settings = make_settings(database_url=store_url)
    a = await Broker.open(settings)
    b = await Broker.open(settings)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_reads_are_served_from_the_cache_once_warm(replicas: Any) -> None:
    a, _ = replicas
    await connect(a, "g1", KEY_A)
    assert await a.credentials("g1", "openweathermap") == {"api_key": KEY_A}
    await asyncio.sleep(0.4)  # the watcher has polled at least once: the cache is trusted
    assert await a.credentials("g1", "openweathermap") == {"api_key": KEY_A}
    assert a.tokens.cache.get(("g1", "openweathermap")) is not None
    # A node mutating what it got does not change what the next node gets.
    got = await a.credentials("g1", "openweathermap")
    got["api_key"] = "mutated"
    assert await a.credentials("g1", "openweathermap") == {"api_key": KEY_A}


async def test_a_replace_on_another_replica_is_seen_within_one_second(replicas: Any) -> None:
    a, b = replicas
    await connect(a, "g1", KEY_A)
    await a.credentials("g1", "openweathermap")
    await asyncio.sleep(0.4)
    assert await a.credentials("g1", "openweathermap") == {"api_key": KEY_A}
    await connect(b, "g1", KEY_B)

    async def sees_new() -> bool:
        return await a.credentials("g1", "openweathermap") == {"api_key": KEY_B}

    assert await wait_until(sees_new, 3.0) <= MAX_STALENESS + 0.5


async def test_a_disconnect_on_another_replica_is_seen_within_one_second(replicas: Any) -> None:
    a, b = replicas
    await connect(a, "g1", KEY_A)
    await a.credentials("g1", "openweathermap")
    await asyncio.sleep(0.4)
    async with b.session() as db, db.begin():
        await b.repository.delete(db, "g1", "openweathermap")

    async def gone() -> bool:
        try:
            await a.credentials("g1", "openweathermap")
        except IntegrationNotConnected:
            return True
        return False

    assert await wait_until(gone, 3.0) <= MAX_STALENESS + 0.5


async def test_a_local_disconnect_is_seen_at_once(replicas: Any) -> None:
    a, _ = replicas
    await connect(a, "g1", KEY_A)
    await a.credentials("g1", "openweathermap")
    await asyncio.sleep(0.4)
    async with a.session() as db, db.begin():
        await a.repository.delete(db, "g1", "openweathermap")
    with pytest.raises(IntegrationNotConnected):
        await a.credentials("g1", "openweathermap")


async def test_a_burst_of_cache_misses_for_one_connection_makes_one_read(replicas: Any) -> None:
    """Callers that miss the cache while a read of the same connection is in flight share
    it; a read that began before this process changed the connection is not shared."""
    from sqlalchemy import event

    a, _ = replicas
    await connect(a, "g1", KEY_A)
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("SELECT") and "FROM connections" in statement:
            reads.append(statement)

    engine = a.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        a.tokens.cache.entries.clear()
        got = await asyncio.gather(*(a.credentials("g1", "openweathermap") for _ in range(100)))
        assert got == [{"api_key": KEY_A}] * 100
        assert len(reads) == 1

        # A change made here while a read is in flight: later callers read again, and see it.
        a.tokens.cache.entries.clear()
        reads.clear()
        first = asyncio.create_task(a.credentials("g1", "openweathermap"))
        await asyncio.sleep(0)  # the read is in flight
        await connect(a, "g1", KEY_B)
        after = await a.credentials("g1", "openweathermap")
        assert after == {"api_key": KEY_B}
        assert (await first)["api_key"] in (KEY_A, KEY_B)
        assert len(reads) >= 2
    finally:
        event.remove(engine, "before_cursor_execute", count)
