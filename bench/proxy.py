"""7. A provider's API through the broker against the same calls made directly.

One upstream API (``bench.upstream``: raw ASGI under uvicorn in its own process, checking
``X-Api-Key``) and an inline API-key provider for it (``auth_type: apikey``, the key in
``X-Api-Key``, ``api.base_url`` the upstream), connected for one group. In one run:

1. **Proxy route vs direct.** ``GET /data/1024`` sent straight to the upstream with the key,
   and ``GET /groups/g0/integrations/benchapi/proxy/data/1024`` with the service token to
   the broker (``bench.serve --broker-server``: the server ``broker serve`` runs), by the
   same load generator with the same settings (32 keep-alive connections), in alternating
   rounds (ABBA). Both servers are pinned to one core, the generator to the other, as in 2.
   Targets: proxy requests/s >= 0.8x direct (moonshot 0.9x); added median latency <= 1 ms.
   Also measured: the same at one connection (latency without queueing), and each server
   process's CPU time per request (``/proc/<pid>/stat``).
2. **``ctx.client`` in process vs a bare ``httpx.AsyncClient``** with a static header, same
   upstream, 32 concurrent tasks (``bench.proxy_client``, pinned to one core; the upstream on
   the other). Target >= 0.9x.
3. **100 MB download and upload**, through the proxy and direct (``bench.transfer``: one raw
   socket, the same client for both, on the generator's core), alternating. Targets:
   proxy throughput >= 0.7x direct; the broker process's RSS grows by <= 20 MB (``VmRSS``
   before, ``VmHWM`` after, the high-water mark reset before the transfers).

Every measured run of 1 and 2 starts from the same state: the upstream closes a kept-alive
connection idle for 1 s, and each run is preceded by a pause of 1.5 s, so no client (wrk,
the broker's pool, the bare client's pool) holds a live connection to it when the run
begins. Without that, the throughput of httpx's pool depends on how many connections the
previous runs left in it (see docs/benchmarks.md, 7).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .common import (
    SERVICE_TOKEN,
    Child,
    Options,
    bulk_insert,
    load,
    median,
    pin,
    pinned,
    run_child_json,
    save,
    sqlite_url,
    table,
    two_cores,
    verdict,
    write_config,
)
from .loadgen import lua_fixed, run_python, run_wrk
from .transfer import Transfer, download, upload

NAME = "proxy"
PROVIDER = "benchapi"
GROUP = "g0"
API_KEY = "bench-upstream-key-0123456789abcdef"
SIZE = 1024
CONCURRENCY = 32
PROXY_PREFIX = f"/groups/{GROUP}/integrations/{PROVIDER}/proxy"
TARGET_RATE = 0.8
MOONSHOT_RATE = 0.9
TARGET_ADDED_MS = 1.0
TARGET_CLIENT = 0.9
TARGET_TRANSFER = 0.7
TARGET_RSS_MB = 20.0
MB = 1_000_000
KEEP_ALIVE = 1  # seconds the upstream keeps an idle connection
GAP = 1.5  # seconds of pause before each measured run (full runs only)


def provider(port: int) -> dict[str, Any]:
    """The inline API-key provider for the upstream on ``port``."""
    return {
        "display_name": "Bench API",
        "auth_type": "apikey",
        "fields": {"api_key": {"title": "API key", "secret": True}},
        "apply": {"headers": {"X-Api-Key": "{api_key}"}},
        "api": {"base_url": f"http://127.0.0.1:{port}"},
    }


async def populate(config: Path) -> None:
    from broker.runtime import Broker

    broker = await Broker.open(load(config))
    try:
        await bulk_insert(broker, [{
            "group_id": GROUP, "integration": PROVIDER, "auth_type": "apikey",
            "data": {"api_key": API_KEY},
        }])
    finally:
        await broker.close()


# --- process figures -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of process ``pid``, in MB (10^6 bytes)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024 / MB
    return out


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (``clear_refs`` 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- 1. the route under load -----------------------------------------------------------------


def _load(
    base: str, script: Path, path: str, headers: dict[str, str], *, use_wrk: bool,
    seconds: float, connections: int, cpu: int | None, seed: int,
) -> dict[str, Any]:
    if use_wrk:
        return run_wrk(base, script, seconds=seconds, connections=connections, cpu=cpu)
    return run_python(base, path, 1, "", seconds=seconds, connections=connections, cpu=cpu,
                      seed=seed, headers=headers)


def check_same(direct: str, proxied: str) -> dict[str, Any]:
    """Both ways answer 200 with the same body; the proxied answer carries no key."""
    a = httpx.get(direct + f"/data/{SIZE}", headers={"X-Api-Key": API_KEY}, timeout=10)
    b = httpx.get(proxied + f"{PROXY_PREFIX}/data/{SIZE}",
                  headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10)
    found = {
        "direct": {"status": a.status_code, "bytes": len(a.content)},
        "proxy": {"status": b.status_code, "bytes": len(b.content)},
        "same_body": a.content == b.content,
        "key_echoed": API_KEY in str(b.headers),
    }
    if a.status_code != 200 or b.status_code != 200 or a.content != b.content:
        raise RuntimeError(f"direct and proxied answers differ: {found}")
    return found


def route_rounds(
    opts: Options, servers: dict[str, str], pids: dict[str, int], directory: Path,
    gen_cpu: int | None,
) -> dict[str, Any]:
    use_wrk = shutil.which("wrk") is not None and not os.environ.get("BENCH_NO_WRK")
    ways = {
        "direct": (f"/data/{SIZE}", {"X-Api-Key": API_KEY}),
        "proxy": (f"{PROXY_PREFIX}/data/{SIZE}", {"Authorization": f"Bearer {SERVICE_TOKEN}"}),
    }
    scripts = {}
    for way, (path, headers) in ways.items():
        scripts[way] = directory / f"{way}.lua"
        scripts[way].write_text(lua_fixed(path, headers))
    seconds = opts.pick(1, 5)
    rounds = opts.pick(1, 8)

    def one(way: str, secs: float, connections: int, gap: float = 0.0) -> dict[str, Any]:
        time.sleep(gap)
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        got = _load(servers[way], scripts[way], *ways[way], use_wrk=use_wrk, seconds=secs,
                    connections=connections, cpu=gen_cpu, seed=opts.seed)
        used = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        got["cpu_us_per_request"] = {
            k: v / got["requests"] * 1e6 if got["requests"] else float("nan")
            for k, v in used.items()
        }
        return got

    if not opts.quick:
        for way in ways:  # warm-up, discarded
            one(way, 1, CONCURRENCY)
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")
        got = {way: one(way, seconds, CONCURRENCY, opts.pick(0, GAP)) for way in order}
        runs.append({
            **got,
            "ratio": got["proxy"]["requests_per_s"] / got["direct"]["requests_per_s"],
            "added_p50_ms": (got["proxy"]["p50_us"] - got["direct"]["p50_us"]) / 1000,
        })
    # One connection: the latency a call adds when nothing queues.
    single: list[dict[str, Any]] = []
    for r in range(opts.pick(0, 4)):
        order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")
        got = {way: one(way, 3, 1, GAP) for way in order}
        single.append({
            **got, "added_p50_ms": (got["proxy"]["p50_us"] - got["direct"]["p50_us"]) / 1000,
        })
    return {
        "generator": "wrk" if use_wrk else "python (bench.loadgen)",
        "seconds_per_run": seconds,
        "rounds": rounds,
        "runs": runs,
        "single_connection": single,
    }


# --- 3. large bodies -------------------------------------------------------------------------


def transfer_rounds(
    opts: Options, ports: dict[str, int], broker_pid: int, gen_cpu: int | None,
) -> dict[str, Any]:
    size = opts.pick(4 * 1024 * 1024, 100 * MB)
    rounds = opts.pick(1, 5)
    auth = {
        "direct": ("", {"X-Api-Key": API_KEY}),
        "proxy": (PROXY_PREFIX, {"Authorization": f"Bearer {SERVICE_TOKEN}"}),
    }

    async def one(kind: str, way: str) -> Transfer:
        prefix, headers = auth[way]
        if kind == "download":
            return await download("127.0.0.1", ports[way], f"{prefix}/blob/{size}", headers)
        return await upload("127.0.0.1", ports[way], f"{prefix}/sink", headers, size)

    async def all_rounds() -> list[dict[str, Any]]:
        out = []
        for r in range(rounds):
            order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")
            row: dict[str, Any] = {}
            for kind in ("download", "upload"):
                got = {way: await one(kind, way) for way in order}
                row[kind] = {
                    way: {
                        "status": t.status, "bytes": t.moved, "seconds": t.seconds,
                        "mb_per_s": t.mb_per_s,
                        **({"upstream_read": json.loads(t.answer)["bytes"]}
                           if kind == "upload" and t.status == 200 else {}),
                    }
                    for way, t in got.items()
                }
                row[kind]["ratio"] = got["proxy"].mb_per_s / got["direct"].mb_per_s
            out.append(row)
        return out

    before = memory_mb(broker_pid)
    peak_reset = reset_peak(broker_pid)
    with pinned(gen_cpu):
        runs = asyncio.run(all_rounds())
    after = memory_mb(broker_pid)
    for row in runs:
        for kind in ("download", "upload"):
            for way in ("direct", "proxy"):
                t = row[kind][way]
                if t["status"] != 200 or t["bytes"] != size or t.get("upstream_read",
                                                                     size) != size:
                    raise RuntimeError(f"{kind} {way} did not move {size} bytes: {t}")
    return {
        "bytes": size,
        "rounds": rounds,
        "runs": runs,
        "broker_memory_mb": {
            "rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
            "hwm_before": before["VmHWM"], "hwm_after": after["VmHWM"],
            "peak_reset": peak_reset,
            "rss_growth": after["VmRSS"] - before["VmRSS"],
            "peak_growth": after["VmHWM"] - before["VmRSS"],
        },
    }


# --- the run ---------------------------------------------------------------------------------


def run(opts: Options) -> dict[str, Any]:
    cores = two_cores()
    server_cpu, gen_cpu = cores if cores else (None, None)
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        directory = Path(tmp)
        with Child("bench.upstream", "--key", API_KEY, "--keep-alive", str(KEEP_ALIVE),
                   cpu=server_cpu) as upstream:
            port = int(upstream.info["port"])
            config = write_config(
                directory, database_url=sqlite_url(directory / "broker.db"),
                providers={PROVIDER: provider(port)},
            )
            asyncio.run(populate(config))
            with Child("bench.serve", "broker", "--config", str(config), "--warm", "1",
                       "--integration", PROVIDER, "--broker-server",
                       cpu=server_cpu) as broker_srv:
                ports = {"direct": port, "proxy": int(broker_srv.info["port"])}
                servers = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
                pids = {"upstream": upstream.proc.pid, "broker": broker_srv.proc.pid}
                checks = check_same(servers["direct"], servers["proxy"])
                route = route_rounds(opts, servers, pids, directory, gen_cpu)
                transfers = transfer_rounds(opts, ports, broker_srv.proc.pid, gen_cpu)
            # 2. In process: the client on the servers' core, the upstream on the other.
            pin(upstream.proc.pid, gen_cpu)
            client = run_child_json(
                "bench.proxy_client", "--config", str(config), "--provider", PROVIDER,
                "--group", GROUP, "--key", API_KEY, "--path", f"/data/{SIZE}",
                "--size", str(SIZE), "--seconds", str(opts.pick(0.3, 4)),
                "--warm-up", str(opts.pick(0, 1)), "--gap", str(opts.pick(0, GAP)),
                "--rounds", str(opts.pick(1, 6)),
                "--concurrency", str(CONCURRENCY), cpu=server_cpu,
            )
    data = summarize(opts, checks, route, transfers, client, server_cpu, gen_cpu)
    save(opts, NAME, data)
    return data


def _ratios(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows]


def summarize(
    opts: Options, checks: dict[str, Any], route: dict[str, Any], transfers: dict[str, Any],
    client: dict[str, Any], server_cpu: int | None, gen_cpu: int | None,
) -> dict[str, Any]:
    runs = route["runs"]
    rate = median(_ratios(runs, "ratio"))
    added = median(_ratios(runs, "added_p50_ms"))
    added_single = median(_ratios(route["single_connection"], "added_p50_ms"))
    errors = sum(r[w]["errors"] for r in runs + route["single_connection"]
                 for w in ("direct", "proxy"))
    gen_cpu_max = max(r[w].get("generator_cpu_fraction", 0.0) for r in runs
                      for w in ("direct", "proxy"))
    cpu = {
        "upstream_direct": median([r["direct"]["cpu_us_per_request"]["upstream"] for r in runs]),
        "upstream_proxy": median([r["proxy"]["cpu_us_per_request"]["upstream"] for r in runs]),
        "broker_proxy": median([r["proxy"]["cpu_us_per_request"]["broker"] for r in runs]),
    }
    c_rounds = client["rounds"]
    for r in c_rounds:
        r["ratio"] = r["ctx"]["requests_per_s"] / r["bare"]["requests_per_s"]
        r["ratio_per_call"] = r["ctx_per_call"]["requests_per_s"] / r["bare"]["requests_per_s"]
    client_ratio = median(_ratios(c_rounds, "ratio"))
    per_call_ratio = median(_ratios(c_rounds, "ratio_per_call"))
    client_errors = sum(r[w]["errors"] for r in c_rounds for w in ("bare", "ctx", "ctx_per_call"))
    t_runs = transfers["runs"]
    down = median([r["download"]["ratio"] for r in t_runs])
    up = median([r["upload"]["ratio"] for r in t_runs])
    mem = transfers["broker_memory_mb"]
    summary = {
        "throughput_ratio": rate, "added_p50_ms": added,
        "added_p50_ms_one_connection": added_single,
        "client_ratio": client_ratio, "client_per_call_ratio": per_call_ratio,
        "download_ratio": down, "upload_ratio": up,
        "rss_growth_mb": mem["rss_growth"], "peak_growth_mb": mem["peak_growth"],
        "errors": errors + client_errors,
    }
    data: dict[str, Any] = {
        "response_check": checks,
        "server_cpu": server_cpu,
        "generator_cpu": gen_cpu,
        "route": route,
        "cpu_us_per_request": cpu,
        "client": client,
        "transfers": transfers,
        "targets": {
            "throughput": TARGET_RATE, "moonshot": MOONSHOT_RATE,
            "added_p50_ms": TARGET_ADDED_MS, "client": TARGET_CLIENT,
            "transfer": TARGET_TRANSFER, "rss_growth_mb": TARGET_RSS_MB,
        },
        "summary": summary,
        **summary,
    }
    data["table"] = "\n\n".join([
        route_table(opts, route, rate, added, added_single, cpu, errors, gen_cpu_max,
                    server_cpu, gen_cpu, checks),
        client_table(opts, c_rounds, client_ratio, per_call_ratio, client_errors),
        transfer_table(transfers, down, up),
    ])
    return data


def route_table(
    opts: Options, route: dict[str, Any], rate: float, added: float, added_single: float,
    cpu: dict[str, float], errors: int, gen_cpu_max: float, server_cpu: int | None,
    gen_cpu: int | None, checks: dict[str, Any],
) -> str:
    rows: list[list[Any]] = [[
        f"{i + 1}", f"{r['direct']['requests_per_s']:,.0f}", f"{r['proxy']['requests_per_s']:,.0f}",
        f"{r['ratio']:.2f}x",
        f"{r['direct']['p50_us'] / 1000:.2f} / {r['proxy']['p50_us'] / 1000:.2f}",
        f"{r['added_p50_ms']:+.2f}",
    ] for i, r in enumerate(route["runs"])]
    rows.append([
        "median", "", "",
        f"{rate:.2f}x ({verdict(rate, TARGET_RATE)}, target >= {TARGET_RATE}x; "
        f"moonshot {MOONSHOT_RATE}x {verdict(rate, MOONSHOT_RATE)})", "",
        f"{added:+.2f} ({verdict(added, TARGET_ADDED_MS, at_least=False)}, "
        f"target <= {TARGET_ADDED_MS:g} ms)",
    ])
    single = route["single_connection"]
    notes = [
        f"GET of a {SIZE:,}-byte answer; {CONCURRENCY} keep-alive connections; "
        f"{route['seconds_per_run']} s per run; {route['rounds']} rounds (ABBA order)"
        + ("" if opts.quick else " after a discarded 1 s warm-up of each; a pause of "
           f"{GAP:g} s before each run (the upstream closes connections idle for "
           f"{KEEP_ALIVE} s)") + ".",
        f"Generator: {route['generator']} on CPU {gen_cpu}; upstream and broker on CPU "
        f"{server_cpu}. Generator CPU use at most {gen_cpu_max:.0%} of one core.",
        f"CPU per request (median over rounds): upstream {cpu['upstream_direct']:.0f} us "
        f"direct, {cpu['upstream_proxy']:.0f} us proxied; broker {cpu['broker_proxy']:.0f} us "
        "per proxied request.",
        f"Same body both ways ({checks['proxy']['bytes']} bytes); key echoed back by the "
        f"proxy: {checks['key_echoed']}; non-2xx or socket errors: {errors}.",
    ]
    if single:
        notes.append(
            "One connection (no queueing), median p50 direct / proxy: "
            f"{median([r['direct']['p50_us'] for r in single]) / 1000:.2f} / "
            f"{median([r['proxy']['p50_us'] for r in single]) / 1000:.2f} ms, added "
            f"{added_single:+.2f} ms over {len(single)} rounds of 3 s."
        )
    return table(
        "7a. Proxy route vs the same requests sent directly to the API",
        ["round", "direct req/s (scale only)", "proxy req/s (scale only)", "proxy / direct",
         "p50 ms direct / proxy", "added p50 ms"],
        rows, notes=notes,
    )


def client_table(
    opts: Options, rounds: list[dict[str, Any]], ratio: float, per_call: float, errors: int,
) -> str:
    rows: list[list[Any]] = [[
        f"{i + 1}", f"{r['bare']['requests_per_s']:,.0f}", f"{r['ctx']['requests_per_s']:,.0f}",
        f"{r['ratio']:.2f}x", f"{r['ctx_per_call']['requests_per_s']:,.0f}",
        f"{r['ratio_per_call']:.2f}x",
    ] for i, r in enumerate(rounds)]
    rows.append(["median", "", "", f"{ratio:.2f}x ({verdict(ratio, TARGET_CLIENT)}, target "
                 f">= {TARGET_CLIENT}x)", "", f"{per_call:.2f}x"])
    return table(
        "7b. ctx.client in process vs a bare httpx.AsyncClient, same upstream",
        ["round", "bare req/s (scale only)", "ctx.client req/s", "ctx / bare",
         "client per call req/s", "per call / bare"],
        rows,
        notes=[
            f"{CONCURRENCY} tasks in one process pinned to one core (the upstream on the "
            "other), GET of a 1,024-byte answer in a loop; the three ways in rotating order "
            "each round" + ("" if opts.quick else ", after a discarded 1 s warm-up of each, "
                            f"with a pause of {GAP:g} s before each run")
            + f"; non-200 or short answers: {errors}.",
            "bare: one httpx.AsyncClient with the X-Api-Key header and a pool as large as the "
            "broker's; ctx.client: one `async with ctx.client(...)` shared by the tasks; per "
            "call: `async with ctx.client(...)` around each call (shown, no target).",
        ],
    )


def transfer_table(transfers: dict[str, Any], down: float, up: float) -> str:
    mb = transfers["bytes"] / MB
    rows: list[list[Any]] = [[
        f"{i + 1}",
        f"{r['download']['direct']['mb_per_s']:.0f} / {r['download']['proxy']['mb_per_s']:.0f}",
        f"{r['download']['ratio']:.2f}x",
        f"{r['upload']['direct']['mb_per_s']:.0f} / {r['upload']['proxy']['mb_per_s']:.0f}",
        f"{r['upload']['ratio']:.2f}x",
    ] for i, r in enumerate(transfers["runs"])]
    rows.append(["median", "", f"{down:.2f}x ({verdict(down, TARGET_TRANSFER)})", "",
                 f"{up:.2f}x ({verdict(up, TARGET_TRANSFER)})"])
    mem = transfers["broker_memory_mb"]
    return table(
        f"7c. {mb:,.0f} MB download and upload, through the proxy and direct",
        ["round", "download MB/s direct / proxy", "proxy / direct",
         "upload MB/s direct / proxy", "proxy / direct"],
        rows,
        notes=[
            f"{transfers['bytes']:,} bytes each way on one fresh connection (raw socket "
            "client, bench.transfer), on the generator's core; target >= "
            f"{TARGET_TRANSFER}x. Upload through the proxy: streamed (past "
            "proxy.buffer_bytes).",
            f"Broker process memory: VmRSS {mem['rss_before']:.1f} MB before, "
            f"{mem['rss_after']:.1f} MB after; peak (VmHWM"
            + (", reset before the transfers" if mem["peak_reset"] else ", not reset")
            + f") {mem['hwm_after']:.1f} MB: growth {mem['peak_growth']:+.1f} MB at the "
            f"peak ({verdict(mem['peak_growth'], TARGET_RSS_MB, at_least=False)}, target "
            f"<= {TARGET_RSS_MB:g} MB), {mem['rss_growth']:+.1f} MB after.",
        ],
    )
