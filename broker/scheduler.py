"""The refresh sweep: one APScheduler job that refreshes what is due, on every replica.

Every ``refresh.interval_seconds`` the sweep leases batches of connections whose
``next_refresh_at`` has come (``Repository.claim_due``: an index range scan; ``SKIP LOCKED``
on PostgreSQL so replicas take disjoint batches) and refreshes them through the same
single-flight path as on-demand requests, at most ``refresh.max_concurrency`` at a time.
Then it sends due webhook deliveries, and deletes what has outlived its use: events past
their retention (a bounded amount per sweep: ``retention``), sign-in flows and connect
sessions whose time ran out. One job, never one job per connection; APScheduler runs at
most one instance of it at a time and coalesces missed runs.

Beside it, ``lapses.LapseWatch`` brings the sweep forward when a lease another holder left
behind (it stopped mid-refresh) runs out, so that refresh is retried at once, not up to an
interval later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.exc import DBAPIError

from .admin import prune_admin_grants
from .credentials import ANSWERED
from .errors import BrokerError
from .lapses import LapseWatch
from .logs import fields
from .oauth.flows import FLOW_TTL, prune_flows
from .retention import Pruned, prune
from .sessions import prune_sessions
from .store.models import Connection
from .webhooks import deliver_due

if TYPE_CHECKING:
    from .runtime import Broker

__all__ = ["Refresher", "SweepResult", "prune_expired", "sweep"]

log = logging.getLogger("broker.refresh")
SWEEP_JOB = "broker-refresh-sweep"


@dataclass
class SweepResult:
    claimed: int = 0
    refreshed: int = 0
    """Connections that got a new token."""
    failed: int = 0
    """Connections whose refresh failed, including those whose still-valid token was kept."""
    delivered: int = 0
    pruned: Pruned = field(default_factory=Pruned)
    """Events and webhook deliveries deleted by retention (``prune_expired``)."""
    pruned_flows: int = 0
    """Sign-in flows (and unredeemed tickets) removed because their time ran out."""
    pruned_sessions: int = 0
    """Connect sessions removed because they expired."""


async def sweep(
    broker: Broker, *, max_rows: int | None = None, stop: asyncio.Event | None = None
) -> SweepResult:
    """Refresh every connection that is due now, ``refresh.max_concurrency`` at a time
    (at most ``max_rows`` of them, by default 400 x ``max_concurrency``, so one sweep
    ends; ``stop`` set: no more).

    A pipeline, not batches: a refresh starts as soon as another's token request is over
    (``max_concurrency`` bounds the token requests in flight; a refresh whose provider has
    answered stores its answer while the next one asks: ``credentials.ANSWERED``). Rows are
    leased a little ahead (up to ``max_concurrency`` waiting, claimed together with their
    data), so a refresh needs no read of its own and a lease is renewed only when its row
    waited too long for its turn (``refresh.lease_covers``).
    """
    result = SweepResult()
    limit = broker.settings.refresh.max_concurrency
    budget = max_rows if max_rows is not None else 400 * limit
    credentials = broker.tokens
    # As long as the longest per-refresh lease (``refresh.lease_seconds``), not a fixed minute:
    # rows a crashed sweeper had claimed are free again about as soon as its requests would
    # have timed out.
    lease = timedelta(
        seconds=max((credentials._lease_seconds(i) for i in broker.registry), default=60.0)
    )

    async def one(row: Connection) -> None:
        group_id, key = row.group_id, row.integration
        if key not in broker.registry:
            # The provider was disabled: park it until a broker with the provider opens.
            async with broker.session() as db, db.begin():
                await broker.repository.park(db, group_id, key, owner=credentials.owner)
            return
        try:
            if await credentials.refresh_claimed(group_id, broker.registry.get(key), row):
                result.refreshed += 1
            else:  # the refresh failed and the still-valid token was kept (an event says so)
                result.failed += 1
        except BrokerError:
            result.failed += 1  # recorded as an event; the connection was rescheduled
        except (DBAPIError, OSError) as exc:
            # The store failed: the lease runs out and a later sweep tries again.
            result.failed += 1
            log.warning("refresh of %s/%s: database error (%s)", group_id, key,
                        type(exc).__name__,
                        extra=fields(event="refresh", group=group_id, integration=key,
                                     outcome="database_error"))
        except Exception:
            result.failed += 1
            log.exception("refresh of %s/%s crashed", group_id, key,
                          extra=fields(event="refresh", group=group_id, integration=key,
                                       outcome="crashed"))

    waiting: deque[Connection] = deque()
    more = True
    claiming = asyncio.Lock()
    claim_failed: Exception | None = None

    def stopping() -> bool:
        return stop is not None and stop.is_set()

    def wants_more() -> bool:
        return more and not stopping() and len(waiting) < limit and result.claimed < budget

    async def claim() -> None:
        nonlocal more, claim_failed
        want = min(2 * limit - len(waiting), budget - result.claimed)
        try:
            async with broker.database.write() as db:
                due = await broker.repository.claim_due(
                    db,
                    owner=credentials.owner,
                    until=broker.now() + lease,
                    limit=want,
                    skip_locked=not broker.database.is_sqlite,
                )
        except Exception as exc:
            # No more claims in this sweep; the refreshes under way finish (their answers
            # must be stored), then the sweep raises it.
            claim_failed, more, due = exc, False, []
        result.claimed += len(due)
        waiting.extend(due)
        # Fewer than asked: that was all that was due. What falls due meanwhile is the
        # next sweep's (with short-lived tokens there always is some).
        more = more and len(due) == want

    async def next_row() -> Connection | None:
        while not stopping():
            if wants_more() and not claiming.locked():
                async with claiming:  # one claim at a time; the others go on meanwhile
                    await claim()
            elif waiting:
                return waiting.popleft()
            elif claiming.locked():
                async with claiming:  # nothing left here: wait for the claim under way
                    pass
            else:
                return None
        return None

    slots = asyncio.Semaphore(limit)

    async def worker() -> None:
        # Stopping: no new refresh starts; the one in hand finishes and stores its answer.
        while True:
            await slots.acquire()
            freed = False

            def answered() -> None:
                nonlocal freed
                if not freed:
                    freed = True
                    slots.release()

            try:
                row = await next_row()
                if row is None:
                    return
                token = ANSWERED.set(answered)
                try:
                    await one(row)
                finally:
                    ANSWERED.reset(token)
            finally:
                answered()

    try:
        # Twice as many workers as slots: while one stores, another asks the provider.
        await asyncio.gather(*(worker() for _ in range(2 * limit)))
    finally:
        if waiting:  # stopping (or cancelled): give back the leases of rows never started
            await _give_back(broker, waiting)
    if claim_failed is not None:
        raise claim_failed
    if stop is None or not stop.is_set():
        result.delivered = await deliver_due(broker)
        await prune_expired(broker, result)
    return result


async def prune_expired(broker: Broker, result: SweepResult) -> None:
    """The sweep's last step: delete events past their retention (and their finished
    webhook deliveries), bounded per sweep (see ``retention``), and sign-in flows and
    connect sessions whose time ran out. Counts go in ``result``. A failing database is
    logged, not raised: the refreshes are done, and the next sweep prunes instead."""
    try:
        result.pruned = await prune(broker)
        broker.metrics.events_pruned.inc(result.pruned.events)
        result.pruned_flows, result.pruned_sessions = await prune_flows_and_sessions(broker)
    except (DBAPIError, OSError) as exc:
        log.warning("pruning failed (%s); the next sweep tries again", type(exc).__name__)
        result.pruned.complete = False
        return
    pruned = result.pruned
    if pruned.events:
        log.info(
            "retention: deleted %d events and %d webhook deliveries%s",
            pruned.events, pruned.deliveries, "" if pruned.complete else " (more next sweep)",
        )


async def prune_flows_and_sessions(broker: Broker, *, limit: int = 1000) -> tuple[int, int]:
    """Remove sign-in flows and connect sessions whose time ran out (at most ``limit`` of
    each per sweep: they are capped per session where they are made, so a sweep every
    ``refresh.interval_seconds`` keeps up), and the operators' ``/admin`` links and
    sessions (counted with the sessions). Flows stay ``FLOW_TTL`` past their expiry, so
    a callback just too late is told so rather than that its flow does not exist.
    Returns ``(flows, sessions)`` removed."""
    now = broker.now()
    async with broker.session() as db, db.begin():
        flows = await prune_flows(db, now=now - FLOW_TTL, limit=limit)
        sessions = await prune_sessions(db, now=now, limit=limit)
        sessions += await prune_admin_grants(db, now=now)  # a handful: operators' links
    return flows, sessions


async def _give_back(broker: Broker, rows: deque[Connection]) -> None:
    """Release the leases of rows claimed but never started (the sweep is stopping)."""
    owner = broker.tokens.owner
    try:
        async with broker.session() as db, db.begin():
            for row in rows:
                await broker.repository.release(db, row.group_id, row.integration, owner=owner)
    except (DBAPIError, OSError) as exc:
        log.warning("could not release %d unstarted leases (%s); they run out on their own",
                    len(rows), type(exc).__name__)


class Refresher:
    """Runs ``sweep`` every ``refresh.interval_seconds`` on an AsyncIOScheduler."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.scheduler = AsyncIOScheduler()
        self.scheduler.add_job(
            self._run,
            "interval",
            seconds=broker.settings.refresh.interval_seconds,
            id=SWEEP_JOB,
            max_instances=1,
            coalesce=True,
            next_run_time=broker.now(),
        )
        self._stop = asyncio.Event()
        self._job: asyncio.Task[None] | None = None
        self._lapses = LapseWatch(broker, self._sweep_now)

    async def _run(self) -> None:
        self._job = asyncio.current_task()
        try:
            started = time.perf_counter()
            await self.broker.calibrate_clock()
            result = await sweep(self.broker, stop=self._stop)
            took = time.perf_counter() - started
        except Exception:
            log.exception("refresh sweep failed; it will run again")
            return
        # A sweep that found nothing to do says so at debug only (one a second is noise).
        log.log(
            logging.INFO if result.claimed or result.delivered else logging.DEBUG,
            "sweep: %d due, %d refreshed, %d failed, %d webhooks delivered in %.0f ms",
            result.claimed, result.refreshed, result.failed, result.delivered, took * 1000,
            extra=fields(event="sweep", count=result.claimed, duration=took),
        )

    def start(self) -> None:
        self.scheduler.start()
        self._lapses.start()

    def stop(self) -> None:
        """Stop at once: a sweep in progress is cancelled (see ``aclose``)."""
        self._lapses.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    async def aclose(self) -> None:
        """Stop gracefully: no new sweep or batch, and the token requests in flight are
        awaited (at most one lease long) and their answers stored. Cancelling them would
        lose answers the provider may already have acted on: at a provider that rotates
        refresh tokens, that connection would need to be connected again."""
        self._stop.set()
        await self._lapses.aclose()
        if self.scheduler.running:
            self.scheduler.pause()
        job = self._job
        if job is not None and not job.done():
            credentials = self.broker.tokens
            longest = max(
                (credentials._lease_seconds(i) for i in self.broker.registry), default=60.0
            )
            await asyncio.wait({job}, timeout=longest)
        self.stop()

    # --- a lease that ran out unreleased (lapses.LapseWatch) ------------------------------

    async def _sweep_now(self) -> None:
        """Run the sweep at once (after the one running, if any): a lease another holder
        left behind has run out. The sweep job is brought forward, not run beside it: one
        sweep at a time, and the next regular one comes an interval after this one."""
        running = self._job
        if running is not None and not running.done():
            await asyncio.wait({running})
        if self._stop.is_set() or not self.scheduler.running:
            return
        self.scheduler.modify_job(SWEEP_JOB, next_run_time=datetime.now(UTC))
