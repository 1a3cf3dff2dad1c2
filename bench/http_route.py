"""2. HTTP credentials route under uvicorn (one worker) against a bare Starlette route.

``GET /groups/{g}/integrations/openweathermap/credentials`` with the service token, a random
group per request over all stored connections (warm cache, as in 1.), against a bare
Starlette route at the same path returning a constant JSON body of the same size with the
same headers. Same ``uvicorn.Config`` (``bench.serve``), same load generator and script
(the auth header is sent to both), same number of connections, in one run. Both servers
are pinned to one core and the generator to the other; runs alternate bare/broker in an
ABBA order. Both stacks are measured (h11 on asyncio, httptools on uvloop), each
against its own bare route. Target (issue 17): broker >= 0.9x the bare route's requests/s
on the faster stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx

from .common import (
    APIKEY,
    SERVICE_TOKEN,
    Child,
    Options,
    add_api_keys,
    api_key_of,
    group_of,
    load,
    median,
    save,
    sqlite_url,
    table,
    two_cores,
    verdict,
    write_config,
)
from .loadgen import lua_script, run_python, run_wrk

NAME = "http"
TARGET = 0.9
PATH = "/groups/{group}/integrations/" + APIKEY + "/credentials"
CONNECTIONS = 16


async def populate(config: Path, n: int) -> None:
    from broker.runtime import Broker

    broker = await Broker.open(load(config))
    try:
        await add_api_keys(broker, n)
    finally:
        await broker.close()


def check(base: str, path: str) -> dict[str, Any]:
    r = httpx.get(base + path, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10)
    return {"status": r.status_code, "bytes": len(r.content),
            "cache_control": r.headers.get("cache-control")}


STACKS = ("h11", "fast")
"""Each measured on its own pair of servers: uvicorn's h11 parser on asyncio's loop, and
httptools on uvloop (what ``broker serve`` runs when they are installed)."""
STACK_NAMES = {"h11": "h11 + asyncio", "fast": "httptools + uvloop"}


def run(opts: Options) -> dict[str, Any]:
    n = opts.pick(300, 10_000)
    cores = two_cores()
    server_cpu, gen_cpu = cores if cores else (None, None)
    seconds = opts.pick(2, 5)
    rounds = opts.pick(1, 8)
    # BENCH_NO_WRK=1: use the Python generator even where wrk is installed (to test it).
    use_wrk = shutil.which("wrk") is not None and not os.environ.get("BENCH_NO_WRK")
    body_size = len(json.dumps({"credentials": {"api_key": api_key_of(0)}},
                               separators=(",", ":")))
    runs: dict[str, list[dict[str, Any]]] = {stack: [] for stack in STACKS}
    served: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp, \
            contextlib.ExitStack() as stack_:
        directory = Path(tmp)
        config = write_config(directory, database_url=sqlite_url(directory / "broker.db"))
        asyncio.run(populate(config, n))
        script = directory / "creds.lua"
        script.write_text(lua_script(PATH, n, SERVICE_TOKEN, opts.seed))
        servers: dict[tuple[str, str], str] = {}
        for stack in STACKS:
            broker_srv = stack_.enter_context(Child(
                "bench.serve", "broker", "--config", str(config), "--warm", str(n),
                "--stack", stack, cpu=server_cpu))
            bare_srv = stack_.enter_context(Child(
                "bench.serve", "bare", "--body-size", str(body_size), "--stack", stack,
                cpu=server_cpu))
            servers[(stack, "broker")] = f"http://127.0.0.1:{broker_srv.info['port']}"
            servers[(stack, "bare")] = f"http://127.0.0.1:{bare_srv.info['port']}"
            served[stack] = {"loop": broker_srv.info["loop"], "http": broker_srv.info["http"],
                             "bare_loop": bare_srv.info["loop"],
                             "bare_http": bare_srv.info["http"]}
        sample = PATH.replace("{group}", group_of(n // 2))
        checks = {f"{k[0]}/{k[1]}": check(v, sample) for k, v in servers.items()}
        if len({json.dumps(c, sort_keys=True) for c in checks.values()}) != 1 or any(
                c["status"] != 200 for c in checks.values()):
            raise RuntimeError(f"the routes differ: {checks}")

        def load_run(key: tuple[str, str], secs: float) -> dict[str, Any]:
            if use_wrk:
                return run_wrk(servers[key], script, seconds=secs,
                               connections=CONNECTIONS, cpu=gen_cpu)
            return run_python(servers[key], PATH, n, SERVICE_TOKEN, seconds=secs,
                              connections=CONNECTIONS, cpu=gen_cpu, seed=opts.seed)

        if not opts.quick:
            for key in servers:  # warm-up, discarded
                load_run(key, 1)
        for r in range(rounds):
            for stack in STACKS:
                order = ("bare", "broker") if r % 2 == 0 else ("broker", "bare")
                got = {which: load_run((stack, which), seconds) for which in order}
                runs[stack].append({
                    **got,
                    "ratio": got["broker"]["requests_per_s"] / got["bare"]["requests_per_s"],
                })
    ratios = {stack: [r["ratio"] for r in runs[stack]] for stack in STACKS}
    everything = [r for stack in STACKS for r in runs[stack]]
    errors = sum(r[k]["errors"] for r in everything for k in ("bare", "broker"))
    gen_cpu_max = max(r[k].get("generator_cpu_fraction", 0.0) for r in everything
                      for k in ("bare", "broker"))
    per_stack = {
        stack: {
            "ratio": median(ratios[stack]),
            "ratio_min": min(ratios[stack]),
            "bare_rps": median([r["bare"]["requests_per_s"] for r in runs[stack]]),
            "broker_rps": median([r["broker"]["requests_per_s"] for r in runs[stack]]),
            "served": served[stack],
        }
        for stack in STACKS
    }
    fast = per_stack["fast"]
    data: dict[str, Any] = {
        "connections_stored": n,
        "http_connections": CONNECTIONS,
        "seconds_per_run": seconds,
        "rounds": rounds,
        "generator": "wrk" if use_wrk else "python (bench.loadgen)",
        "server_cpu": server_cpu,
        "generator_cpu": gen_cpu,
        "response_check": checks,
        "runs": runs,
        "stacks": per_stack,
        "ratio": fast["ratio"],
        "ratio_min": fast["ratio_min"],
        "errors": errors,
        "generator_cpu_fraction_max": gen_cpu_max,
        "target": TARGET,
        "summary": {"ratio": fast["ratio"], "ratio_h11": per_stack["h11"]["ratio"],
                    "target": TARGET, "errors": errors,
                    "fast_over_h11_broker": fast["broker_rps"] / per_stack["h11"]["broker_rps"]},
    }
    rows: list[list[str]] = []
    for stack in STACKS:
        for i, one in enumerate(runs[stack]):
            rows.append([
                STACK_NAMES[stack], f"{i + 1}", f"{one['bare']['requests_per_s']:,.0f}",
                f"{one['broker']['requests_per_s']:,.0f}",
                f"{one['bare']['p99_us'] / 1000:.1f} / {one['broker']['p99_us'] / 1000:.1f}",
                f"{one['ratio']:.2f}x",
            ])
        best = per_stack[stack]
        rows.append([
            STACK_NAMES[stack], "median", f"{best['bare_rps']:,.0f}",
            f"{best['broker_rps']:,.0f}", "", f"{best['ratio']:.2f}x"
            + (f"  ({verdict(best['ratio'], TARGET)}, target >= {TARGET}x)"
               if stack == "fast" else "  (shown: the first round's stack)"),
        ])
    gain = fast["broker_rps"] / per_stack["h11"]["broker_rps"]
    data["table"] = table(
        "2. HTTP credentials route vs bare Starlette route, uvicorn one worker, two stacks",
        ["stack", "round", "bare req/s (scale only)", "broker req/s (scale only)",
         "p99 ms bare / broker", "broker / bare"],
        rows,
        notes=[
            f"{n:,} API-key connections stored, random group per request, warm cache; "
            f"{CONNECTIONS} keep-alive connections; {seconds} s per run; {rounds} rounds "
            "(ABBA order within each stack)"
            + ("" if opts.quick else " after a discarded 1 s warm-up of each server") + ".",
            "Stacks as served (protocol, loop): "
            + "; ".join(f"{STACK_NAMES[s]}: {served[s]['http']} on {served[s]['loop']}"
                        for s in STACKS) + ".",
            f"The faster stack serves the credentials route at {gain:.2f}x the h11 stack's "
            "requests/s on this machine (scale only: absolute figures depend on it).",
            f"Generator: {data['generator']} on CPU {gen_cpu}; servers on CPU {server_cpu}. "
            f"Generator CPU use at most {gen_cpu_max:.0%} of one core "
            "(below 100%: it was not the bottleneck).",
            f"Same body size ({checks[next(iter(checks))]['bytes']} bytes), same "
            "Cache-Control, same Authorization header; non-2xx or socket errors: "
            f"{errors}.",
        ],
    )
    save(opts, NAME, data)
    return data
