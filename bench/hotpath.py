"""1. Hot path: ``await ctx.custom_integration(name)`` in process, random access over many
fresh connections, against the floor measured in the same run.

Floor: Python's stdlib ``sqlite3`` selecting the same row by (group, integration) from the
same SQLite file, one Fernet decrypt (same key) and ``json.loads``. Target: warm-cache
throughput >= 1.0x the floor on one core (the process is pinned to one core).

Measured, interleaved round by round (floor, warm cache, naive), each ratio per round:

- warm cache: ``ExecutionContext.local(broker, group).custom_integration(name)`` after one
  pass over every key and a wait for the cache watcher's first poll (when the cache becomes
  trusted). The loop yields to the event loop every 1,000 calls so the watcher keeps
  polling (it must, or the cache stops being trusted after 1 s); reads that miss the cache
  are counted and reported.
- naive: ``broker.tokens.get(..., use_cache=False)``, SQLAlchemy async over aiosqlite and a
  decrypt per call (what every call cost before the cache).

Both an API-key provider and an OAuth2 provider with fresh tokens (no refresh due) are
measured. With ``BROKER_TEST_DATABASE_URL`` set, the broker side runs on PostgreSQL too
(the floor stays stdlib sqlite3 on the SQLite copy of the same rows).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from .common import (
    APIKEY,
    OAUTH,
    Options,
    add_api_keys,
    add_oauth,
    config_key,
    group_of,
    load,
    median,
    pinned,
    save,
    scratch_postgres,
    sqlite_url,
    table,
    two_cores,
    utcnow,
    verdict,
    write_config,
)

NAME = "hotpath"
TARGET = 1.0
FLOOR_SQL = "SELECT credential FROM connections WHERE group_id = ? AND integration = ?"
CHUNK = 1000


def floor_rate(path: Path, key: str, integration: str, groups: list[str]) -> float:
    """Calls per second of the floor: select + one Fernet decrypt + json.loads."""
    con = sqlite3.connect(path)
    fernet = Fernet(key)
    try:
        execute = con.execute
        started = time.perf_counter()
        for group in groups:
            (token,) = execute(FLOOR_SQL, (group, integration)).fetchone()
            payload = json.loads(fernet.decrypt(token.encode("ascii")))
            payload["d"]
        return len(groups) / (time.perf_counter() - started)
    finally:
        con.close()


async def warm_rate(broker: Any, integration: str, contexts: list[Any]) -> float:
    started = time.perf_counter()
    for i, ctx in enumerate(contexts):
        await ctx.custom_integration(integration)
        if i % CHUNK == CHUNK - 1:
            await asyncio.sleep(0)  # let the cache watcher run
    return len(contexts) / (time.perf_counter() - started)


async def naive_rate(broker: Any, integration: str, groups: list[str]) -> float:
    spec = broker.registry.get(integration)
    get = broker.tokens.get
    started = time.perf_counter()
    for group in groups:
        await get(group, spec, use_cache=False)
    return len(groups) / (time.perf_counter() - started)


class ReadCounter:
    """Counts reads that reach the store (cache misses and naive calls)."""

    def __init__(self, broker: Any) -> None:
        self.reads = 0
        original = broker.repository.get

        async def counting(*args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            return await original(*args, **kwargs)

        broker.repository.get = counting


async def warm_up(broker: Any, integration: str, groups: list[str]) -> dict[str, Any]:
    """Start the watcher, wait for its first poll, then one pass over every key."""
    from broker.nodes import ExecutionContext

    await ExecutionContext.local(broker, groups[0]).custom_integration(integration)
    await asyncio.sleep(0.5)
    for group in groups:
        await ExecutionContext.local(broker, group).custom_integration(integration)
    await asyncio.sleep(0.3)
    cache = broker.tokens.cache
    return {
        "trusted": time.monotonic() < cache._trusted_until,
        "entries": len(cache.entries),
    }


async def measure_store(
    opts: Options, database_url: str, config: Path, sqlite_path: Path, n: int, label: str,
) -> list[dict[str, Any]]:
    from broker.nodes import ExecutionContext
    from broker.runtime import Broker

    broker = await Broker.open(load(config))
    rows: list[dict[str, Any]] = []
    try:
        groups = [group_of(i) for i in range(n)]
        t = time.perf_counter()
        await add_api_keys(broker, n)
        await add_oauth(
            broker, groups, expires_at=utcnow() + timedelta(hours=2), next_refresh_at=None
        )
        populate_s = time.perf_counter() - t
        counter = ReadCounter(broker)
        rng = random.Random(opts.seed)  # noqa: S311 (access pattern, not secrets)
        ops = opts.pick(10_000, 200_000)
        naive_ops = opts.pick(100, 2_000)
        rounds = opts.pick(2, 5)
        key = config_key(config)
        for integration in (APIKEY, OAUTH):
            warm = await warm_up(broker, integration, groups)
            sample = [groups[rng.randrange(n)] for _ in range(ops)]
            contexts = [ExecutionContext.local(broker, g) for g in sample]
            naive_sample = sample[:naive_ops]
            floor_rates, warm_rates, naive_rates = [], [], []
            warm_ratios, naive_ratios = [], []
            reads_before = counter.reads
            for _ in range(rounds):
                f = floor_rate(sqlite_path, key, integration, sample)
                w = await warm_rate(broker, integration, contexts)
                nv = await naive_rate(broker, integration, naive_sample)
                floor_rates.append(f)
                warm_rates.append(w)
                naive_rates.append(nv)
                warm_ratios.append(w / f)
                naive_ratios.append(nv / f)
            warm_misses = counter.reads - reads_before - rounds * len(naive_sample)
            rows.append({
                "store": label,
                "integration": integration,
                "auth_type": "apikey" if integration == APIKEY else "oauth2 (fresh token)",
                "connections": n,
                "calls_per_round": ops,
                "naive_calls_per_round": naive_ops,
                "rounds": rounds,
                "cache_after_warm_up": warm,
                "warm_cache_misses": warm_misses,
                "floor_calls_per_s": floor_rates,
                "warm_calls_per_s": warm_rates,
                "naive_calls_per_s": naive_rates,
                "warm_ratio_per_round": warm_ratios,
                "naive_ratio_per_round": naive_ratios,
                "warm_ratio": median(warm_ratios),
                "warm_ratio_min": min(warm_ratios),
                "naive_ratio": median(naive_ratios),
                "populate_seconds": populate_s,
            })
    finally:
        await broker.close()
    return rows


async def _run(opts: Options) -> dict[str, Any]:
    n = opts.pick(300, 10_000)
    cores = two_cores()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp, pinned(
        cores[0] if cores else None
    ):
        directory = Path(tmp)
        db = directory / "broker.db"
        config = write_config(
            directory, database_url=sqlite_url(db), token_url="http://127.0.0.1:9/token"
        )
        results += await measure_store(opts, sqlite_url(db), config, db, n, "sqlite")
        if opts.pg_url:
            # Same rows on PostgreSQL for the broker; the floor stays stdlib sqlite3.
            async with scratch_postgres(opts.pg_url) as url:
                pg_dir = directory / "pg"
                pg_dir.mkdir()
                pg_db = pg_dir / "floor.db"
                key = config_key(config)
                floor_config = write_config(
                    pg_dir, database_url=sqlite_url(pg_db), key=key,
                    token_url="http://127.0.0.1:9/token",
                )
                pg_broker_dir = directory / "pg-broker"
                pg_broker_dir.mkdir()
                pg_config = write_config(
                    pg_broker_dir, database_url=url, key=key,
                    token_url="http://127.0.0.1:9/token",
                )
                # The floor's SQLite copy first (its own config), then PostgreSQL.
                await _populate_only(floor_config, n)
                results += await measure_store(opts, url, pg_config, pg_db, n, "postgresql")
    return {"rows": results, "pinned_to_cpu": cores[0] if cores else None, "target": TARGET}


async def _populate_only(config: Path, n: int) -> None:
    from broker.runtime import Broker

    broker = await Broker.open(load(config))
    try:
        groups = [group_of(i) for i in range(n)]
        await add_api_keys(broker, n)
        await add_oauth(
            broker, groups, expires_at=utcnow() + timedelta(hours=2), next_refresh_at=None
        )
    finally:
        await broker.close()


def run(opts: Options) -> dict[str, Any]:
    data = asyncio.run(_run(opts))
    rows = data["rows"]
    lines = []
    for r in rows:
        lines.append([
            r["store"], r["auth_type"], r["connections"],
            f"{median(r['floor_calls_per_s']):,.0f}",
            f"{r['warm_ratio']:.2f}x (min {r['warm_ratio_min']:.2f}x)",
            f"{r['naive_ratio']:.3f}x",
            r["warm_cache_misses"],
            verdict(r["warm_ratio"], TARGET),
        ])
    text = table(
        "1. Hot path: ctx.custom_integration(name), in process, one core",
        ["store", "credential", "connections", "floor calls/s (scale only)",
         "WARM-CACHE ratio to floor", "naive ratio to floor", "warm misses", "target >= 1.0x"],
        lines,
        notes=[
            "Floor: stdlib sqlite3 SELECT by (group, integration) + one Fernet decrypt + "
            "json.loads, same SQLite file, same key, same random key sequence.",
            "The broker figure is the WARM-CACHE figure: one pass over all keys, then a wait "
            "for the cache watcher's first poll; 'warm misses' counts calls that still read "
            "the store. 'naive' is use_cache=False (SQLAlchemy async over aiosqlite, or "
            "asyncpg, + a decrypt per call). On PostgreSQL only the broker's store changes: "
            "the floor stays stdlib sqlite3 on a SQLite copy of the same rows.",
            f"Ratios are medians of per-round ratios (floor, warm, naive interleaved; "
            f"{rows[0]['rounds'] if rows else 0} rounds). Process pinned to CPU "
            f"{data['pinned_to_cpu']}.",
        ],
    )
    data["table"] = text
    save(opts, NAME, data)
    return data
