"""Single flight: the callers of one operation already in progress share its outcome.

``Flights.run(key, operation)`` runs ``operation()`` once per key at a time; callers that
come while it runs wait for its result (or its exception) instead of running it again.

Each waiter waits on a future of its own, resolved directly by the running operation: a
waiter that is cancelled cancels nobody else, and waking a waiter costs one callback of the
event loop (``asyncio.shield`` around a shared future costs two, which a burst of a thousand
callers of one connection notices). The operation itself is never cancelled by a waiter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Flights"]

T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("started", "waiters")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.waiters: list[asyncio.Future[T]] = []

    def succeed(self, result: T) -> None:
        for waiter in self.waiters:
            if not waiter.done():  # done: its caller was cancelled
                waiter.set_result(result)

    def fail(self, exc: BaseException) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(exc)


class Flights(Generic[T]):
    def __init__(self) -> None:
        self._running: dict[Hashable, _Flight[T]] = {}

    def started(self, key: Hashable) -> float | None:
        """When the operation running for ``key`` began (``time.monotonic``), or None."""
        flight = self._running.get(key)
        return None if flight is None else flight.started

    def running(self, key: Hashable) -> bool:
        return key in self._running

    def join(self, key: Hashable) -> asyncio.Future[T]:
        """A future for the outcome of the operation running for ``key`` (``running(key)``
        must be true). It is registered at once: awaiting it later (after other awaits)
        still gets this operation's outcome."""
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key].waiters.append(waiter)
        return waiter

    async def run(self, key: Hashable, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``'s result, shared with every caller that joins while it runs."""
        if key in self._running:
            return await self.join(key)
        flight: _Flight[T] = _Flight()
        self._running[key] = flight
        try:
            result = await operation()
        except BaseException as exc:
            self._end(key, flight)
            flight.fail(exc)
            raise
        self._end(key, flight)
        flight.succeed(result)
        return result

    def _end(self, key: Hashable, flight: _Flight[T]) -> None:
        if self._running.get(key) is flight:
            del self._running[key]
