"""5. Burst: 1,000 concurrent requests for one expired OAuth2 connection, the token endpoint
answering after 100 ms. Targets: exactly one token request; p99 latency <= 150 ms.

The p99 is also given as a ratio to its baseline measured in the same run: one bare
``httpx`` POST to the same 100 ms endpoint (what a single caller must wait anyway); the
target ``<= 150 ms`` with a 100 ms endpoint is ``<= 1.5x`` that.

In process: 1,000 ``ctx.custom_integration`` calls under ``asyncio.gather``, each latency
measured from the moment the burst starts, in two cache states:

- cold: the broker has just opened and the stored token has already expired;
- warm: the token was read (and cached) while fresh, then the clock moved past its expiry
  (``broker.clock``, the hook the tests use) - a token in use that runs out.

Over HTTP: the broker under uvicorn (``bench.serve``), 1,000 keep-alive connections opened
first by ``bench.loadgen burst`` in another process, then one request on each at once.
"""

from __future__ import annotations

import asyncio
import gc
import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from .common import (
    CLIENT_ID,
    CLIENT_SECRET,
    OAUTH,
    SERVICE_TOKEN,
    Child,
    Options,
    TokenServer,
    add_oauth,
    load,
    median,
    percentile,
    pinned,
    run_child_json,
    save,
    sqlite_url,
    table,
    two_cores,
    utcnow,
    verdict,
    write_config,
)

NAME = "burst"
CALLERS = 1000
DELAY_MS = 100
TARGET_MS = 150.0
GROUP = "g-burst"


async def one_post(url: str) -> float:
    """One bare httpx POST on a new connection (the client is made before the clock starts)."""
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.perf_counter()
        r = await client.post(url, data={"grant_type": "refresh_token", "refresh_token": "x"},
                              auth=(CLIENT_ID, CLIENT_SECRET))
        r.raise_for_status()
        return time.perf_counter() - started


async def asyncio_floor(url: str) -> dict[str, Any]:
    """The least any single-flight design can do here: CALLERS tasks under gather, all
    awaiting one shared bare httpx POST to the same endpoint."""
    async with httpx.AsyncClient(timeout=30) as client:
        shared: asyncio.Future[Any] | None = None
        latencies: list[float] = []
        gc.collect()
        pauses = GCPauses()
        started = time.perf_counter()

        async def post() -> Any:
            r = await client.post(url, data={"grant_type": "refresh_token",
                                             "refresh_token": "x"},
                                  auth=(CLIENT_ID, CLIENT_SECRET))
            return r.json()

        async def call() -> None:
            nonlocal shared
            if shared is None:
                shared = asyncio.ensure_future(post())
            got = await asyncio.shield(shared)
            dict(got)
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(call() for _ in range(CALLERS)))
        pauses.stop()
    return {"p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "max_s": max(latencies), "gc": pauses.summary()}


async def prime(broker: Any) -> None:
    """One token request through the broker's own client and connection pool first, as a
    running broker has made before: the one-time cost of a process's first request
    (importing aiohttp, building the TLS context and the pool) is not part of a burst."""
    from broker.oauth import client

    await client.refresh(broker.registry.get(OAUTH).provider, refresh_token="prime",
                         settings={}, transport=broker.token_transport)


async def expire_cached(broker: Any, group: str) -> None:
    """Read ``group``'s connection (fresh) into the cache, wait for the watcher's first poll
    (from then on the cache is trusted), then move the broker's clock an hour on: the
    cached token has run out (``broker.clock``, the hook the tests use)."""
    from broker.store.repository import utcnow as real_now

    await broker.credentials(group, OAUTH)
    await asyncio.sleep(0.5)
    await broker.credentials(group, OAUTH)
    assert broker.tokens.cache.get((group, OAUTH)) is not None
    broker.clock = lambda: real_now() + timedelta(hours=1)


async def in_process(config: Path, server: TokenServer, *, warm: bool) -> dict[str, Any]:
    from broker.nodes import ExecutionContext
    from broker.runtime import Broker

    broker = await Broker.open(load(config))
    try:
        if warm:
            expires = utcnow() + timedelta(minutes=30)
            await add_oauth(broker, [GROUP], expires_at=expires, next_refresh_at=None,
                            through_put=True)
            await expire_cached(broker, GROUP)
            cached = True
        else:
            await add_oauth(broker, [GROUP], expires_at=utcnow() - timedelta(minutes=5),
                            next_refresh_at=utcnow() - timedelta(minutes=5), through_put=True)
            await broker.close()
            broker = await Broker.open(load(config))  # a fresh process's view: nothing cached
            cached = False
        await prime(broker)
        contexts = [ExecutionContext.local(broker, GROUP) for _ in range(CALLERS)]
        before = server.count()
        latencies: list[float] = []
        errors: list[str] = []
        tokens: set[str] = set()
        gc.collect()  # start from a collected heap (GC during the burst is counted, below)
        pauses = GCPauses()
        started = time.perf_counter()

        async def call(ctx: Any) -> None:
            try:
                got = await ctx.custom_integration(OAUTH)
                tokens.add(got["access_token"])
            except Exception as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(call(c) for c in contexts))
        pauses.stop()
        await asyncio.sleep(0.2)  # anything late would show in the count
        requests = server.count() - before
    finally:
        await broker.close()
    return {
        "mode": "in process, " + ("warm cache" if warm else "cold cache"),
        "cached_before": cached,
        "callers": CALLERS,
        "token_requests": requests,
        "distinct_tokens": len(tokens),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies),
        "gc": pauses.summary(),
    }


