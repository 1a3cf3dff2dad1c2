"""9. Start-up and catalog size.

a. ``broker serve`` with every provider of the built-in catalog enabled (150, the OAuth
   apps with stand-in client credentials) on an empty SQLite file (no database, no key
   file, no token file: the first start of a new deployment, migrations included): the
   time from starting the command to the first ``200`` from ``/healthz``, polled every
   5 ms. Beside it, in the same run and the same way: a bare Starlette app under uvicorn
   on the same stack (httptools, uvloop), and ``python -c pass`` (the interpreter alone).
   Rounds alternate; medians. Target: <= 1.5 s.

   Where the time goes, in a process doing what ``broker serve`` does, one step after
   another (``python -m bench.startup phases``): the imports, ``load_settings``,
   ``Broker.open`` (keys, migrations), ``create_app`` and uvicorn's start.

b. A catalog of 1,000 provider files, generated here from the built-in ones under new
   names (``catalog_paths``), every one enabled: ``load_settings`` time (median of
   rounds, in a fresh process each). Target: <= 1 s. And the hot path with those 1,000
   registered: warm-cache ``ctx.custom_integration`` calls per second against the same
   broker with the usual few (23) registered, side by side, alternating (target: the
   same, >= 0.95x).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .common import (
    APIKEY,
    PY,
    ROOT,
    SERVICE_TOKEN,
    Options,
    add_api_keys,
    group_of,
    load,
    median,
    pinned,
    run_child_json,
    save,
    sqlite_url,
    table,
    two_cores,
    verdict,
    write_config,
)

NAME = "startup"
START_TARGET_S = 1.5
CATALOG_TARGET_S = 1.0
HOT_TARGET = 0.95
GENERATED = 1000
FEW = 23
"""The first round's catalog size: the hot path with 1,000 providers against this many."""
POLL_S = 0.005

# An operator's signing key for the files that need one at load (never used to sign here).
STAND_IN_PEM = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


def stand_in(data: dict[str, Any]) -> dict[str, Any]:
    """The config.yaml entry that enables a catalog file: what an operator must add for
    its auth type (client credentials, a signing key), with stand-in values."""
    auth_type = data.get("auth_type")
    if auth_type == "oauth2":
        return {"client_id": "bench-client-id", "client_secret": "bench-client-secret"}
    if auth_type == "oauth1":
        return {"client_id": "bench-key", "client_secret": "bench-secret"}
    if auth_type == "jwt_bearer" and "private_key_from" not in data:
        return {"client_id": "bench-consumer-key", "private_key": STAND_IN_PEM}
    if auth_type == "app_installation":
        return {"app_slug": "bench-app", "client_id": "Iv1.bench", "client_secret": "s",
                "private_key": STAND_IN_PEM}
    return {}


def catalog_files() -> list[Path]:
    from broker.catalog import builtin_catalog_dir

    return sorted(builtin_catalog_dir().glob("*.yaml"))


def every_provider() -> dict[str, Any]:
    """``providers:`` enabling the whole built-in catalog."""
    return {
        path.stem: stand_in(yaml.safe_load(path.read_text(encoding="utf-8")))
        for path in catalog_files()
    }


def generate_catalog(directory: Path, count: int) -> dict[str, Any]:
    """``count`` provider files in ``directory`` (the built-in ones in turn, under new
    names) and the ``providers:`` entries enabling them all."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = [(p, yaml.safe_load(p.read_text(encoding="utf-8"))) for p in catalog_files()]
    providers: dict[str, Any] = {}
    for i in range(count):
        path, data = sources[i % len(sources)]
        name = f"g{i:04d}-{path.stem}"[:64]
        shutil.copyfile(path, directory / f"{name}.yaml")
        providers[name] = stand_in(data)
    return providers


def serve_config(directory: Path) -> Path:
    """A first start: nothing exists beside config.yaml (database, key file, token file
    are made by ``broker serve``)."""
    data = {
        "database_url": sqlite_url(directory / "broker.db"),
        "providers": every_provider(),
        "log_level": "warning",
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def installed_env() -> dict[str, str]:
    """The environment of an installed broker: its modules compiled once and the bytecode
    kept (``pip install`` compiles a wheel's modules; a checkout installed with ``-e``
    under ``PYTHONDONTWRITEBYTECODE`` would recompile every module at every start)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_all() -> None:
    """What ``pip install`` does for an installed broker: its modules byte-compiled."""
    import compileall

    compileall.compile_dir(str(ROOT / "broker"), quiet=1)


