"""4. Scale: the sweep's due-query with 10,000 and with 1,000,000 connections stored (100 due
in both), and the peak RSS of the process that runs the sweep.

Each store is migrated by ``Broker.open``; then the rows go in fast: stdlib ``sqlite3``
``executemany`` (PostgreSQL: ``COPY``), one real sealed token reused for the rows that are
not due, and a real sealed token per due row (the sweep really refreshes those). The rows not
due fall due 1 to 30 days later (none during the run).

1. Timing, in one fresh subprocess (``python -m bench.scale time``) with both stores open:
   the SQL ``Repository.claim_due`` emits is captured and ``EXPLAIN``-ed (the index must be
   used); then ``claim_due`` (limit 40, what the sweep asks) runs in a transaction that is
   rolled back - so every repetition sees the same 100 due rows - alternating small and
   large store. Figure: median time at 1M / median time at 10k. The claim's subquery (the
   due SELECT) is also timed alone.
2. RSS, one fresh subprocess per store (``python -m bench.scale sweep``): open the broker,
   run ``sweep(broker)`` for real against the loopback token endpoint (all 100 refreshed),
   report ``ru_maxrss`` (and ``VmHWM``). It is started through ``/bin/sh`` (which forks
   it): on Linux a process's ``ru_maxrss`` keeps the peak of the memory image it replaced
   at ``exec``, so a child spawned straight from this (large) process would report this
   process's peak, not its own.

Targets: due-query time 1M / 10k <= 2; peak RSS at 1M <= 200 MB.
Quick mode uses 1,000 and 20,000 rows.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import sqlite3
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .common import (
    OAUTH,
    Options,
    TokenServer,
    group_of,
    load,
    median,
    oauth_token,
    run_child_json,
    save,
    scratch_postgres_sync,
    sqlite_url,
    table,
    verdict,
    write_config,
)

NAME = "scale"
DUE = 100
TARGET_RATIO = 2.0
TARGET_RSS_MB = 200.0
# The rows not due fall due between 1 and 30 days from now: none during the run (they hold a
# token sealed for another row, which a refresh would find corrupt).
NOT_DUE_WITHIN = (86_400.0, 30 * 86_400.0)
COLUMNS = (
    "group_id, integration, auth_type, status, credential, key_id, version, hint, created_at, "
    "updated_at, expires_at, next_refresh_at, lease_owner, lease_expires_at, failure_count, "
    "last_error"
)


def stamp(value: datetime) -> str:
    """How SQLAlchemy stores a UTC datetime in SQLite."""
    return value.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


async def migrate_and_seal(config: Path, due_groups: list[str]) -> tuple[str, dict[str, str]]:
    """Migrate the empty store; seal one token to reuse and one per due connection."""
    from broker.runtime import Broker

    broker = await Broker.open(load(config))
    try:
        now = broker.now()
        shared = broker.keyring.seal("g-shared", OAUTH, oauth_token(now)).token
        sealed = {g: broker.keyring.seal(g, OAUTH, oauth_token(now)).token for g in due_groups}
        return broker.keyring.primary_key_id, {"": shared, **sealed}
    finally:
        await broker.close()


def fill(path: Path, size: int, due_groups: set[str], key_id: str, tokens: dict[str, str],
         seed: int) -> float:
    rng = random.Random(seed)  # noqa: S311 (row spread, not secrets)
    now = datetime.now(UTC)
    created = stamp(now)
    due_at = stamp(now - timedelta(minutes=1))
    expires_due = stamp(now + timedelta(minutes=5))
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    started = time.perf_counter()

    def rows() -> Any:
        for i in range(size):
            group = group_of(i)
            if group in due_groups:
                yield (group, OAUTH, "oauth2", "connected", tokens[group], key_id, 1, "{}",
                       created, created, expires_due, due_at, None, None, 0, None)
            else:
                ahead = rng.uniform(*NOT_DUE_WITHIN)
                yield (group, OAUTH, "oauth2", "connected", tokens[""], key_id, 1, "{}",
                       created, created, stamp(now + timedelta(seconds=ahead + 120)),
                       stamp(now + timedelta(seconds=ahead)), None, None, 0, None)

    with con:
        con.executemany(
            f"INSERT INTO connections ({COLUMNS}) VALUES ({', '.join('?' * 16)})",  # noqa: S608
            rows(),
        )
    con.execute("ANALYZE")
    con.close()
    return time.perf_counter() - started


async def fill_postgres(url: str, size: int, due_groups: set[str], key_id: str,
                        tokens: dict[str, str], seed: int) -> tuple[float, float]:
    """The same rows into PostgreSQL with COPY; (seconds, table size in MB)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    rng = random.Random(seed)  # noqa: S311 (row spread, not secrets)
    now = datetime.now(UTC)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    try:
        records = []
        for i in range(size):
            group = group_of(i)
            if group in due_groups:
                expires, due, token = (now + timedelta(minutes=5), now - timedelta(minutes=1),
                                       tokens[group])
            else:
                ahead = timedelta(seconds=rng.uniform(*NOT_DUE_WITHIN))
                expires, due, token = now + ahead + timedelta(minutes=2), now + ahead, tokens[""]
            records.append((group, OAUTH, "oauth2", "connected", token, key_id, 1, "{}", now,
                            now, expires, due, None, None, 0, None))
        await conn.copy_records_to_table(
            "connections", records=records, columns=[c.strip() for c in COLUMNS.split(",")]
        )
        await conn.execute("ANALYZE connections")
        mb = await conn.fetchval("SELECT pg_total_relation_size('connections')") / 2**20
    finally:
        await conn.close()
    return time.perf_counter() - started, mb


