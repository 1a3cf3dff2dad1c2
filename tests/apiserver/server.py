"""The test provider API: lifecycle (uvicorn in a thread) and the Python API tests use.

The lifecycle is ``tests/threaded_uvicorn.py``'s, shared with the test authorization
server; the client that asks the authorization server about tokens lives in its loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.threaded_uvicorn import ThreadedUvicorn

from .app import build_app
from .journal import Journal, RequestRecord


@dataclass
class ApiServerConfig:
    """Behaviour knobs; read on every request, so tests may change them at runtime."""

    authserver_url: str | None = None  # validates /bearer tokens at <url>/api/me
    reject_status: int = 401  # status for missing or bad credentials (403: some providers)
    api_keys: set[str] = field(default_factory=set)  # /key-header and /key-query
    basic_users: dict[str, str] = field(default_factory=dict)  # /basic: user -> password
    # POST /open/login {"user", "secret"} (JSON or form) -> a session token for /session.
    login_users: dict[str, str] = field(default_factory=dict)
    session_lifetime: int = 3600  # the expiresIn of each login's answer
    login_status: int | None = None  # answer every login with this status instead
    sessions: dict[str, str] = field(default_factory=dict)  # issued token -> user
    # GET /<scheme>/sites answers this (Atlassian's accessible-resources: the sites a
    # token may reach); under /bearer only a working token gets it.
    sites: list[dict[str, Any]] = field(default_factory=list)


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
        self._uvicorn = ThreadedUvicorn("apiserver")
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
        @contextlib.asynccontextmanager
        async def client() -> AsyncIterator[None]:
            async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
                self._http = http
                yield

        self.port = self._uvicorn.start(build_app(self), inside=client)
        return self

    def stop(self) -> None:
        """Stop serving; requests in ``/slow`` are cut short. Idempotent."""
        self._uvicorn.stop()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def sleep(self, seconds: float) -> None:
        """Sleep in the server loop, cut short when the server stops."""
        await self._uvicorn.sleep(seconds)

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