class GCPauses:
    """Garbage collections during a burst: how many of each generation, and their time."""

    def __init__(self) -> None:
        self.runs: list[list[float]] = []
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.runs.append([info["generation"], time.perf_counter()])
        elif self.runs:
            self.runs[-1][1] = time.perf_counter() - self.runs[-1][1]

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {
            "collections": [int(g) for g, _ in self.runs],
            "total_ms": round(sum(t for _, t in self.runs) * 1000, 1),
            "full_collections": sum(1 for g, _ in self.runs if g == 2),
        }


def http_burst(base: str, cpu: int | None) -> dict[str, Any]:
    out = run_child_json(
        "bench.loadgen", "burst", base, f"/groups/{GROUP}/integrations/{OAUTH}/credentials",
        SERVICE_TOKEN, str(CALLERS), cpu=cpu,
    )
    latencies = out["latencies_s"]
    return {
        "statuses": out["statuses"],
        "errors": sum(v for k, v in out["statuses"].items() if k != "200"),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies),
    }


def over_http(config: Path, server: TokenServer, cpus: tuple[int, int] | None,
              *, warm: bool, with_floor: bool) -> dict[str, Any]:
    """The broker's burst over HTTP, and the same burst against the bare Starlette route
    (same uvicorn config, same generator): the HTTP floor."""
    server_cpu, client_cpu = cpus if cpus else (None, None)
    floor = None
    if with_floor:
        with Child("bench.serve", "bare", "--body-size", "200", cpu=server_cpu) as bare:
            floor = http_burst(f"http://127.0.0.1:{bare.info['port']}", client_cpu)
    state = ["--expire-cached", GROUP] if warm else []
    with Child("bench.serve", "broker", "--config", str(config), "--prime", *state,
               cpu=server_cpu) as srv:
        before = server.count()
        got = http_burst(f"http://127.0.0.1:{srv.info['port']}", client_cpu)
        time.sleep(0.2)
        requests = server.count() - before
    return {
        "mode": "HTTP, " + ("warm cache" if warm else "cold cache"),
        "callers": CALLERS,
        "token_requests": requests,
        **got,
        "bare_route_burst": floor,
    }


def http_store(config: Path, *, warm: bool) -> None:
    """The connection as each HTTP burst finds it in the store: expired (cold), or valid
    for 30 minutes, to be read while fresh and then run out in the cache (warm)."""

    async def store() -> None:
        from broker.runtime import Broker

        broker = await Broker.open(load(config))
        try:
            if warm:
                await add_oauth(broker, [GROUP], expires_at=utcnow() + timedelta(minutes=30),
                                next_refresh_at=None, through_put=True)
            else:
                await add_oauth(broker, [GROUP], expires_at=utcnow() - timedelta(minutes=5),
                                next_refresh_at=utcnow() - timedelta(minutes=5),
                                through_put=True)
        finally:
            await broker.close()

    asyncio.run(store())


