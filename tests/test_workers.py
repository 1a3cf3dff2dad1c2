"""``broker serve --workers N``: N processes on one port (real processes, real sockets,
SQLite and PostgreSQL). A change made through one worker is read through every worker
within the events feed's bound; a worker that dies is started again; SIGTERM stops them
all cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from conftest import SERVICE_TOKEN

from broker.cache import MAX_STALENESS
from broker.cli.workers import MAX_RESTARTS, RESTART_WINDOW, restart_allowed
from broker.config import Settings
from tests.browser_support import free_port_url

WORKERS = 2
NAME = "openweathermap"
PATH = f"/groups/g1/integrations/{NAME}/credentials"


def launch(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config),
             "--port", str(port), "--workers", str(WORKERS)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


@asynccontextmanager
async def served(
    make_settings: Callable[..., Settings], store_url: str, tmp_path: Path
) -> AsyncIterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port, url = free_port_url()
    settings = make_settings(database_url=store_url, public_url=url)
    assert settings.source is not None
    log = tmp_path / "serve.log"
    process = launch(settings.source, port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                async with httpx.AsyncClient() as c:
                    if (await c.get(url + "/healthz", timeout=1)).status_code == 200:
                        break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        yield process, url, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def one_client_per_worker(url: str) -> dict[int, httpx.AsyncClient]:
    """A kept-alive connection to each worker (the kernel picks who accepts: new
    connections until every worker has one)."""
    found: dict[int, httpx.AsyncClient] = {}
    spare: list[httpx.AsyncClient] = []
    deadline = time.monotonic() + 20
    while len(found) < WORKERS:
        assert time.monotonic() < deadline, f"only workers {sorted(found)} answered"
        client = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        worker = (await client.get("/healthz")).json()["worker"]
        if worker in found:
            spare.append(client)
        else:
            found[worker] = client
    for client in spare:
        await client.aclose()
    return found


async def test_a_change_through_one_worker_is_read_through_every_worker_within_the_bound(
    make_settings: Callable[..., Settings], store_url: str, tmp_path: Path
) -> None:
    async with served(make_settings, store_url, tmp_path) as (process, url, log):
        clients = await one_client_per_worker(url)
        try:
            first, *_ = clients.values()
            key = "owm-worker-key-{}-0123456789abcdef"
            r = await first.post(f"/groups/g1/integrations/custom/{NAME}",
                                 json={"api_key": key.format(0)})
            assert r.status_code == 200, r.text
            stale_after_bound = 0
            for change in range(1, 4):
                # Every worker has the current value cached (reads warm the caches).
                for client in clients.values():
                    for _ in range(3):
                        got = (await client.get(PATH)).json()["credentials"]["api_key"]
                        assert got == key.format(change - 1)
                writer = clients[change % WORKERS]
                r = await writer.post(f"/groups/g1/integrations/custom/{NAME}",
                                      json={"api_key": key.format(change)})
                assert r.status_code == 200, r.text
                changed = time.monotonic()
                # Read through every worker for twice the bound: once the bound has passed
                # since the change was acknowledged, no read may return the old value.
                while time.monotonic() - changed < 2 * MAX_STALENESS + 0.5:
                    for client in clients.values():
                        sent = time.monotonic()
                        got = (await client.get(PATH)).json()["credentials"]["api_key"]
                        if got != key.format(change) and sent - changed > MAX_STALENESS:
                            stale_after_bound += 1
                    await asyncio.sleep(0.02)
            assert stale_after_bound == 0
        finally:
            for client in clients.values():
                await client.aclose()

        # A worker that dies is started again, under the same index.
        worker_pids = children_of(process.pid)
        assert len(worker_pids) == WORKERS
        os.kill(worker_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            now = children_of(process.pid)
            if len(now) == WORKERS and worker_pids[0] not in now:
                break
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        clients = await one_client_per_worker(url)
        for client in clients.values():
            assert (await client.get(PATH)).json()["credentials"]["api_key"] == key.format(3)
            await client.aclose()

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()
    text = log.read_text()
    assert f"with {WORKERS} workers" in text and "exited" in text  # the one killed
    assert text.count("Application shutdown complete") >= WORKERS
    assert "owm-worker-key" not in text


def test_restarts_are_allowed_until_workers_keep_dying() -> None:
    deaths: deque[float] = deque()
    now = 1000.0
    for i in range(MAX_RESTARTS):
        assert restart_allowed(deaths, now + i)
        deaths.append(now + i)
    assert not restart_allowed(deaths, now + MAX_RESTARTS)
    # Deaths older than the window no longer count.
    assert restart_allowed(deaths, now + RESTART_WINDOW + MAX_RESTARTS)


def test_the_workers_option_is_bounded(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "broker", "serve", "--workers", "0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 2 and "--workers" in done.stderr

