"""The crash window of a refresh: from the provider's answer to its commit.

At a provider that rotates refresh tokens, a refresh whose answer has arrived but is not yet
committed is lost if its process dies (SIGKILL, OOM): the new refresh token dies with it and
the old one has been retired. How long that lasts is what this measures, under load.

    python -m bench.window [--quick] [--postgres]

Connections are stored due (``bench.common.add_oauth``) for the inline ``acme`` provider at
``bench.tokenserver`` (its own process, on the other core; it answers after ``DELAY_MS``),
and ``sweep(broker)`` refreshes them, ``refresh.max_concurrency`` at a time, as in
production. Two instruments, nothing in the broker changed:

- the token requests go through a transport wrapped around ``broker.token_transport`` that
  notes when each answer has been read (keyed by the new refresh token in it);
- a ``BrokerSession`` ``after_commit`` listener notes when the transaction that stored that
  refresh token committed (``Repository.store_refreshed`` is wrapped to tell which tokens a
  transaction holds).

The window of a refresh is the second time minus the first, reported with its parts: the
answer handed to ``RefreshWriter.store`` (parsing, the row to store), the wait for a
transaction to take it (the one running, if any: writes are never held back for more), and
that transaction. Baseline, in the same run: one ``store_refreshed`` transaction of one
row, alone (``Database.write`` to commit), the least the database takes for the write.
Not part of ``python -m bench`` (no target to meet: it is the figure README's "A refresh
cut off by a crash" quotes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event, update

from .common import (
    PG_ENV,
    TokenServer,
    add_oauth,
    group_of,
    load,
    median,
    percentile,
    pinned,
    scratch_postgres,
    sqlite_url,
    table,
    two_cores,
    utcnow,
    write_config,
)

CONCURRENCY = 10
DELAY_MS = 50


class _Timed(httpx.AsyncBaseTransport):
    """Notes when each token answer has been read, by the refresh token it carries."""

    def __init__(self, inner: httpx.AsyncBaseTransport, answered: dict[str, float]) -> None:
        self.inner = inner
        self.answered = answered

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        self.answered[json.loads(body)["refresh_token"]] = time.perf_counter()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Marks:
    """When each refresh (by its new refresh token) reached each point."""

    answered: dict[str, float] = field(default_factory=dict)  # the answer was read
    queued: dict[str, float] = field(default_factory=dict)  # handed to the writer
    begun: dict[str, float] = field(default_factory=dict)  # its transaction began
    committed: dict[str, float] = field(default_factory=dict)  # ... and committed
    batches: list[int] = field(default_factory=list)  # rows per transaction


def _instrument(broker: Any) -> tuple[Marks, Callable[[], None]]:
    """Install the instruments; returns what they note, and how to remove them."""
    from broker.store.database import BrokerSession

    marks = Marks()
    broker.token_transport = _Timed(broker.token_transport, marks.answered)
    store_rows = broker.repository.store_refreshed

    async def store_refreshed(db: Any, items: Sequence[Any]) -> Any:
        db.info.setdefault("bench.window", []).extend(i.data["refresh_token"] for i in items)
        return await store_rows(db, items)

    broker.repository.store_refreshed = store_refreshed
    writer = broker.tokens.writer
    store_item, write_batch = writer.store, writer._write

    async def store(item: Any) -> Any:
        marks.queued[item.data["refresh_token"]] = time.perf_counter()
        return await store_item(item)

    async def write(batch: Any) -> Any:
        now = time.perf_counter()
        marks.batches.append(len(batch))
        for item, _ in batch:
            marks.begun.setdefault(item.data["refresh_token"], now)
        return await write_batch(batch)

    writer.store, writer._write = store, write

    def after_commit(session: Any) -> None:
        now = time.perf_counter()
        for token in session.info.pop("bench.window", ()):
            marks.committed[token] = now

    def after_rollback(session: Any) -> None:
        session.info.pop("bench.window", None)

    event.listen(BrokerSession, "after_commit", after_commit)
    event.listen(BrokerSession, "after_rollback", after_rollback)

    def remove() -> None:
        event.remove(BrokerSession, "after_commit", after_commit)
        event.remove(BrokerSession, "after_rollback", after_rollback)

    return marks, remove


def _spread(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"median": median(ms), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "max": max(ms)}


async def _alone(broker: Any, rounds: int) -> list[float]:
    """One row's ``store_refreshed`` transaction, nothing else running (seconds)."""
    from sqlalchemy import select

    from broker.store.models import Connection
    from broker.store.repository import Refreshed

    times = []
    for _ in range(rounds):
        async with broker.session() as db:
            row = (await db.scalars(select(Connection).limit(1))).one()
        data = broker.keyring.open(row.group_id, row.integration, row.credential)
        async with broker.database.write() as db:
            claimed = await broker.repository.claim(
                db, row.group_id, row.integration, owner=broker.tokens.owner,
                until=broker.now() + timedelta(seconds=30),
            )
        assert claimed is not None
        item = Refreshed(
            claimed.id, row.group_id, row.integration, claimed.version, data,
            expires_at=None, next_refresh_at=utcnow() + timedelta(hours=1),
            lease_owner=broker.tokens.owner,
        )
        started = time.perf_counter()
        async with broker.database.write() as db:
            stored = await broker.repository.store_refreshed(db, [item])
        times.append(time.perf_counter() - started)
        assert list(stored) == [True]
    return times


