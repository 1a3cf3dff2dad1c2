"""A replica whose machine clock is five minutes off (issue #6, item 14).

Two brokers share one database: replica B (its clock right, it serves the OAuth flow) and
replica A, whose machine clock is 5 minutes ahead or behind. Each replica's "machine time"
is ``broker.runtime.utcnow``; here it returns real time plus the skew of the replica whose
code is running (a context variable set for every task of replica A), so both replicas can
live in one process and one event loop.

On PostgreSQL, ``Broker.calibrate_clock`` (run by ``Broker.open`` and before every sweep)
measures the machine clock against the database's ``clock_timestamp()`` and A then works on
the database's time. With 4-minute tokens that is the difference between working and not:
uncorrected, a clock 5 minutes ahead sees every token as already expired (a refresh on
every call: a refresh loop, and double refreshes against B), and a clock 5 minutes behind
sees a token as valid 5 minutes after it expired (it hands out dead tokens and refreshes
late). The provider's counters prove there is neither a loop nor a double refresh.

On SQLite there is nothing to calibrate against: the database is a file on one machine,
so every process using it (every "replica") reads the same machine clock.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest

import broker.runtime
from broker.config import Settings
from broker.runtime import Broker
from broker.scheduler import sweep
from tests import oauth_support
from tests.faults.fault_support import advance, connect
from tests.oauth_support import Live

live_factory = oauth_support.live_factory

T = TypeVar("T")
MACHINE_SKEW: contextvars.ContextVar[timedelta] = contextvars.ContextVar(
    "machine_skew", default=timedelta(0)
)
LIFETIME = 240  # seconds: shorter than the skew


@pytest.fixture
def machine_clocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each replica's machine time: real time plus the running replica's skew."""
    real = broker.runtime.utcnow

    def machine_time() -> datetime:
        return real() + MACHINE_SKEW.get()

    monkeypatch.setattr(broker.runtime, "utcnow", machine_time)
    yield


async def on_machine(skew: float, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` as code of the replica whose machine clock is ``skew`` seconds off
    (tasks it starts, like the cache watcher, inherit that clock)."""
    context = contextvars.copy_context()
    context.run(MACHINE_SKEW.set, timedelta(seconds=skew))
    return await asyncio.get_running_loop().create_task(coro, context=context)


async def now_of(replica: Broker) -> datetime:
    return replica.now()


async def get(replica: Broker) -> dict[str, Any]:
    return await replica.credentials("g1", "acme")


async def calls(live: Live, a: Broker, skew: float, n: int = 10) -> list[dict[str, Any]]:
    """``n`` credential reads on each replica, interleaved, and one sweep on each."""
    got = []
    for _ in range(n):
        got.append(await on_machine(skew, get(a)))
        got.append(await get(live.broker))
    await on_machine(skew, sweep(a))
    await sweep(live.broker)
    return got


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("skew", [300, -300], ids=["ahead", "behind"])
async def test_a_replica_five_minutes_off_works_on_the_databases_clock(
    live_factory: Callable[..., Any], machine_clocks: None, skew: float,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with live_factory() as live:
        live.server.config.access_token_lifetime = LIFETIME
        await connect(live, "g1")
        first = await get(live.broker)
        a = await on_machine(skew, Broker.open(live.broker.settings))
        try:
            # A's machine is 5 minutes off; its clock agrees with the database's.
            assert abs(a.clock_offset.total_seconds() + skew) < 2
            drift = (await on_machine(skew, now_of(a))) - live.broker.now()
            assert abs(drift.total_seconds()) < 1
            assert "clock is" in caplog.text and "off the database's" in caplog.text

            # A fresh 4-minute token: nobody refreshes it (no loop).
            got = await calls(live, a, skew)
            assert {g["access_token"] for g in got} == {first["access_token"]}
            assert live.server.token_requests["refresh_token"] == 0

            # 200 s later (both replicas' clocks move): 40 s left, due. A alone is awake:
            # its sweep refreshes it before it expires.
            advance(live.broker, 200)
            advance(a, 200)
            result = await on_machine(skew, sweep(a))
            assert (result.claimed, result.refreshed) == (1, 1)
            assert live.server.token_requests["refresh_token"] == 1

            # Both replicas now hand out the new token, and nobody refreshes again.
            got = await calls(live, a, skew)
            tokens = {g["access_token"] for g in got}
            assert len(tokens) == 1 and tokens != {first["access_token"]}
            db_now = live.broker.now().timestamp()
            assert all(g["expires_at"] >= db_now + LIFETIME - 5 for g in got)
            assert live.server.token_requests["refresh_token"] == 1
            assert live.server.reuse_detections == 0
            assert live.server.invalid_grant_count == 0
        finally:
            await on_machine(skew, a.close())


async def calibrate(replica: Broker) -> timedelta:
    return await replica.calibrate_clock()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_on_sqlite_replicas_share_the_machine_clock_so_there_is_nothing_to_calibrate(
    store_url: str, make_settings: Callable[..., Settings], machine_clocks: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A SQLite database is a file on one machine: every broker process using it reads
    that machine's clock, so replicas cannot disagree. ``calibrate_clock`` keeps the
    machine's time (offset 0), touches no database and warns about nothing."""
    caplog.set_level(logging.WARNING)
    settings = make_settings(database_url=store_url)
    one = await on_machine(300, Broker.open(settings))
    two = await on_machine(300, Broker.open(settings))
    try:
        for replica in (one, two):
            assert await on_machine(300, calibrate(replica)) == timedelta(0)
            assert replica.clock_offset == timedelta(0)
        machine = broker.runtime.utcnow
        drift = await on_machine(300, now_of(one)) - await on_machine(300, now_of(two))
        assert abs(drift.total_seconds()) < 1
        ahead = await on_machine(300, now_of(one)) - machine()
        assert abs(ahead.total_seconds() - 300) < 1  # the machine's own (skewed) time
        assert "off the database's" not in caplog.text
    finally:
        await one.close()
        await two.close()
