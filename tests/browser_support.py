"""Browser tests: headless Debian Chromium driven by Playwright, against a live
``broker serve`` subprocess and the real authorization server, both on 127.0.0.1.

Every page a test opens fails the test on any console error or uncaught exception.
Screenshots go to ``docs/screenshots/`` (the README shows them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.crypto import generate_key
from tests.support import loopback_socket, url_of, yaml_text

CHROMIUM = os.environ.get("BROKER_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SERVICE_TOKEN = "browser-test-service-token-0123"
HOST_ORIGIN = "http://127.0.0.1:9"  # default allowed origin when no HostSite is running
HTTP_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    409: "Conflict", 422: "Unprocessable Entity", 502: "Bad Gateway", 503: "Service Unavailable",
}


def chromium_or_skip() -> str:
    if not Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is None:
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@dataclass
class LiveServe:
    """A ``broker serve`` subprocess."""

    url: str
    config: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def database(self) -> Path:
        """The SQLite file behind it (tests may tamper with it, e.g. expire a session)."""
        return self.config.parent / "broker.db"

    def service(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10
        )

    def session_url(self, group_id: str = "team-1", **extra: Any) -> str:
        with self.service() as c:
            r = c.post("/connect-sessions", json={"group_id": group_id, **extra})
            assert r.status_code == 201, r.text
            return str(r.json()["connect_url"])


def free_port_url() -> tuple[int, str]:
    """A free 127.0.0.1 port and its URL, released for a server to bind next."""
    sock = loopback_socket()
    port, url = sock.getsockname()[1], url_of(sock)
    sock.close()  # the server binds it again (a tiny window; loopback only)
    return port, url


def start_serve(
    tmp: Path,
    providers: dict[str, Any],
    *,
    allowed_origins: list[str] | None = None,
    port_url: tuple[int, str] | None = None,
    **settings: Any,
) -> LiveServe:
    """Start ``broker serve``. ``port_url`` (from :func:`free_port_url`) lets a test know
    the broker's URL first, e.g. to register its redirect URI at an authorization server."""
    port, url = port_url or free_port_url()
    origins = [HOST_ORIGIN] if allowed_origins is None else allowed_origins
    config = {
        "database_url": f"sqlite+aiosqlite:///{tmp / 'broker.db'}",
        "encryption_keys": [generate_key()],
        "public_url": url,
        "auth": {"service_tokens": [SERVICE_TOKEN], "allowed_origins": origins},
        "providers": providers,
        "log_level": "debug",
        **settings,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml_text(config))
    log = tmp / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(path), "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("broker serve exited:\n" + log.read_text())
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return LiveServe(url, path, process, log)
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("broker serve did not start:\n" + log.read_text())


def stop_serve(serve: LiveServe) -> None:
    serve.process.terminate()
    try:
        serve.process.wait(10)
    except subprocess.TimeoutExpired:
        serve.process.kill()


class HostSite:
    """A host app's frontend on its own loopback origin (put ``origin`` in the broker's
    ``auth.allowed_origins``). Serves the HTML pages in ``pages`` by path, nothing else;
    a page given as ``(html, headers)`` is sent with those extra headers."""

    def __init__(self, pages: dict[str, str | tuple[str, dict[str, str]]] | None = None) -> None:
        self.pages = dict(pages or {})
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                page = site.pages.get(self.path.split("?", 1)[0])
                body, headers = page if isinstance(page, tuple) else (page, {})
                data = (body or "not found").encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="host-site", daemon=True
        )

    def start(self) -> HostSite:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@dataclass
class ConsoleWatch:
    """Collects console errors and uncaught exceptions of every page attached.

    Chromium also reports each HTTP error response as a console error ("Failed to load
    resource: ... status of 422"); a test that provokes one on purpose says so with
    ``expect_http(422)``, and any other stays an error.
    """

    errors: list[str] = field(default_factory=list)
    expected_statuses: set[int] = field(default_factory=set)

    def expect_http(self, *statuses: int) -> None:
        self.expected_statuses.update(statuses)

    def _console(self, msg: Any) -> None:
        if msg.type != "error":
            return
        text = str(msg.text)
        for status in self.expected_statuses:
            if text == f"Failed to load resource: the server responded with a status of {status} " \
                    f"({HTTP_REASONS.get(status, '')})":
                return
        self.errors.append(f"console.error: {text} [{msg.location.get('url', '')}]")

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))


@asynccontextmanager
async def launch_chromium() -> AsyncIterator[Any]:
    """Debian's headless Chromium under Playwright (its own browser download is not used)."""
    executable = chromium_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A Chromium per test. Each ``browser.new_page()`` gets its own context (cookies,
    storage), so a module may share one browser instead: see ``test_connect_page.py``."""
    async with launch_chromium() as b:
        yield b


@pytest.fixture
def console() -> Iterator[ConsoleWatch]:
    watch = ConsoleWatch()
    yield watch
    assert watch.errors == [], "console errors in the page:\n" + "\n".join(watch.errors)


async def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
