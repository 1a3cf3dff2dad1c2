"""Shared pieces of the refresh-engine tests: a live broker with chosen refresh and webhook
settings, many real connections, ``broker refresher`` processes, a webhook receiver, and
what the authorization server knows about a token.

Test modules bind the fixture at module level (pytest collects it there)::

    from tests import refresh_support
    refresh_live = refresh_support.refresh_live
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from broker.config import Settings
from broker.runtime import Broker
from broker.store.models import Connection
from broker.web import create_app
from tests import oauth_support
from tests.authserver.server import AuthServer
from tests.oauth_support import HOST_ORIGIN, Live
from tests.support import loopback_socket, serve, url_of

__all__ = [
    "Refresher",
    "WebhookReceiver",
    "connect",
    "connect_many",
    "family_of",
    "newest_expiry",
    "real_expiry",
    "refresh_live",
    "refreshers",
    "rows",
    "tls_context",
]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def refresh_live(
    store_url: str, make_settings: Callable[..., Settings], authserver: AuthServer
) -> Callable[..., Any]:
    """``async with refresh_live(...) as live``: like ``oauth_support.live_factory`` (the
    ``acme`` provider at ``authserver``, the broker under uvicorn on 127.0.0.1), with
    ``provider`` overrides of the acme spec, ``server`` overrides of the authorization
    server's config (e.g. ``access_token_lifetime=4``) and any other settings
    (``refresh={...}``, ``webhooks=[...]``) as keywords. ``live.broker.settings.source`` is
    the config.yaml a ``broker refresher`` process can be started with."""

    @asynccontextmanager
    async def make(
        *,
        provider: dict[str, Any] | None = None,
        server: dict[str, Any] | None = None,
        **settings: Any,
    ) -> AsyncIterator[Live]:
        for name, value in (server or {}).items():
            assert hasattr(authserver.config, name), name
            setattr(authserver.config, name, value)
        sock = loopback_socket()
        url = url_of(sock)
        client = authserver.register_client(redirect_uris=[f"{url}/oauth/callback"])
        assert client.client_secret is not None
        config = make_settings(
            database_url=store_url,
            public_url=url,
            auth={"service_tokens": [SERVICE_TOKEN], "allowed_origins": [HOST_ORIGIN]},
            providers={
                "acme": oauth_support.acme(
                    authserver, client.client_id, client.client_secret, **(provider or {})
                )
            },
            **settings,
        )
        broker = await Broker.open(config)
        try:
            async with serve(create_app(broker), sock), httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10
            ) as service:
                yield Live(
                    broker, url, service, authserver, client.client_id,
                    client.client_secret, [],
                )
        finally:
            await broker.close()

    return make


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for the test's user agents (each new one loads the CA bundle)."""
    return httpx.create_ssl_context()


async def connect(live: Live, group_id: str, *, attempts: int = 3) -> None:
    """The real popup flow for ``group_id`` (the server must auto-approve or the consent
    page is filled in as alice). The fault tests give the provider a 1 s timeout; on a
    loaded machine (refresher processes starting beside a parallel test run) a code
    exchange can take longer, and ends on "did not issue a token": the user signs in
    again, as a person would, up to ``attempts`` times. Any other outcome fails at once."""
    for attempt in range(attempts):
        async with live.browser(verify=tls_context()) as browser:
            page = await live.popup(browser, group_id=group_id)
        message = oauth_support.page_data(page)["message"]
        if message["status"] == "connected":
            return
        timed_out = "did not issue a token" in str(message.get("error"))
        assert timed_out and attempt + 1 < attempts, page.text


async def connect_many(live: Live, count: int, *, parallel: int = 8) -> list[str]:
    """``count`` real grants, one per group ``g000``..., through the popup flow."""
    groups = [f"g{i:03d}" for i in range(count)]
    gate = asyncio.Semaphore(parallel)

    async def one(group_id: str) -> None:
        async with gate:
            await connect(live, group_id)

    await asyncio.gather(*(one(g) for g in groups))
    return groups


async def rows(broker: Broker) -> dict[str, tuple[Connection, dict[str, Any]]]:
    """Every ``acme`` connection by group, with its decrypted credential (no refresh)."""
    async with broker.session() as db:
        found = (
            await db.scalars(select(Connection).where(Connection.integration == "acme"))
        ).all()
    return {
        r.group_id: (r, broker.keyring.open(r.group_id, r.integration, r.credential))
        for r in found
    }


def real_expiry(server: AuthServer, access_token: str) -> float | None:
    """When the provider says ``access_token`` expires (unix time), None if unknown."""
    with server.store.lock:
        tok = server.store.by_access.get(access_token)
        return None if tok is None else tok.access_expires_at


