"""Single flight (``broker.flights``): the callers of one operation in progress share it.
Pure asyncio, no I/O."""

from __future__ import annotations

import asyncio

import pytest

from broker.flights import Flights


async def test_callers_that_come_while_it_runs_share_one_run() -> None:
    flights: Flights[int] = Flights()
    runs = 0
    gate = asyncio.Event()

    async def operation() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return 42

    callers = [asyncio.create_task(flights.run("k", operation)) for _ in range(100)]
    await asyncio.sleep(0)
    assert flights.running("k") and flights.started("k") is not None
    gate.set()
    assert await asyncio.gather(*callers) == [42] * 100
    assert runs == 1
    assert not flights.running("k") and flights.started("k") is None
    # Once it has ended, the next caller runs it again.
    assert await flights.run("k", operation) == 42
    assert runs == 2


async def test_different_keys_run_separately() -> None:
    flights: Flights[str] = Flights()

    async def operation(name: str) -> str:
        await asyncio.sleep(0)
        return name

    got = await asyncio.gather(
        flights.run("a", lambda: operation("a")), flights.run("b", lambda: operation("b"))
    )
    assert got == ["a", "b"]


async def test_an_exception_reaches_every_caller_and_ends_the_flight() -> None:
    flights: Flights[int] = Flights()
    gate = asyncio.Event()

    async def failing() -> int:
        await gate.wait()
        raise LookupError("no such connection")

    callers = [asyncio.create_task(flights.run("k", failing)) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results), results
    assert not flights.running("k")


async def test_a_cancelled_waiter_cancels_neither_the_operation_nor_the_others() -> None:
    flights: Flights[int] = Flights()
    gate = asyncio.Event()
    finished = False

    async def operation() -> int:
        nonlocal finished
        await gate.wait()
        finished = True
        return 7

    owner = asyncio.create_task(flights.run("k", operation))
    await asyncio.sleep(0)
    quitter = flights.join("k")
    stayer = flights.join("k")
    await asyncio.sleep(0)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    gate.set()
    assert await stayer == 7
    assert await owner == 7
    assert finished


async def test_cancelling_the_runner_tells_its_waiters() -> None:
    flights: Flights[int] = Flights()

    async def forever() -> int:
        await asyncio.Event().wait()
        return 0

    owner = asyncio.create_task(flights.run("k", forever))
    await asyncio.sleep(0)
    waiter = flights.join("k")
    await asyncio.sleep(0)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not flights.running("k")


async def test_a_joined_outcome_is_kept_for_a_caller_that_awaits_it_later() -> None:
    """``join`` registers at once: a caller that does other work (other awaits) before
    awaiting still gets this operation's outcome, even if it ended meanwhile."""
    flights: Flights[int] = Flights()
    gate = asyncio.Event()

    async def operation() -> int:
        await gate.wait()
        return 5

    owner = asyncio.create_task(flights.run("k", operation))
    await asyncio.sleep(0)
    outcome = flights.join("k")
    gate.set()
    assert await owner == 5  # the operation has ended: no flight is running now
    assert not flights.running("k")
    assert await outcome == 5