def run(opts: Options) -> dict[str, Any]:
    cpus = two_cores()
    results = []
    with TokenServer(cpu=cpus[1] if cpus else None) as server, tempfile.TemporaryDirectory(
        prefix="broker-bench-"
    ) as tmp:
        root = Path(tmp)
        url = server.url(DELAY_MS)
        asyncio.run(one_post(url))  # warm-up
        baseline = median([asyncio.run(one_post(url)) for _ in range(opts.pick(3, 7))])
        floor = asyncio.run(asyncio_floor(url))
        for label, warm in (("cold", False), ("warm", True)):
            directory = root / label
            directory.mkdir()
            config = write_config(directory, database_url=sqlite_url(directory / "b.db"),
                                  token_url=url)
            with pinned(cpus[0] if cpus else None):
                results.append(asyncio.run(in_process(config, server, warm=warm)))
        for label, warm in (("http-cold", False), ("http-warm", True)):
            directory = root / label
            directory.mkdir()
            config = write_config(directory, database_url=sqlite_url(directory / "b.db"),
                                  token_url=url)
            http_store(config, warm=warm)
            got = over_http(config, server, cpus, warm=warm,
                            with_floor=not opts.quick and not warm)
            if warm:  # one HTTP floor for both
                got["bare_route_burst"] = results[-1]["bare_route_burst"]
            results.append(got)
    for r in results:
        r["p99_ratio_to_one_post"] = r["p99_s"] / baseline
        base = r.get("bare_route_burst", floor)
        r["p99_ratio_to_asyncio_floor"] = r["p99_s"] / base["p99_s"] if base else float("nan")
    data: dict[str, Any] = {
        "callers": CALLERS,
        "endpoint_delay_ms": DELAY_MS,
        "one_post_s": baseline,
        "asyncio_floor": floor,
        "results": results,
        "summary": {
            "token_requests": {r["mode"]: r["token_requests"] for r in results},
            "errors": {r["mode"]: r["errors"] for r in results},
        },
    }
    rows = [[
        r["mode"], r["token_requests"], "yes" if r["token_requests"] == 1 else "NO",
        r["errors"],
        f"{r['p50_s'] * 1000:.0f} / {r['p99_s'] * 1000:.0f} / {r['max_s'] * 1000:.0f}",
        f"{r['p99_ratio_to_one_post']:.2f}x",
        f"{r['p99_ratio_to_asyncio_floor']:.2f}x",
        verdict(r["p99_s"] * 1000, TARGET_MS, at_least=False),
    ] for r in results]
    data["table"] = table(
        f"5. Burst: {CALLERS:,} concurrent requests for one expired connection, token endpoint "
        f"answering after {DELAY_MS} ms",
        ["", "token requests", "exactly one", "errors", "p50 / p99 / max ms",
         "p99 / one bare POST", "p99 / floor", f"p99 <= {TARGET_MS:.0f} ms"],
        rows,
        notes=[
            f"Baseline, same run: one bare httpx POST to the same endpoint takes "
            f"{baseline * 1000:.0f} ms (median); p99 <= 150 ms means <= "
            f"{TARGET_MS / 1000 / baseline:.2f}x of it here.",
            f"asyncio floor, same run: {CALLERS:,} tasks under gather sharing one bare httpx "
            f"POST: p99 {floor['p99_s'] * 1000:.0f} ms (the least any single-flight design "
            "pays here).",
            "HTTP floor: the same 1,000-connection burst against the bare Starlette route "
            "(constant body, same uvicorn config, same generator): p99 "
            + (f"{results[-1]['bare_route_burst']['p99_s'] * 1000:.0f} ms"
               if results[-1].get("bare_route_burst") else "not measured in --quick") + ".",
            "Latencies run from the start of the burst to each caller's answer. Each broker "
            "process made one token request before its burst (as a running broker has): a "
            "process's first request builds the TLS context and imports lazily.",
        ],
    )
    save(opts, NAME, data)
    return data


if __name__ == "__main__":
    print(json.dumps(run(Options(quick=True))["summary"]))