def build(opts: Options, server: TokenServer, directory: Path, database_url: str, size: int,
          db_file: Path | None) -> dict[str, Any]:
    """A migrated store with ``size`` connections, ``DUE`` of them due; its config."""
    directory.mkdir(parents=True)
    config = write_config(directory, database_url=database_url, token_url=server.url(0))
    step = size // DUE
    due_groups = [group_of(i * step + step // 2) for i in range(DUE)]
    key_id, tokens = asyncio.run(migrate_and_seal(config, due_groups))
    if db_file is not None:
        fill_s = fill(db_file, size, set(due_groups), key_id, tokens, opts.seed)
        db_mb = db_file.stat().st_size / 2**20
    else:
        fill_s, db_mb = asyncio.run(
            fill_postgres(database_url, size, set(due_groups), key_id, tokens, opts.seed)
        )
    return {"size": size, "config": str(config), "fill_seconds": fill_s, "store_mb": db_mb}


def run(opts: Options) -> dict[str, Any]:
    sizes = opts.pick([1_000, 20_000], [10_000, 1_000_000])
    repeat = opts.pick(10, 60)
    stores: dict[str, Any] = {}
    with TokenServer() as server, tempfile.TemporaryDirectory(
        prefix="broker-bench-"
    ) as tmp, ExitStack() as stack:
        root = Path(tmp)
        built: dict[str, list[dict[str, Any]]] = {"sqlite": []}
        for size in sizes:
            directory = root / f"sqlite-{size}"
            db = directory / "broker.db"
            built["sqlite"].append(build(opts, server, directory, sqlite_url(db), size, db))
        if opts.pg_url:
            built["postgresql"] = []
            for size in sizes:
                url = stack.enter_context(scratch_postgres_sync(opts.pg_url))
                built["postgresql"].append(
                    build(opts, server, root / f"pg-{size}", url, size, None)
                )
        for store, (small, big) in built.items():
            timing = run_child_json(
                "bench.scale", "time", small["config"], big["config"], str(repeat)
            )
            for entry in (small, big):
                before = server.count()
                entry.update(
                    run_child_json("bench.scale", "sweep", entry["config"], via_shell=True)
                )
                entry["token_requests"] = server.count() - before
            stores[store] = {"small": small, "big": big, "timing": timing}
    data = summarize(stores, sizes, repeat)
    save(opts, NAME, data)
    return data


def summarize(stores: dict[str, Any], sizes: list[int], repeat: int) -> dict[str, Any]:
    rows = []
    notes = []
    summary: dict[str, Any] = {}
    for store, v in stores.items():
        timing = v["timing"]
        ratio = timing["claim_due_ratio"]
        rss = v["big"]["maxrss_mb"]
        summary[store] = {
            "claim_due_ratio": ratio, "maxrss_mb": rss, "uses_index": timing["uses_index"],
            "refreshed": [v[k]["sweep"]["refreshed"] for k in ("small", "big")],
            "claimed": [v[k]["sweep"]["claimed"] for k in ("small", "big")],
            "failed": [v[k]["sweep"]["failed"] for k in ("small", "big")],
            "token_requests": [v[k]["token_requests"] for k in ("small", "big")],
        }
        for k, t in (("small", "small"), ("big", "big")):
            e = v[k]
            rows.append([
                store, f"{e['size']:,}", f"{e['store_mb']:.0f}", e["sweep"]["claimed"],
                e["sweep"]["refreshed"], f"{timing[t]['claim_due_median_s'] * 1000:.2f}",
                f"{timing[t]['select_median_s'] * 1000:.3f}", f"{e['maxrss_mb']:.0f}",
                "yes" if timing[t]["uses_index"] else "NO",
            ])
        notes += [
            f"{store}: claim_due time {sizes[1]:,} / {sizes[0]:,} = **{ratio:.2f}x** "
            f"({verdict(ratio, TARGET_RATIO, at_least=False)}, target <= {TARGET_RATIO}; median "
            f"of paired ratios {timing['paired_ratio_median']:.2f}x); the due SELECT alone "
            f"{timing['select_ratio']:.2f}x. Peak RSS of the sweeping process at {sizes[1]:,}: "
            f"**{rss:.0f} MB** ({verdict(rss, TARGET_RSS_MB, at_least=False)}, target <= "
            f"{TARGET_RSS_MB:.0f} MB).",
            f"{store}: plan at {sizes[1]:,}: "
            + " / ".join(p for p in timing["big"]["plan"] if re.search(r"SCAN|SEARCH|Scan", p)),
        ]
    notes.append(
        f"claim_due: Repository.claim_due (limit 40) in a transaction rolled back each time, "
        f"{repeat} times per store alternating small/large (first of each discarded), in one "
        "fresh process. Peak RSS: ru_maxrss of a fresh process that opened the broker and ran "
        "sweep(broker) to completion."
    )
    data: dict[str, Any] = {
        "sizes": sizes, "due": DUE, "repeat": repeat, "stores": stores,
        "targets": {"ratio": TARGET_RATIO, "rss_mb": TARGET_RSS_MB}, "summary": summary,
    }
    data["table"] = table(
        f"4. Scale: due-query and peak RSS with {sizes[0]:,} and {sizes[1]:,} connections "
        f"({DUE} due)",
        ["store", "connections", "store MB", "claimed", "refreshed",
         "claim_due ms (scale only)", "due SELECT ms", "peak RSS MB", "index used"],
        rows, notes=notes,
    )
    return data


# --- the child processes ----------------------------------------------------------------------


class Probe:
    """One open broker: its claim_due SQL, plan, and timings."""

    def __init__(self, broker: Any) -> None:
        from sqlalchemy import event

        self.broker = broker
        self.captured: list[tuple[str, Any]] = []
        self.claim_times: list[float] = []
        self.select_times: list[float] = []
        self.claimed = 0
        event.listen(broker.database.engine.sync_engine, "before_cursor_execute", self._capture)

    def _capture(self, conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if "next_refresh_at <=" in statement and statement.startswith("UPDATE"):
            self.captured.append((statement, params))

    async def claim(self) -> None:
        broker = self.broker
        async with broker.session() as db:
            tx = await db.begin()
            started = time.perf_counter()
            due = await broker.repository.claim_due(
                db, owner="bench", until=broker.now() + timedelta(minutes=1),
                limit=broker.settings.refresh.max_concurrency * 4,
                skip_locked=not broker.database.is_sqlite,
            )
            self.claim_times.append(time.perf_counter() - started)
            self.claimed = len(due)
            await tx.rollback()

    async def plan_and_select(self, repeat: int) -> list[str]:
        """EXPLAIN the captured claim; time its subquery (the due SELECT) alone."""
        statement, params = self.captured[-1]
        select_sql = statement[statement.index("SELECT"):statement.rindex(")")]
        select_params = tuple(params)[2:]  # after the two SET parameters
        if self.broker.database.is_sqlite:
            con = sqlite3.connect(self.broker.settings.sqlite_path())
            plan = [row[-1] for row in con.execute("EXPLAIN QUERY PLAN " + statement, params)]
            for _ in range(repeat):
                started = time.perf_counter()
                con.execute(select_sql, select_params).fetchall()
                self.select_times.append(time.perf_counter() - started)
            con.close()
            return plan
        # PostgreSQL: the subquery without FOR UPDATE (outside a transaction it would commit
        # row locks, timing a WAL flush), renumbered from $1.
        select_sql = re.sub(r"\$(\d+)", lambda m: f"${int(m[1]) - 2}", select_sql)
        select_sql = select_sql.replace(" FOR UPDATE SKIP LOCKED", "")
        async with self.broker.database.engine.connect() as conn:
            pg = (await conn.get_raw_connection()).driver_connection
            assert pg is not None
            plan = [r[0].strip() for r in await pg.fetch("EXPLAIN " + statement, *params)]
            for _ in range(repeat):
                started = time.perf_counter()
                await pg.fetch(select_sql, *select_params)
                self.select_times.append(time.perf_counter() - started)
        return plan

    def result(self, plan: list[str]) -> dict[str, Any]:
        return {
            "claim_due_times_s": self.claim_times,
            "claim_due_median_s": median(self.claim_times[1:]),
            "claimed_per_call": self.claimed,
            "select_median_s": median(self.select_times[1:]),
            "plan": plan,
            "uses_index": any("ix_connections_next_refresh_at" in p for p in plan),
            "sql": self.captured[-1][0],
        }


async def time_child(small_config: Path, big_config: Path, repeat: int) -> dict[str, Any]:
    from broker.runtime import Broker

    small = Probe(await Broker.open(load(small_config)))
    big = Probe(await Broker.open(load(big_config)))
    try:
        for i in range(repeat):
            for probe in (small, big) if i % 2 == 0 else (big, small):
                await probe.claim()
        small_plan = await small.plan_and_select(repeat)
        big_plan = await big.plan_and_select(repeat)
    finally:
        await small.broker.close()
        await big.broker.close()
    paired = [b / s for s, b in zip(small.claim_times[1:], big.claim_times[1:], strict=True)]
    out = {"small": small.result(small_plan), "big": big.result(big_plan)}
    return {
        **out,
        "claim_due_ratio": out["big"]["claim_due_median_s"] / out["small"]["claim_due_median_s"],
        "paired_ratio_median": median(paired),
        "select_ratio": out["big"]["select_median_s"] / out["small"]["select_median_s"],
        "uses_index": out["small"]["uses_index"] and out["big"]["uses_index"],
    }


def peak_rss_kb() -> int | None:
    """``VmHWM``: the peak RSS of this process image (Linux), None elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+)", text)
    return int(found[1]) if found else None


async def sweep_child(config: Path) -> dict[str, Any]:
    from broker.runtime import Broker
    from broker.scheduler import sweep

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    broker = await Broker.open(load(config))
    try:
        rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        result = await sweep(broker)
        seconds = time.perf_counter() - started
    finally:
        await broker.close()
    hwm = peak_rss_kb()
    return {
        "sweep": {"claimed": result.claimed, "refreshed": result.refreshed,
                  "failed": result.failed, "seconds": seconds},
        "maxrss_mb_after_imports": rss_start,
        "maxrss_mb_after_open": rss_open,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vmhwm_mb": hwm / 1024 if hwm else None,
    }


if __name__ == "__main__" and len(sys.argv) >= 3:
    import warnings

    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    if sys.argv[1] == "time":
        out = asyncio.run(time_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])))
    else:
        out = asyncio.run(sweep_child(Path(sys.argv[2])))
    print("RESULT " + json.dumps(out), flush=True)
