"""The test provider API: lifecycle (uvicorn in a thread) and the Python API tests use.

The lifecycle is the test authorization server's (``tests/authserver/server.py``): a socket
bound to a free 127.0.0.1 port, uvicorn serving it from a daemon thread with its own event
loop, and a stop that wakes that loop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from .app import build_app
from .journal import Journal, RequestRecord


class _UvicornServer(uvicorn.Server):
    """uvicorn.Server that exits as soon as asked (stock main_loop polls every 0.1 s)."""

    wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        assert self.wake is not None
        while not await self.on_tick(0):  # tick 0: refresh the Date header every pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)


@dataclass
class ApiServerConfig:
    """Behaviour knobs; read on every request, so tests may change them at runtime."""

    authserver_url: str | None = None  # validates /bearer tokens at <url>/api/me
    reject_status: int = 401  # status for missing or bad credentials (403: some providers)
    api_keys: set[str] = field(default_factory=set)  # /key-header and /key-query
    basic_users: dict[str, str] = field(default_factory=dict)  # /basic: user -> password


class ApiServer:
    """A provider-like HTTP API on a free 127.0.0.1 port (see the package docstring)."""

    def __init__(self, config: ApiServerConfig | None = None, **overrides: Any) -> None:
        self.config = config or ApiServerConfig()
        for key, value in overrides.items():
            if not hasattr(self.config, key):
                raise TypeError(f"unknown ApiServerConfig field {key!r}")
            setattr(self.config, key, value)
        self.journal = Journal()
        self.port = 0
        self._server: _UvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._http: httpx.AsyncClient | None = None  # lives in the server loop

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def http(self) -> httpx.AsyncClient:
        """The client that asks the authorization server about tokens (server loop only)."""
        assert self._http is not None, "ApiServer is not running"
        return self._http

    def start(self) -> ApiServer:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self),
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = server = _UvicornServer(config)

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = server.wake = asyncio.Event()
            async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
                self._http = http
                await server.serve(sockets=[sock])

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name=f"apiserver:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("the test API server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving; requests in ``/slow`` are cut short. Idempotent."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def sleep(self, seconds: float) -> None:
        """Sleep in the server loop, cut short when the server stops."""
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # ------------------------------------------------------------------ what it saw
    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first (rejected requests included)."""
        return self.journal.records()

    def attempts(self, key: str) -> int:
        """How many requests ``/<prefix>/flaky/{key}`` has had (any prefix), 0 if none."""
        return self.journal.attempts(key)

    def reset(self) -> None:
        """Forget the request log and every ``/flaky`` counter (config is kept)."""
        self.journal.clear()
