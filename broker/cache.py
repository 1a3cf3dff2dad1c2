"""A cache of decrypted credentials for the hot path, kept honest by the events table.

Every change to a connection (connect, refresh, reauth, failure, disconnect) records an
event in the same transaction (see ``events.record``). So the event log *is* a change feed:

- In this process, a committed session invalidates the keys it recorded events for
  (``after_commit``), before the commit returns to the caller.
- For other processes and replicas, a watcher polls ``events`` by id every
  ``POLL_SECONDS`` and invalidates what changed. The cache is trusted only while the
  watcher's last completed poll *started* less than ``MAX_STALENESS`` ago, so a change
  committed anywhere is seen everywhere within that bound (1 second); when the watcher
  falls behind or fails, reads go to the database.
- On PostgreSQL, ids are assigned at insert but become visible at commit, possibly out of
  order; each poll therefore rescans the last ``RESCAN_SECONDS`` of ids (``events.Cursor``).
  SQLite commits one writer at a time, in id order.

Entries hold the decrypted dict (never written anywhere) and the row version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from .events import Cursor
from .store.models import Event

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = ["CredentialCache", "Entry"]

log = logging.getLogger("broker.cache")

POLL_SECONDS = 0.25
MAX_STALENESS = 1.0
MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Entry:
    version: int
    auth_type: str
    status: str
    data: dict[str, Any]


class CredentialCache:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.entries: dict[tuple[str, str], Entry] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trusted_until = 0.0  # monotonic time
        self._cursor = Cursor(0, rescan=not broker.database.is_sqlite)
        self._invalidated_at: dict[tuple[str, str], float] = {}

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: tuple[str, str]) -> Entry | None:
        """A cached entry, if the cache may be trusted right now."""
        if time.monotonic() >= self._trusted_until:
            self._ensure_watcher()
            return None
        return self.entries.get(key)

    def put(self, key: tuple[str, str], entry: Entry, *, read_started: float) -> None:
        """Cache ``entry`` read from the database at monotonic time ``read_started``.

        Skipped when an invalidation may have been missed since the read began.
        """
        if self.invalidated_since(key, read_started):
            return
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = entry

    # --- invalidation --------------------------------------------------------------------

    def invalidate(self, keys: Iterable[tuple[str, str]]) -> None:
        now = time.monotonic()
        for key in keys:
            self.entries.pop(key, None)
            self._invalidated_at[key] = now
        if len(self._invalidated_at) > MAX_ENTRIES:
            self._invalidated_at = {k: t for k, t in self._invalidated_at.items() if now - t < 5}

    def invalidated_since(self, key: tuple[str, str], started: float) -> bool:
        """Whether ``key`` changed in this process after monotonic time ``started``."""
        return self._invalidated_at.get(key, 0.0) > started

    def clear(self) -> None:
        self.entries.clear()
        self._trusted_until = 0.0

    # --- the watcher ---------------------------------------------------------------------

    def _ensure_watcher(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop = loop
        self._task = loop.create_task(self._watch(), name="broker-cache-watcher")

    async def _watch(self) -> None:
        try:
            async with self.broker.session() as db:
                since = int(await db.scalar(select(func.max(Event.id))) or 0)
            self._cursor = Cursor(
                since, rescan=not self.broker.database.is_sqlite, floor=max(0, since - 1000)
            )
            # Anything cached before the watcher ran may be stale: start empty.
            self.entries.clear()
            while True:
                started = time.monotonic()
                await self._poll(started)
                self._trusted_until = started + MAX_STALENESS
                await asyncio.sleep(POLL_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The database is failing: stop trusting the cache; the next read restarts us.
            self._trusted_until = 0.0
            log.warning(
                "credential cache watcher stopped (%s); reading through", type(exc).__name__
            )

    async def _poll(self, started: float) -> None:
        cursor = self._cursor
        async with self.broker.session() as db:
            rows = (
                await db.execute(
                    select(Event.id, Event.group_id, Event.integration)
                    .where(Event.id > cursor.floor(started))
                    .order_by(Event.id)
                )
            ).all()
        fresh = cursor.take([row[0] for row in rows], started)
        if fresh:
            self.invalidate((g, i) for n, g, i in rows if n in fresh)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.clear()