def family_of(server: AuthServer, access_token: str) -> str:
    family = server.family_of(access_token)
    assert family is not None, "the provider never issued this token"
    return family


def newest_expiry(server: AuthServer, family: str, *, issued_before: float) -> float:
    """Expiry of the newest access token of a grant family issued before a time."""
    with server.store.lock:
        return max(
            t.access_expires_at
            for t in server.store.by_access.values()
            if t.family.id == family and t.issued_at < issued_before
        )


# --- `broker refresher` processes ---------------------------------------------------------


@dataclass
class Refresher:
    """One ``broker refresher --config ...`` process (or ``broker serve``, given
    ``command=["serve", "--port", N]``); its output goes to ``log``."""

    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    command: tuple[str, ...] = ("refresher",)
    started_at: float = 0.0
    terminated: bool = False

    def start(self) -> Refresher:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("BROKER_CONFIG", None)
        out = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker", *self.command, "--config", str(self.config)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        out.close()
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def running(self) -> None:
        """Wait until the scheduler has started (or fail with the process's output)."""
        assert self.process is not None
        deadline = time.monotonic() + 20
        started = "serving on" if self.command[0] == "serve" else "refresher running"
        while started not in self.output():
            if self.process.poll() is not None:
                code = self.process.returncode
                raise AssertionError(f"refresher exited {code}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"refresher did not start:\n{self.output()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, leases stay as they were."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM, once (a second one during the clean exit would kill the process)."""
        assert self.process is not None
        if not self.terminated and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.terminated = True

    async def stop(self) -> int:
        """SIGTERM and wait for the clean exit; the exit code."""
        assert self.process is not None
        self.terminate()
        deadline = time.monotonic() + 15
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
            await asyncio.sleep(0.05)
        return self.process.returncode

    def swept(self) -> int:
        """Refreshes this process reported in its sweep log lines."""
        total = 0
        for line in self.output().splitlines():
            if "sweep:" in line and " refreshed" in line:
                # "... sweep: 12 due, 11 refreshed, 1 failed, 0 webhooks delivered"
                part = line.split("sweep:", 1)[1].split(",")[1]
                total += int(part.split()[0])
        return total

    def sweeps(self) -> int:
        """Sweeps this process ran (its "sweep:" lines; one that found nothing to do logs
        at debug)."""
        return sum(1 for line in self.output().splitlines() if "sweep:" in line)

    def summary(self) -> str:
        """Sweeps run and what they reported (for assertion messages)."""
        lines = self.output().splitlines()
        runs = [ln[:23] for ln in lines if "sweep:" in ln]
        sweeps = [ln[:23] + ln.split("sweep:", 1)[1] for ln in lines if "sweep:" in ln]
        return f"pid {self.pid}: {len(runs)} sweeps from {runs[:1]}; reported {sweeps}"

    def problems(self) -> list[str]:
        """ERROR / Traceback lines in the output."""
        return [
            line for line in self.output().splitlines()
            if " ERROR " in line or "Traceback" in line or "CRITICAL" in line
        ]


@asynccontextmanager
async def refreshers(
    config: Path, logs: Path, count: int, *, wait: bool = True
) -> AsyncIterator[list[Refresher]]:
    """``count`` refresher processes (``wait``: once running), stopped (SIGTERM) after."""
    procs = [Refresher(config, logs / f"refresher-{i}.log").start() for i in range(count)]
    try:
        for proc in procs:
            if wait:
                await proc.running()
        yield procs
    finally:
        running = [p for p in procs if p.process is not None and p.process.poll() is None]
        for proc in running:  # all at once, then wait for each
            proc.terminate()
        for proc in running:
            await proc.stop()


# --- webhook receiver ---------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """A real HTTP endpoint on 127.0.0.1 recording every POST; ``statuses`` are answered
    in order (then 200), each ``delay`` seconds after the request was read."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    url: str = ""
    delay: float = 0.0

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            if self.delay:
                await asyncio.sleep(self.delay)
            status = self.statuses.pop(0) if self.statuses else 200
            self.received.append(({k.lower(): v for k, v in request.headers.items()}, body, status))
            return PlainTextResponse("ok" if status < 400 else "no", status_code=status)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    @asynccontextmanager
    async def running(self) -> AsyncIterator[WebhookReceiver]:
        sock = loopback_socket()
        self.url = url_of(sock) + "/hook"
        async with serve(self.app(), sock):
            yield self

    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b, status in self.received if status < 300]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(b) for _, b in self.delivered()]