async def scenario(root: Path, label: str, database_url: str, token_url: str, count: int,
                   sweeps: int) -> dict[str, Any]:
    from broker.runtime import Broker
    from broker.scheduler import sweep
    from broker.store.models import Connection

    root.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (setup, not timed)
    config = write_config(
        root, database_url=database_url, token_url=token_url,
        refresh={"max_concurrency": CONCURRENCY},
    )
    broker = await Broker.open(load(config))
    try:
        groups = [group_of(i) for i in range(count)]
        await add_oauth(broker, groups, expires_at=utcnow() + timedelta(minutes=30),
                        next_refresh_at=utcnow() - timedelta(seconds=5))
        baseline = await _alone(broker, 50)
        marks, remove = _instrument(broker)
        refreshed = 0
        started = time.perf_counter()
        try:
            for _ in range(sweeps):
                async with broker.session() as db, db.begin():
                    await db.execute(update(Connection).values(
                        next_refresh_at=utcnow() - timedelta(seconds=5)))
                refreshed += (await sweep(broker)).refreshed
        finally:
            remove()
        elapsed = time.perf_counter() - started
    finally:
        await broker.close()
    done = [t for t in marks.committed if t in marks.answered]
    assert len(done) == refreshed == count * sweeps, (len(done), refreshed)
    window = _spread([marks.committed[t] - marks.answered[t] for t in done])
    alone = _spread(baseline)
    return {
        "store": label, "refreshes": refreshed, "per_s": refreshed / elapsed,
        "window_ms": window,
        "parts_ms": {  # the window, part by part
            "answer_to_writer": _spread([marks.queued[t] - marks.answered[t] for t in done]),
            "waiting_for_a_transaction": _spread(
                [marks.begun[t] - marks.queued[t] for t in done]),
            "transaction": _spread([marks.committed[t] - marks.begun[t] for t in done]),
        },
        "rows_per_transaction": sum(marks.batches) / len(marks.batches),
        "store_alone_ms": alone,
        "ratio_median": window["median"] / alone["median"],
    }


async def main_async(quick: bool, postgres: bool) -> list[dict[str, Any]]:
    cores = two_cores()
    broker_cpu, server_cpu = cores if cores else (None, None)
    count, sweeps = (200, 2) if quick else (500, 4)
    results = []
    with TokenServer(cpu=server_cpu) as server, tempfile.TemporaryDirectory(
        prefix="broker-window-"
    ) as tmp, pinned(broker_cpu):
        root = Path(tmp)
        token_url = server.url(DELAY_MS)
        results.append(await scenario(
            root / "sqlite", "SQLite", sqlite_url(root / "sqlite" / "broker.db"), token_url,
            count, sweeps,
        ))
        pg = os.environ.get(PG_ENV)
        if postgres and pg:
            async with scratch_postgres(pg) as url:
                results.append(await scenario(
                    root / "pg", "PostgreSQL", url, token_url, count, sweeps,
                ))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.window",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--postgres", action="store_true", help=f"also PostgreSQL ({PG_ENV})")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    results = asyncio.run(main_async(args.quick, args.postgres))
    print(table(
        f"Answer-to-commit window of a refresh (sweep, max_concurrency {CONCURRENCY}, "
        f"endpoint {DELAY_MS} ms), ms",
        ["store", "refreshes", "per s", "median", "p90", "p99", "max",
         "parts (medians): to writer / waiting / transaction", "rows per txn",
         "one store alone", "median / alone"],
        [[r["store"], r["refreshes"], r["per_s"], r["window_ms"]["median"],
          r["window_ms"]["p90"], r["window_ms"]["p99"], r["window_ms"]["max"],
          " / ".join(f"{p['median']:.2f}" for p in r["parts_ms"].values()),
          r["rows_per_transaction"], r["store_alone_ms"]["median"],
          f"{r['ratio_median']:.1f}x"] for r in results],
    ))
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