def time_to_healthz(command: list[str], port: int, cwd: Path, cpu: int | None) -> float:
    """Seconds from starting ``command`` to the first 200 from its /healthz."""
    started = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S603 (our own command line)
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=installed_env(),
    )
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    try:
        while not healthy(port):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{command[:4]} exited before /healthz:\n{err[-2000:]}")
            if time.perf_counter() - started > 60:
                raise RuntimeError(f"{command[:4]}: no /healthz after 60 s")
            time.sleep(POLL_S)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


BARE = """
import asyncio, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
async def healthz(request):
    return JSONResponse({"status": "ok"})
app = Starlette(routes=[Route("/healthz", healthz)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", loop="uvloop",
            log_level="warning")
"""


def start_up(opts: Options, root: Path, cpu: int | None) -> dict[str, Any]:
    rounds = opts.pick(1, 5)
    compile_all()
    broker_s, bare_s, python_s = [], [], []
    providers = 0
    for i in range(rounds):
        directory = root / f"serve-{i}"
        directory.mkdir()
        config = serve_config(directory)
        providers = len(yaml.safe_load(config.read_text())["providers"])
        port = free_port()
        broker_s.append(time_to_healthz(
            [PY, "-m", "broker", "serve", "--config", str(config), "--port", str(port)],
            port, directory, cpu,
        ))
        port = free_port()
        bare_s.append(time_to_healthz([PY, "-c", BARE, str(port)], port, directory, cpu))
        started = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True)  # noqa: S603
        python_s.append(time.perf_counter() - started)
    (root / "phases").mkdir()
    phases = run_child_json("bench.startup", "phases", str(serve_config(root / "phases")),
                            cpu=cpu, env=installed_env())
    return {
        "providers_enabled": providers,
        "rounds": rounds,
        "broker_serve_s": median(broker_s),
        "broker_serve_rounds_s": broker_s,
        "bare_uvicorn_s": median(bare_s),
        "python_s": median(python_s),
        "phases": phases,
    }


async def hot_rates(configs: list[Path], n: int, rounds: int) -> list[list[float]]:
    """Warm-cache calls per second over ``n`` API-key connections of each config's broker,
    all open at once, measured in turns (round by round): one list of rates per config."""
    from broker.nodes import ExecutionContext
    from broker.runtime import Broker

    from .hotpath import warm_rate, warm_up

    brokers = [await Broker.open(load(config)) for config in configs]
    try:
        groups = [group_of(i) for i in range(n)]
        contexts = []
        for broker in brokers:
            await add_api_keys(broker, n)
            await warm_up(broker, APIKEY, groups)
            contexts.append([ExecutionContext.local(broker, g) for g in groups])
        rates: list[list[float]] = [[] for _ in brokers]
        for _ in range(rounds):
            for i, broker in enumerate(brokers):
                rates[i].append(await warm_rate(broker, APIKEY, contexts[i]))
        return rates
    finally:
        for broker in brokers:
            await broker.close()


def with_providers(directory: Path, providers: dict[str, Any], **extra: Any) -> Path:
    """Benchmark 1's config (its API-key provider) with ``providers`` enabled too."""
    directory.mkdir()
    path = write_config(directory, database_url=sqlite_url(directory / "b.db"), **extra)
    data = yaml.safe_load(path.read_text())
    data["providers"].update(providers)
    path.write_text(yaml.safe_dump(data))
    return path


def catalog_size(opts: Options, root: Path, cpu: int | None) -> dict[str, Any]:
    count = opts.pick(200, GENERATED)
    catalog = root / "generated"
    providers = generate_catalog(catalog, count)
    big = with_providers(root / "big", providers, catalog_paths=[str(catalog)])
    every = every_provider()
    small = with_providers(root / "small", {k: every[k] for k in list(every)[:FEW]})
    loads = [run_child_json("bench.startup", "load", str(big), cpu=cpu)
             for _ in range(opts.pick(1, 5))]
    # The hot path, alternating the two brokers (each opened once, measured in turns).
    n = opts.pick(500, 5000)
    passes = opts.pick(2, 9)
    with pinned(cpu):
        few, many = asyncio.run(hot_rates([small, big], n, passes))
    return {
        "files": count,
        "enabled": loads[0]["providers"],
        "load_s": median([r["seconds"] for r in loads]),
        "load_rounds_s": [r["seconds"] for r in loads],
        "yaml_s": median([r["yaml_seconds"] for r in loads]),
        "hot_few_per_s": median(few),
        "hot_many_per_s": median(many),
        "hot_ratio": median(many) / median(few),
        "few_enabled": len(yaml.safe_load(small.read_text())["providers"]),
    }


