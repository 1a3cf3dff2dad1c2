"""Retrying a refresh whose holder stopped, as soon as its lease runs out.

A refresher that dies mid-refresh (SIGKILL, out of memory, a lost node) leaves its leases
behind: the connections it was refreshing wait for them to run out
(``refresh.lease_seconds``), and the sweep takes them over then. But the sweep runs every
``refresh.interval_seconds``: on its own it could come a whole interval later. At a provider
that rotates refresh tokens, that is the difference between keeping the connection and
losing it: the refresh token the next attempt presents is the one the provider already
rotated for the request that was cut off, and providers with a reuse grace period (Okta,
Auth0, Xero) accept it only for a while.

``LapseWatch`` runs beside the sweep in every refresher. It looks for the earliest lease
another holder has on a connection due for refresh (``Repository.next_lapse``: a range of
the due-index, like the sweep's claim), sleeps until just after that lease runs out
(``refresh.next_look``), looks again, and if the lease is still there (its holder never
released it), has the sweep run at once. It looks at least every third of a lease, so a
stopped holder's lease is seen before it runs out; a healthy holder's lease, released
within a request's time, is gone by the time the watch gets there. It never watches its
own process's leases, and costs one indexed query per look.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from .refresh import next_look

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = ["LapseWatch"]

log = logging.getLogger("broker.refresh")


class LapseWatch:
    """Calls ``sweep_now`` as soon as a lease another holder took on a due connection
    runs out unreleased (see the module docstring)."""

    def __init__(self, broker: Broker, sweep_now: Callable[[], Awaitable[None]]) -> None:
        self.broker = broker
        self.sweep_now = sweep_now
        self._task: asyncio.Task[None] | None = None

    @property
    def every(self) -> float:
        """Seconds between looks when no lease runs out sooner: a third of the longest
        lease (the sweep leases every row for that long)."""
        credentials = self.broker.tokens
        lease = max((credentials._lease_seconds(i) for i in self.broker.registry), default=60.0)
        return lease / 3

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name="broker-lease-watch"
            )

    def stop(self) -> None:
        """Stop at once (a sweep it started runs on)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def aclose(self) -> None:
        """Stop, and wait until the watch has let go of its database connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self) -> None:
        broker = self.broker
        # Leases that ran out before now are the first sweep's (it runs at start); from
        # then on, a lease that runs out makes one sweep run, once.
        after = broker.now()
        while True:
            try:
                async with broker.session() as db:
                    lapse = await broker.repository.next_lapse(
                        db, owner=broker.tokens.owner, after=after
                    )
            except (DBAPIError, OSError) as exc:
                log.warning("lease watch: database error (%s); looking again later",
                            type(exc).__name__)
                lapse = None
            except Exception:  # never die quietly: the sweep goes on, and so does the watch
                log.exception("lease watch failed; looking again later")
                lapse = None
            now = broker.now()
            lapse_in = None if lapse is None else (lapse - now).total_seconds()
            if lapse_in is not None and lapse_in <= 0:
                log.info("a refresh lease ran out unreleased (its holder stopped): sweeping now")
                after = now
                await self.sweep_now()
                continue
            await asyncio.sleep(next_look(lapse_in, every=self.every))
