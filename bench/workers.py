"""8. ``broker serve --workers 2`` against ``--workers 1``: the credentials route.

The real command line (``python -m broker serve --workers N --no-refresh``) over the same
SQLite store, warm caches, the same load generator and script, runs alternating in an ABBA
order. The target (issue 17): 2 workers >= 1.6x one worker's requests/s. On a 2-core
machine the generator needs one of the two cores the workers would use, so the servers are
not pinned here (pinning them to one core would make a second worker useless) and the
generator's own CPU use is reported beside the figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .common import (
    ROOT,
    SERVICE_TOKEN,
    Options,
    api_key_of,
    group_of,
    median,
    save,
    sqlite_url,
    table,
    verdict,
    write_config,
)
from .http_route import PATH, populate
from .loadgen import lua_script, run_python, run_wrk

NAME = "workers"
TARGET = 1.6
CONNECTIONS = 32


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(config: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(  # noqa: S603 (our own command line)
        [sys.executable, "-m", "broker", "serve", "--config", str(config), "--port", str(port),
         "--workers", str(workers), "--no-refresh"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"broker serve --workers {workers} did not start")
        time.sleep(0.1)
    return proc, url


def warm(url: str, n: int, workers: int) -> int:
    """Read every connection through each worker (new connections, all held open, until
    every worker has one: the kernel picks who accepts); the number of workers reached."""
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    clients: dict[int, httpx.Client] = {}
    spare: list[httpx.Client] = []
    try:
        for _ in range(64):
            client = httpx.Client(base_url=url, timeout=10, headers=headers)
            worker = int(client.get("/healthz").json().get("worker", 0))
            if worker in clients:
                spare.append(client)
            else:
                clients[worker] = client
            if len(clients) == workers:
                break
        for client in clients.values():
            for i in range(n):
                r = client.get(PATH.replace("{group}", group_of(i)))
                assert r.json()["credentials"]["api_key"] == api_key_of(i)
        return len(clients)
    finally:
        for client in [*clients.values(), *spare]:
            client.close()


def run(opts: Options) -> dict[str, Any]:
    n = opts.pick(100, 2_000)
    seconds = opts.pick(2, 5)
    rounds = opts.pick(1, 6)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        directory = Path(tmp)
        config = write_config(directory, database_url=sqlite_url(directory / "broker.db"))
        asyncio.run(populate(config, n))
        script = directory / "creds.lua"
        script.write_text(lua_script(PATH, n, SERVICE_TOKEN, opts.seed))
        use_wrk = shutil.which("wrk") is not None and not os.environ.get("BENCH_NO_WRK")

        def load_run(url: str, secs: float) -> dict[str, Any]:
            if use_wrk:
                return run_wrk(url, script, seconds=secs, connections=CONNECTIONS, cpu=None)
            return run_python(url, PATH, n, SERVICE_TOKEN, seconds=secs,
                              connections=CONNECTIONS, cpu=None, seed=opts.seed)

        servers = {w: start(config, w) for w in (1, 2)}
        try:
            reached = {w: warm(url, n, w) for w, (_, url) in servers.items()}
            for r in range(rounds):
                order = (1, 2) if r % 2 == 0 else (2, 1)
                got = {w: load_run(servers[w][1], seconds) for w in order}
                runs.append({"one": got[1], "two": got[2],
                             "ratio": got[2]["requests_per_s"] / got[1]["requests_per_s"]})
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    ratios = [r["ratio"] for r in runs]
    errors = sum(r[k]["errors"] for r in runs for k in ("one", "two"))
    gen = max(r[k].get("generator_cpu_fraction", 0.0) for r in runs for k in ("one", "two"))
    data: dict[str, Any] = {
        "connections_stored": n, "http_connections": CONNECTIONS, "seconds_per_run": seconds,
        "rounds": rounds, "runs": runs, "workers_reached": reached, "ratio": median(ratios),
        "errors": errors, "generator_cpu_fraction_max": gen, "target": TARGET,
        "generator": "wrk" if use_wrk else "python (bench.loadgen)",
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "summary": {"ratio": median(ratios), "target": TARGET, "errors": errors,
                    "workers_reached": reached},
    }
    rows = [[f"{i + 1}", f"{r['one']['requests_per_s']:,.0f}",
             f"{r['two']['requests_per_s']:,.0f}", f"{r['ratio']:.2f}x"]
            for i, r in enumerate(runs)]
    rows.append(["median", "", "", f"{data['ratio']:.2f}x  ({verdict(data['ratio'], TARGET)}, "
                 f"target >= {TARGET}x)"])
    data["table"] = table(
        "8. broker serve --workers 2 vs --workers 1, credentials route",
        ["round", "1 worker req/s (scale only)", "2 workers req/s (scale only)",
         "2 / 1"],
        rows,
        notes=[
            f"{n:,} API-key connections, warm caches (every worker reached: "
            f"{reached[2]} of 2), random group per request; {CONNECTIONS} keep-alive "
            f"connections; {seconds} s per run; {rounds} rounds (ABBA order); "
            "`python -m broker serve --workers N --no-refresh`, SQLite, httptools on uvloop.",
            f"{data['cpus']} CPUs shared by the servers and the generator ({data['generator']}, "
            f"unpinned; its CPU use at most {gen:.0%} of one core): on 2 cores the generator "
            "takes part of the second core a second worker would use.",
            f"Non-2xx or socket errors: {errors}.",
        ],
    )
    save(opts, NAME, data)
    return data


if __name__ == "__main__":
    print(json.dumps(run(Options(quick="--quick" in sys.argv))["summary"]))
