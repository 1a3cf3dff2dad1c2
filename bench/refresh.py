"""3. Refresh throughput of ``broker.scheduler.sweep(broker)``.

Connections are stored through ``Repository.put`` (the OAuth2 stored-token shape of
``broker.oauth.tokens.stored_token``, as ``Broker.store_token`` writes it) with
``next_refresh_at`` in the past, for an inline oauth2 provider whose token endpoint is
``bench.tokenserver`` (a small Starlette app under uvicorn in another process, on the other
core; it accepts any refresh token and returns a fresh one). ``refresh.max_concurrency`` 10.

- Slow endpoint (answers after 100 ms): achieved refreshes/s / (10 / 0.1 s). Target >= 0.95
  (issue 17; 0.9 before).
- Immediate endpoint: broker refreshes/s / bare ``httpx`` POSTs/s to the same endpoint
  (one shared ``httpx.AsyncClient``, the same form body and client authentication, the
  same concurrency of 10), measured in the same process, alternating. Target >= 0.7
  (issue 17; 0.5 before). Shown beside it: the same bare POSTs over the transport the
  broker's token requests use (httpx over aiohttp's connections), what the broker itself
  adds.

Both sides are warmed up first and the warm-ups discarded (50 bare POSTs; one sweep of all
the connections). Every refresh is checked: the endpoint's request count, and every row at
the version one refresh per round gives, with its next refresh in the future.
"""

from __future__ import annotations

import asyncio
import base64
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, update

