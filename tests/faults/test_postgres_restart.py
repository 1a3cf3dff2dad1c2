"""PostgreSQL restarted under load (issue #6, item 13).

The shared test server must not be restarted (other test runs use it), so this module
starts a throwaway cluster of its own (``initdb`` into a temporary directory, another
port, as the ``postgres`` user when run as root) and restarts that one. It skips, saying
why, when the PostgreSQL server binaries are not installed or the cluster does not start.

What must hold: the broker process never crashes and is never restarted; during the
outage requests fail as 503 ``service_unavailable``; once the server is back every request
succeeds again (the pool drops dead connections: ``pool_pre_ping``); and every write the
broker acknowledged with a 200 is there after the restart, with its content.
"""

from __future__ import annotations

import asyncio
import glob
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import SERVICE_TOKEN

from broker.config import Settings
from broker.runtime import Broker
from broker.web import create_app
from tests.support import loopback_socket, serve

UNAVAILABLE = {
    "code": "service_unavailable",
    "message": "The credential store is unavailable. Try again shortly.",
}


@dataclass
class Cluster:
    bindir: Path
    data: Path
    socket_dir: Path
    port: int
    as_postgres: bool

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
                    as_postgres=self.as_postgres, timeout=timeout)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=50"
        )
        result = self.pg_ctl("-o", options, "-l", str(self.data.parent / "server.log"), "-w",
                             "start")
        if result.returncode != 0:
            raise RuntimeError(result.stdout + result.stderr + self.log())

    def restart(self) -> None:
        """A fast restart: sessions are terminated, the server shuts down and comes back."""
        result = self.pg_ctl("-m", "fast", "-l", str(self.data.parent / "server.log"), "-w",
                             "restart")
        if result.returncode != 0:
            raise RuntimeError(result.stdout + result.stderr + self.log())

    def stop(self) -> None:
        self.pg_ctl("-m", "immediate", "-w", "stop")

    def log(self) -> str:
        path = self.data.parent / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _run(args: list[str], *, as_postgres: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, Any] = {"user": "postgres", "group": "postgres"} if as_postgres else {}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, cwd="/", **kwargs
    )


