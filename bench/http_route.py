"""2. HTTP credentials route under uvicorn (one worker) against a bare Starlette route.

``GET /groups/{g}/integrations/openweathermap/credentials`` with the service token, a random
group per request over all stored connections (warm cache, as in 1.), against a bare
Starlette route at the same path returning a constant JSON body of the same size with the
same headers. Same ``uvicorn.Config`` (``bench.serve``), same load generator and script
(the auth header is sent to both), same number of connections, in one run. Both servers
are pinned to one core and the generator to the other; runs alternate bare/broker in an
ABBA order. Target: broker >= 0.7x the bare route's requests/s.
"""

from __future__ import annotations

import asyncio
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
TARGET = 0.7
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
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        directory = Path(tmp)
        config = write_config(directory, database_url=sqlite_url(directory / "broker.db"))
        asyncio.run(populate(config, n))
        script = directory / "creds.lua"
        script.write_text(lua_script(PATH, n, SERVICE_TOKEN, opts.seed))
        with Child("bench.serve", "broker", "--config", str(config), "--warm", str(n),
                   cpu=server_cpu) as broker_srv, Child(
            "bench.serve", "bare", "--body-size", str(body_size), cpu=server_cpu
        ) as bare_srv:
            servers = {
                "broker": f"http://127.0.0.1:{broker_srv.info['port']}",
                "bare": f"http://127.0.0.1:{bare_srv.info['port']}",
            }
            sample = PATH.replace("{group}", group_of(n // 2))
            checks = {k: check(v, sample) for k, v in servers.items()}
            if checks["broker"] != checks["bare"] or checks["broker"]["status"] != 200:
                raise RuntimeError(f"the two routes differ: {checks}")

            def load_run(which: str, secs: float) -> dict[str, Any]:
                if use_wrk:
                    return run_wrk(servers[which], script, seconds=secs,
                                   connections=CONNECTIONS, cpu=gen_cpu)
                return run_python(servers[which], PATH, n, SERVICE_TOKEN, seconds=secs,
                                  connections=CONNECTIONS, cpu=gen_cpu, seed=opts.seed)

            if not opts.quick:
                for which in ("bare", "broker"):  # warm-up, discarded
                    load_run(which, 1)
            for r in range(rounds):
                order = ("bare", "broker") if r % 2 == 0 else ("broker", "bare")
                got = {which: load_run(which, seconds) for which in order}
                runs.append({
                    **got,
                    "ratio": got["broker"]["requests_per_s"] / got["bare"]["requests_per_s"],
                })
    ratios = [r["ratio"] for r in runs]
    errors = sum(r[k]["errors"] for r in runs for k in ("bare", "broker"))
    gen_cpu_max = max(r[k].get("generator_cpu_fraction", 0.0) for r in runs
                      for k in ("bare", "broker"))
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
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "errors": errors,
        "generator_cpu_fraction_max": gen_cpu_max,
        "target": TARGET,
        "summary": {"ratio": median(ratios), "target": TARGET, "errors": errors},
    }
    rows = [[
        f"{i + 1}", f"{r['bare']['requests_per_s']:,.0f}", f"{r['broker']['requests_per_s']:,.0f}",
        f"{r['bare']['p99_us'] / 1000:.1f} / {r['broker']['p99_us'] / 1000:.1f}",
        f"{r['ratio']:.2f}x",
    ] for i, r in enumerate(runs)]
    rows.append(["median", "", "", "", f"{data['ratio']:.2f}x  ({verdict(data['ratio'], TARGET)}, "
                 f"target >= {TARGET}x)"])
    data["table"] = table(
        "2. HTTP credentials route vs bare Starlette route, uvicorn one worker",
        ["round", "bare req/s (scale only)", "broker req/s (scale only)",
         "p99 ms bare / broker", "broker / bare"],
        rows,
        notes=[
            f"{n:,} API-key connections stored, random group per request, warm cache; "
            f"{CONNECTIONS} keep-alive connections; {seconds} s per run; {rounds} rounds "
            "(ABBA order)"
            + ("" if opts.quick else " after a discarded 1 s warm-up of each") + ".",
            f"Generator: {data['generator']} on CPU {gen_cpu}; servers on CPU {server_cpu}. "
            f"Generator CPU use at most {gen_cpu_max:.0%} of one core "
            "(below 100%: it was not the bottleneck).",
            f"Same body size ({checks['broker']['bytes']} bytes), same Cache-Control, same "
            f"Authorization header; non-2xx or socket errors: {errors}.",
        ],
    )
    save(opts, NAME, data)
    return data