from .common import (
    CLIENT_ID,
    CLIENT_SECRET,
    OAUTH,
    Options,
    TokenServer,
    add_oauth,
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

NAME = "refresh"
CONCURRENCY = 10
SLOW_MS = 100
TARGET_SLOW = 0.95
TARGET_FAST = 0.7


async def open_broker(directory: Path, database_url: str, token_url: str) -> Any:
    from broker.runtime import Broker

    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (setup, not timed)
    config = write_config(
        directory, database_url=database_url, token_url=token_url,
        refresh={"max_concurrency": CONCURRENCY},
    )
    return await Broker.open(load(config))


async def make_due(broker: Any, groups: list[str]) -> None:
    """Store the connections (first time) or make them due again (later rounds)."""
    from broker.store.models import Connection

    async with broker.session() as db:
        existing = await db.scalar(select(func.count()).select_from(Connection))
    past = utcnow() - timedelta(seconds=5)
    if not existing:
        await add_oauth(
            broker, groups, expires_at=utcnow() + timedelta(minutes=30), next_refresh_at=past,
            through_put=True,
        )
        return
    async with broker.session() as db, db.begin():
        await db.execute(update(Connection).values(next_refresh_at=past))


async def check_refreshed(broker: Any, expected_version: int) -> int:
    from broker.store.models import Connection

    async with broker.session() as db:
        return int(await db.scalar(
            select(func.count()).select_from(Connection).where(
                Connection.integration == OAUTH,
                Connection.version == expected_version,
                Connection.next_refresh_at > broker.now(),
                Connection.lease_owner.is_(None),
            )
        ) or 0)


async def timed_sweep(broker: Any, server: TokenServer) -> dict[str, Any]:
    from broker.scheduler import sweep

    before = server.count()
    started = time.perf_counter()
    result = await sweep(broker)
    elapsed = time.perf_counter() - started
    return {
        "claimed": result.claimed,
        "refreshed": result.refreshed,
        "failed": result.failed,
        "seconds": elapsed,
        "token_requests": server.count() - before,
        "per_s": result.refreshed / elapsed,
    }


async def bare_httpx(url: str, count: int, *, same_transport: bool = False) -> dict[str, Any]:
    """``count`` refresh-token POSTs, ``CONCURRENCY`` at a time, through one shared
    ``httpx.AsyncClient`` (the baseline). ``same_transport``: over the connections the
    broker's token requests use (``apitransport.AiohttpTransport``), not httpx's own."""
    from broker.apitransport import AiohttpTransport

    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    gate = asyncio.Semaphore(CONCURRENCY)
    ok = 0
    transport = AiohttpTransport(max_connections=0, keepalive_seconds=5.0) \
        if same_transport else None

    async with httpx.AsyncClient(timeout=30, transport=transport) as client:

        async def one(i: int) -> None:
            nonlocal ok
            async with gate:
                r = await client.post(
                    url, data={"grant_type": "refresh_token", "refresh_token": f"rt-{i}"},
                    headers={"Authorization": f"Basic {basic}", "Accept": "application/json"},
                )
                r.json()
                ok += r.status_code == 200

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.perf_counter() - started
    return {"posts": count, "ok": ok, "seconds": elapsed, "per_s": count / elapsed}


async def scenario(
    opts: Options, server: TokenServer, root: Path, label: str,
    database_url: Callable[[str], str],
) -> dict[str, Any]:
    slow_n = opts.pick(100, 2_000)
    fast_n = opts.pick(100, 2_000)
    rounds = opts.pick(1, 3)
    out: dict[str, Any] = {"store": label}

    broker = await open_broker(root / f"{label}-slow", database_url("slow"), server.url(SLOW_MS))
    try:
        groups = [group_of(i) for i in range(slow_n)]
        await make_due(broker, groups)
        run = await timed_sweep(broker, server)
        run["rows_refreshed"] = await check_refreshed(broker, 2)
        ideal = CONCURRENCY / (SLOW_MS / 1000)
        out["slow"] = {
            "connections": slow_n, "endpoint_delay_ms": SLOW_MS, "max_concurrency": CONCURRENCY,
            "ideal_per_s": ideal, **run, "ratio": run["per_s"] / ideal,
        }
    finally:
        await broker.close()

    broker = await open_broker(root / f"{label}-fast", database_url("fast"), server.url(0))
    try:
        groups = [group_of(i) for i in range(fast_n)]
        runs = []
        # Warm-ups, discarded, for both sides alike: the bare client's first POSTs, and a
        # first sweep (the broker's connection pools and compiled statements).
        await bare_httpx(server.url(0), 50)
        await bare_httpx(server.url(0), 50, same_transport=True)
        await make_due(broker, groups)
        await timed_sweep(broker, server)
        for r in range(rounds):
            await make_due(broker, groups)
            if r % 2 == 0:
                bare = await bare_httpx(server.url(0), fast_n)
                same = await bare_httpx(server.url(0), fast_n, same_transport=True)
                swept = await timed_sweep(broker, server)
            else:
                swept = await timed_sweep(broker, server)
                same = await bare_httpx(server.url(0), fast_n, same_transport=True)
                bare = await bare_httpx(server.url(0), fast_n)
            swept["rows_refreshed"] = await check_refreshed(broker, r + 3)
            runs.append({"bare": bare, "same_transport": same, "broker": swept,
                         "ratio": swept["per_s"] / bare["per_s"],
                         "ratio_same_transport": swept["per_s"] / same["per_s"]})
        out["fast"] = {
            "connections": fast_n, "runs": runs,
            "ratio": median([r["ratio"] for r in runs]),
            "ratio_min": min(r["ratio"] for r in runs),
            "ratio_same_transport": median([r["ratio_same_transport"] for r in runs]),
        }
    finally:
        await broker.close()
    return out


async def _run(opts: Options) -> dict[str, Any]:
    cores = two_cores()
    broker_cpu, server_cpu = cores if cores else (None, None)
    results = []
    with TokenServer(cpu=server_cpu) as server, tempfile.TemporaryDirectory(
        prefix="broker-bench-"
    ) as tmp, pinned(broker_cpu):
        root = Path(tmp)
        results.append(await scenario(
            opts, server, root, "sqlite", lambda name: sqlite_url(root / f"{name}.db")
        ))
        if opts.pg_url:
            async with scratch_postgres(opts.pg_url) as slow_url, scratch_postgres(
                opts.pg_url
            ) as fast_url:
                urls = {"slow": slow_url, "fast": fast_url}
                results.append(await scenario(opts, server, root, "postgresql", urls.__getitem__))
    return {"results": results, "broker_cpu": broker_cpu, "token_server_cpu": server_cpu,
            "token_endpoint": "bench.tokenserver (Starlette under uvicorn, own process)"}


def run(opts: Options) -> dict[str, Any]:
    data = asyncio.run(_run(opts))
    rows = []
    for res in data["results"]:
        slow, fast = res["slow"], res["fast"]
        rows.append([
            res["store"], f"endpoint answers after {SLOW_MS} ms", f"{slow['connections']:,}",
            f"{slow['per_s']:.1f}/s vs ideal {slow['ideal_per_s']:.0f}/s",
            f"{slow['ratio']:.3f}", f">= {TARGET_SLOW}", verdict(slow["ratio"], TARGET_SLOW),
            f"{slow['token_requests']}/{slow['rows_refreshed']}",
        ])
        last = fast["runs"][-1]
        rows.append([
            res["store"], "endpoint answers at once", f"{fast['connections']:,}",
            f"{median([r['broker']['per_s'] for r in fast['runs']]):,.0f}/s vs httpx "
            f"{median([r['bare']['per_s'] for r in fast['runs']]):,.0f}/s",
            f"{fast['ratio']:.3f} (min {fast['ratio_min']:.3f})", f">= {TARGET_FAST}",
            verdict(fast["ratio"], TARGET_FAST),
            f"{last['broker']['token_requests']}/{last['broker']['rows_refreshed']}",
        ])
        rows.append([
            res["store"], "at once, against POSTs over the broker's transport",
            f"{fast['connections']:,}",
            f"httpx over aiohttp "
            f"{median([r['same_transport']['per_s'] for r in fast['runs']]):,.0f}/s",
            f"{fast['ratio_same_transport']:.3f}", "(shown)", "", "",
        ])
    data["table"] = table(
        "3. Refresh throughput: sweep(broker), refresh.max_concurrency 10",
        ["store", "token endpoint", "due", "rates (scale only)", "ratio", "target", "",
         "token requests / rows refreshed"],
        rows,
        notes=[
            "Slow: refreshes/s achieved / (10 concurrent / 0.1 s). Fast: broker refreshes/s / "
            "bare httpx POSTs/s (shared AsyncClient, same body and Basic auth, 10 at a time), "
            "median of alternating rounds.",
            "The broker's token requests: a new Authlib client each (an httpx client), over "
            "one pooled keep-alive connection pool of aiohttp connections "
            "(broker.apitransport, since issue 17); the baseline: one shared httpx client on "
            "httpx's own transport, as the target defines it. The third row divides by bare "
            "POSTs over the broker's transport: what the broker adds to the same requests.",
            f"Token endpoint: {data['token_endpoint']} on CPU {data['token_server_cpu']}; "
            f"broker and httpx on CPU {data['broker_cpu']}.",
        ],
    )
    data["summary"] = {
        r["store"]: {"slow_ratio": r["slow"]["ratio"], "fast_ratio": r["fast"]["ratio"]}
        for r in data["results"]
    }
    save(opts, NAME, data)
    return data
