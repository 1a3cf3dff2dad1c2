"""``ctx.client`` in process against a bare ``httpx.AsyncClient`` (the proxy benchmark, part 2).

    python -m bench.proxy_client --config CFG --provider NAME --group G --key KEY
                                 --path /data/1024 --size N --seconds S --rounds R
                                 --concurrency C [--warm-up S] [--gap S]

Opens the broker of ``CFG`` in this process and, in each round, runs ``C`` tasks calling
``GET <path>`` of the provider's API in a loop for ``S`` seconds, three ways (the order
rotates from round to round):

- ``bare``: one ``httpx.AsyncClient`` with the provider's base URL and a static
  ``X-Api-Key`` header, and a pool as large as the broker's (the baseline);
- ``ctx``: one ``async with ctx.client(NAME) as api`` shared by the tasks;
- ``ctx_per_call``: ``async with ctx.client(NAME) as api`` around every call (how a node
  that makes one call writes it; the clients share the broker's pool).

Each measured run is preceded by a pause of ``--gap`` seconds (the upstream then closes
the pools' idle connections: every run starts from the same state). Every answer's status
and size is checked. Prints ``RESULT <json>``: per round and way,
requests/s, median and p99 latency, and the non-200 answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from .common import percentile

WAYS = ("bare", "ctx", "ctx_per_call")


async def _loop(
    call: Callable[[], Awaitable[httpx.Response]], seconds: float, concurrency: int,
    size: int,
) -> dict[str, Any]:
    latencies: list[float] = []
    bad = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal bad
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await call()
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200 or len(response.content) != size:
                bad += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_us": percentile(latencies, 50) * 1e6,
        "p99_us": percentile(latencies, 99) * 1e6,
        "errors": bad,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from broker.cli import quiet_gc
    from broker.config import load_settings
    from broker.nodes import ExecutionContext
    from broker.runtime import Broker

    broker = await Broker.open(load_settings(args.config, env={}))
    try:
        ctx = ExecutionContext.local(broker, args.group)
        # Warm the credential cache as bench.serve does: one read, the watcher's first poll.
        await broker.credentials(args.group, args.provider)
        await asyncio.sleep(0.5)
        integration = broker.registry.get(args.provider)
        base = integration.placement().base(await broker.credentials(args.group, args.provider))
        limits = broker.settings.proxy.max_connections
        bare = httpx.AsyncClient(
            base_url=base, headers={"X-Api-Key": args.key},
            limits=httpx.Limits(max_connections=limits,
                                max_keepalive_connections=min(limits, 100)),
            timeout=httpx.Timeout(integration.placement().api.timeout_seconds,
                                  connect=broker.settings.proxy.connect_timeout_seconds),
        )
        quiet_gc()
        async with bare, ctx.client(args.provider) as shared:

            async def per_call() -> httpx.Response:
                async with ctx.client(args.provider) as api:
                    return await api.get(args.path)

            calls: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
                "bare": lambda: bare.get(args.path),
                "ctx": lambda: shared.get(args.path),
                "ctx_per_call": per_call,
            }
            if args.warm_up:
                for way in WAYS:
                    await _loop(calls[way], args.warm_up, args.concurrency, args.size)
            rounds = []
            for r in range(args.rounds):
                order = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
                row = {}
                for way in order:
                    await asyncio.sleep(args.gap)
                    row[way] = await _loop(calls[way], args.seconds, args.concurrency, args.size)
                rounds.append(row)
        return {"base_url": base, "rounds": rounds}
    finally:
        await broker.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--provider", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warm-up", type=float, default=0.0)
    parser.add_argument("--gap", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    print("RESULT " + json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
