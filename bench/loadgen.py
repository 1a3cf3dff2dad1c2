"""Load generators for the HTTP benchmarks, run in their own process.

``wrk`` (C, one thread) is used when it is installed: the strongest generator here. Without
it, ``python -m bench.loadgen`` is a raw-socket asyncio generator (HTTP/1.1 keep-alive, no
HTTP library in the way) that reports its own CPU use: a generator using well under one
core's worth of CPU for the run was not the bottleneck.

``python -m bench.loadgen burst`` opens N connections, then sends one request on each at
the same moment and reports every latency (the HTTP part of the burst benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import PY, ROOT, percentile, pin

_LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"status_errors":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read,
    e.write, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def lua_script(path_template: str, groups: int, token: str, seed: int) -> str:
    """A wrk script: a random group per request, the service token, a JSON summary."""
    prefix, _, suffix = path_template.partition("{group}")
    return f"""
math.randomseed({seed})
local n = {groups}
request = function()
  local path = "{prefix}" .. "g" .. math.random(0, n - 1) .. "{suffix}"
  return wrk.format("GET", path, {{["Authorization"] = "Bearer {token}"}})
end
""" + _LUA_DONE


def lua_fixed(path: str, headers: dict[str, str]) -> str:
    """A wrk script: the same GET with the same headers every time, a JSON summary."""
    fields = ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items())
    # Built in init (wrk sets the Host header before calling it), sent as is every time.
    return f"""
local req
init = function(args)
  req = wrk.format("GET", "{path}", {{{fields}}})
end
request = function()
  return req
end
""" + _LUA_DONE


def run_wrk(
    base_url: str, script: Path, *, seconds: float, connections: int, cpu: int | None,
) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    assert wrk is not None
    proc = subprocess.Popen(  # noqa: S603 (our own command line)
        [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", str(script),
         "--timeout", "10s", base_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    pin(proc.pid, cpu)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    match = re.search(r"^BENCH_JSON (.*)$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk gave no summary (rc {proc.returncode}):\n{out}\n{err}")
    data: dict[str, Any] = json.loads(match.group(1))
    duration = data["duration_us"] / 1e6
    data["requests_per_s"] = data["requests"] / duration
    data["errors"] = sum(
        data[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors",
                          "timeouts")
    )
    data["generator"] = "wrk"
    data["generator_cpu_fraction"] = (usage.ru_utime + usage.ru_stime) / duration
    return data


def run_python(
    base_url: str, path_template: str, groups: int, token: str, *, seconds: float,
    connections: int, cpu: int | None, seed: int, headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``steady`` in a child process pinned to ``cpu``. ``token`` "" sends no
    Authorization; ``headers`` go on every request."""
    args = [PY, "-m", "bench.loadgen", "steady", base_url, path_template, str(groups), token,
            str(seconds), str(connections), str(seed)]
    for name, value in (headers or {}).items():
        args += ["--header", f"{name}: {value}"]
    child = subprocess.Popen(  # noqa: S603 (our own command line)
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    pin(child.pid, cpu)
    out, err = child.communicate()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            data: dict[str, Any] = json.loads(line[7:])
            data["generator"] = "python"
            return data
    raise RuntimeError(f"loadgen failed:\n{err[-3000:]}")


# --- the Python generator (child process) ----------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def steady(base_url: str, path_template: str, groups: int, token: str, seconds: float,
                 connections: int, seed: int, headers: list[str] | None = None) -> dict[str, Any]:
    host, port = base_url.removeprefix("http://").split(":")
    rng = random.Random(seed)  # noqa: S311 (access pattern, not secrets)
    extra = "".join(f"{h}\r\n" for h in [
        *([f"Authorization: Bearer {token}"] if token else []), *(headers or []),
    ])
    requests = [
        (f"GET {path_template.replace('{group}', f'g{rng.randrange(groups)}')} HTTP/1.1\r\n"
         f"Host: {host}:{port}\r\n{extra}\r\n").encode()
        for _ in range(4096)
    ]
    counts = {"ok": 0, "errors": 0}
    latencies: list[float] = []
    deadline = 0.0

    async def worker(index: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        i = index
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - t)
            counts["ok" if status == 200 else "errors"] += 1
            i += connections
        writer.close()

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "requests": counts["ok"] + counts["errors"],
        "errors": counts["errors"],
        "requests_per_s": (counts["ok"] + counts["errors"]) / elapsed,
        "p50_us": percentile(latencies, 50) * 1e6,
        "p99_us": percentile(latencies, 99) * 1e6,
        "generator_cpu_fraction": cpu / elapsed,
    }


async def burst(base_url: str, path: str, token: str, count: int) -> dict[str, Any]:
    """``count`` connections opened first; then one request on each, all at once."""
    host, port = base_url.removeprefix("http://").split(":")
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode()
    conns = []
    for _ in range(count):
        conns.append(await asyncio.open_connection(host, int(port)))
    # One round trip on every connection first (healthz), so accept() is behind us.
    health = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    for _, writer in conns:
        writer.write(health)
    await asyncio.gather(*(_read_response(r) for r, _ in conns))
    started = time.perf_counter()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float]:
        writer.write(request)
        status = await _read_response(reader)
        return status, time.perf_counter() - started

    results = await asyncio.gather(*(one(r, w) for r, w in conns))
    for _, writer in conns:
        writer.close()
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"statuses": statuses, "latencies_s": [lat for _, lat in results]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("steady")
    for name in ("base_url", "path_template"):
        s.add_argument(name)
    s.add_argument("groups", type=int)
    s.add_argument("token")
    s.add_argument("seconds", type=float)
    s.add_argument("connections", type=int)
    s.add_argument("seed", type=int)
    s.add_argument("--header", action="append", default=[])
    b = sub.add_parser("burst")
    b.add_argument("base_url")
    b.add_argument("path")
    b.add_argument("token")
    b.add_argument("count", type=int)
    args = parser.parse_args(argv)
    if args.mode == "steady":
        result = asyncio.run(steady(args.base_url, args.path_template, args.groups, args.token,
                                    args.seconds, args.connections, args.seed, args.header))
    else:
        result = asyncio.run(burst(args.base_url, args.path, args.token, args.count))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
