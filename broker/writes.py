"""Storing refreshed tokens: the refreshes that finish together share one transaction.

A refresh used to end in a transaction of its own (an UPDATE, an event INSERT, a commit).
With many refreshes in flight those transactions were most of a refresh's cost, and on
SQLite they also queued for its single writer lock, each waiting in SQLite's busy handler.
``RefreshWriter.store`` queues the write and returns once it is committed; one task at a
time drains the queue, so what arrives while a transaction runs goes into the next one.

Nothing is lost or mixed up by the sharing: each row is written under its own condition
(its version, and the lease its refresher holds); if a shared transaction fails, each of
its writes is tried again alone, so one failing write never fails another's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .store.repository import Refreshed

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = ["RefreshWriter"]


class RefreshWriter:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._queue: list[tuple[Refreshed, asyncio.Future[bool]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def store(self, item: Refreshed) -> bool:
        """Store ``item`` (see ``Repository.store_refreshed``): True once committed, False
        when the row had changed meanwhile. Raises what the database raised.

        A caller cancelled while waiting does not cancel the write: a provider's answer,
        once received, is stored (the future is the caller's alone; cancelling it only
        tells the writer nobody waits for the outcome).
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._write(batch)
        except BaseException as exc:  # cancelled: nobody is left waiting forever
            batch, self._queue = self._queue, []
            for _, future in batch:
                _settle(future, exc=exc)
            raise
        finally:
            self._drainer = None

    async def _write(self, batch: list[tuple[Refreshed, asyncio.Future[bool]]]) -> None:
        broker = self.broker
        try:
            async with broker.database.write() as db:
                stored = await broker.repository.store_refreshed(db, [i for i, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:
                    await self._write([one])
                return
            _settle(batch[0][1], exc=exc)
        except BaseException as exc:  # cancelled (shutdown): the callers hear of it
            for _, future in batch:
                _settle(future, exc=exc)
            raise
        else:
            for (_, future), ok in zip(batch, stored, strict=True):
                _settle(future, result=ok)


def _settle(
    future: asyncio.Future[bool], *, result: bool = False, exc: BaseException | None = None
) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
        future.exception()  # retrieved: a caller that went away leaves no warning behind