def run(opts: Options) -> dict[str, Any]:
    cpus = two_cores()
    cpu = cpus[0] if cpus else None
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        root = Path(tmp)
        started = start_up(opts, root, cpu)
        catalog = catalog_size(opts, root, cpu)
    phases = started["phases"]
    data: dict[str, Any] = {
        "start_up": started,
        "catalog": catalog,
        "summary": {
            "providers_enabled": started["providers_enabled"],
            "generated_enabled": catalog["enabled"],
            "generated_files": catalog["files"],
        },
    }
    rows = [
        ["`broker serve`, first start, " f"{started['providers_enabled']} providers",
         f"{started['broker_serve_s']:.2f} s", f"<= {START_TARGET_S} s",
         verdict(started["broker_serve_s"], START_TARGET_S, at_least=False),
         f"{started['broker_serve_s'] / started['bare_uvicorn_s']:.2f}x bare uvicorn "
         f"({started['bare_uvicorn_s']:.2f} s); python alone {started['python_s']:.2f} s"],
        [f"load_settings, {catalog['enabled']} providers from {catalog['files']} files",
         f"{catalog['load_s']:.2f} s", f"<= {CATALOG_TARGET_S} s",
         verdict(catalog["load_s"], CATALOG_TARGET_S, at_least=False),
         f"of which YAML {catalog['yaml_s']:.2f} s"],
        [f"hot path, {catalog['enabled']} registered / {catalog['few_enabled']}",
         f"{catalog['hot_ratio']:.2f}x", f">= {HOT_TARGET}x",
         verdict(catalog["hot_ratio"], HOT_TARGET),
         f"{catalog['hot_many_per_s']:,.0f} vs {catalog['hot_few_per_s']:,.0f} calls/s "
         "(scale only)"],
    ]
    data["table"] = table(
        "9. Start-up and catalog size",
        ["", "result", "target", "", "beside it, same run"],
        rows,
        notes=[
            "Phases of one start (a process doing what `broker serve` does, step by step): "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in phases.items()
                        if isinstance(v, float)) + ".",
            "Times from starting the command to the first 200 from /healthz (polled every "
            f"{POLL_S * 1000:.0f} ms); medians of {started['rounds']} alternating rounds; "
            "the server on one core.",
        ],
    )
    save(opts, NAME, data)
    return data


# --- children ----------------------------------------------------------------------------------


def child_phases(config: Path) -> dict[str, Any]:
    """What ``broker serve`` does, one step after another, each timed."""
    marks: dict[str, Any] = {}
    t = time.perf_counter()
    from broker.cli.common import event_loop_factory
    from broker.config import load_settings
    from broker.runtime import Broker
    from broker.web import create_app
    from broker.web.server import build_server

    marks["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    settings = load_settings(config, env={})
    marks["load_settings"] = time.perf_counter() - t

    async def rest() -> None:
        t = time.perf_counter()
        broker = await Broker.open(settings)
        marks["broker_open"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            app = create_app(broker, service_tokens=[SERVICE_TOKEN])
            server = build_server(app, settings.server, host="127.0.0.1", port=free_port(),
                                  log_level="warning")
            task = asyncio.create_task(server.serve())
            while not server.started:  # noqa: ASYNC110 (uvicorn offers a flag, no event)
                await asyncio.sleep(0.001)
            marks["app_and_server"] = time.perf_counter() - t
            server.should_exit = True
            await task
        finally:
            await broker.close()

    with asyncio.Runner(loop_factory=event_loop_factory(settings.server.loop)) as runner:
        runner.run(rest())
    marks["providers"] = len(settings.resolved_providers)
    return marks


def child_load(config: Path) -> dict[str, Any]:
    from broker import catalog
    from broker.config import load_settings

    spent = [0.0]
    real = catalog.load_yaml_file

    def timed(path: Path) -> Any:
        t = time.perf_counter()
        try:
            return real(path)
        finally:
            spent[0] += time.perf_counter() - t

    import broker.config

    broker.config.load_yaml_file = timed  # type: ignore[attr-defined]
    started = time.perf_counter()
    settings = load_settings(config, env={})
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "yaml_seconds": spent[0],
            "providers": len(settings.resolved_providers)}


if __name__ == "__main__":
    what, path = sys.argv[1], Path(sys.argv[2])
    result = child_phases(path) if what == "phases" else child_load(path)
    print("RESULT " + json.dumps(result), flush=True)