def _free_port() -> int:
    sock = loopback_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[Cluster]:
    """A PostgreSQL cluster for this module alone, on its own port."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb)")
    bindir = Path(found[-1]).parent
    as_postgres = os.geteuid() == 0  # initdb refuses to run as root
    base = Path(tempfile.mkdtemp(prefix="broker-faults-pg-"))
    try:
        if as_postgres:
            shutil.chown(base, "postgres", "postgres")
        cluster = Cluster(bindir, base / "data", base, _free_port(), as_postgres)
        init = _run(
            [str(bindir / "initdb"), "-D", str(cluster.data), "-A", "trust", "-U", "postgres",
             "--no-sync", "-E", "UTF8"],
            as_postgres=as_postgres, timeout=120,
        )
        if init.returncode != 0:
            pytest.skip(f"initdb failed, no throwaway cluster: {init.stderr.strip()[:300]}")
        try:
            cluster.start()
        except RuntimeError as exc:
            pytest.skip(f"the throwaway PostgreSQL cluster did not start: {str(exc)[:300]}")
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def started_at(cluster: Cluster) -> Any:
    conn = await asyncpg.connect(cluster.dsn)
    try:
        return await conn.fetchval("SELECT pg_postmaster_start_time()")
    finally:
        await conn.close()


@asynccontextmanager
async def broker_on(
    cluster: Cluster, make_settings: Callable[..., Settings]
) -> AsyncIterator[tuple[Broker, httpx.AsyncClient]]:
    conn = await asyncpg.connect(cluster.dsn)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()
    broker = await Broker.open(make_settings(database_url=cluster.url))
    try:
        async with serve(create_app(broker)) as url, httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=30
        ) as http:
            yield broker, http
    finally:
        await broker.close()


async def test_postgres_restarted_under_load_loses_no_acknowledged_row_and_needs_no_restart(
    own_postgres: Cluster, make_settings: Callable[..., Settings]
) -> None:
    async with broker_on(own_postgres, make_settings) as (broker, http):
        acknowledged: dict[str, str] = {}
        statuses: Counter[int] = Counter()
        bad: list[str] = []
        stop = asyncio.Event()
        restarted_at = 0.0
        late_failures: list[str] = []

        def check(r: httpx.Response, sent: float) -> bool:
            statuses[r.status_code] += 1
            if r.status_code == 200:
                return True
            if r.status_code != 503 or r.json()["error"] != UNAVAILABLE:
                bad.append(f"{r.status_code} {r.text}")
            elif restarted_at and sent > restarted_at + 0.5:
                late_failures.append(r.text)  # the server had been back for half a second
            return False

        async def writer(w: int) -> None:
            n = 0
            while not stop.is_set():
                group, key = f"w{w}-{n}", secrets.token_hex(16)
                sent = time.monotonic()
                r = await http.post(
                    f"/groups/{group}/integrations/custom/openweathermap", json={"api_key": key}
                )
                if check(r, sent):
                    acknowledged[group] = key
                n += 1

        async def reader() -> None:
            while not stop.is_set():
                if not acknowledged:
                    await asyncio.sleep(0.01)
                    continue
                group = random.choice(sorted(acknowledged))
                sent = time.monotonic()
                r = await http.get(f"/groups/{group}/integrations/openweathermap/credentials")
                if check(r, sent):
                    assert r.json()["credentials"] == {"api_key": acknowledged[group]}

        before = await started_at(own_postgres)
        tasks = [asyncio.create_task(writer(w)) for w in range(4)]
        tasks += [asyncio.create_task(reader()) for _ in range(4)]
        await asyncio.sleep(0.5)
        written_before = len(acknowledged)
        await asyncio.to_thread(own_postgres.restart)
        restarted_at = time.monotonic()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)  # no worker crashed

        assert await started_at(own_postgres) > before  # it really was restarted
        assert not bad, bad[:5]
        assert not late_failures, late_failures[:5]
        assert written_before > 0 and len(acknowledged) > written_before + 10
        # The same broker, never restarted, answers, and has every acknowledged row.
        assert (await http.get("/healthz")).status_code == 200
        for group, key in acknowledged.items():
            got = await broker.tokens.get(group, broker.registry.get("openweathermap"),
                                          use_cache=False)
            assert got == {"api_key": key}, group
        print(f"statuses {dict(statuses)}; {len(acknowledged)} rows acknowledged")


async def test_connections_a_restart_left_dead_in_the_pool_are_replaced_before_use(
    own_postgres: Cluster, make_settings: Callable[..., Settings]
) -> None:
    """The broker is idle while the server restarts, so every pooled connection is dead
    and nothing has noticed yet: the very next requests still succeed (pool pre-ping)."""
    async with broker_on(own_postgres, make_settings) as (broker, http):
        key = secrets.token_hex(16)
        r = await http.post("/groups/g1/integrations/custom/openweathermap", json={"api_key": key})
        assert r.status_code == 200, r.text
        # Several connections in the pool, then restart while none is in use.
        await asyncio.gather(*(
            http.get("/groups/g1/integrations/openweathermap/credentials") for _ in range(8)
        ))
        broker.tokens.cache.clear()
        await broker.tokens.cache.close()  # no watcher to notice the restart first
        assert broker.database.engine.pool.checkedin() >= 1
        await asyncio.to_thread(own_postgres.restart)
        answers = await asyncio.gather(*(
            http.get("/groups/g1/integrations/openweathermap/credentials") for _ in range(8)
        ))
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["credentials"] == {"api_key": key}


async def test_readyz_while_the_database_is_stopped_and_after_it_is_back(
    own_postgres: Cluster, make_settings: Callable[..., Settings]
) -> None:
    """Readiness follows the database (the load balancer stops sending traffic while it is
    down); liveness does not (the process is fine, and is not restarted)."""
    async with broker_on(own_postgres, make_settings) as (_broker, http):
        assert (await http.get("/readyz")).json() == {"status": "ready"}
        await asyncio.to_thread(own_postgres.stop)
        try:
            down = await http.get("/readyz")
            assert down.status_code == 503, down.text
            assert down.json()["status"] == "unavailable"
            assert "does not answer" in down.json()["reason"]
            assert str(own_postgres.port) not in down.text  # never the database's address
            assert (await http.get("/healthz")).status_code == 200
        finally:
            await asyncio.to_thread(own_postgres.start)
        deadline = time.monotonic() + 20
        while (back := await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, back.text
            await asyncio.sleep(0.2)
        assert back.json() == {"status": "ready"}
