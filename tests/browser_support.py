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
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from broker.crypto import generate_key
from tests.support import loopback_socket, url_of

CHROMIUM = os.environ.get("BROKER_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SERVICE_TOKEN = "browser-test-service-token-0123"
HOST_ORIGIN = "http://127.0.0.1:9"  # an allowed origin that is not the broker's
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

    def service(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10
        )

    def session_url(self, group_id: str = "team-1", **extra: Any) -> str:
        with self.service() as c:
            r = c.post("/connect-sessions", json={"group_id": group_id, **extra})
            assert r.status_code == 201, r.text
            return str(r.json()["connect_url"])


def start_serve(tmp: Path, providers: dict[str, Any], **settings: Any) -> LiveServe:
    sock = loopback_socket()
    port = sock.getsockname()[1]
    url = url_of(sock)
    sock.close()  # broker serve binds it again (a tiny window; loopback only)
    config = {
        "database_url": f"sqlite+aiosqlite:///{tmp / 'broker.db'}",
        "encryption_keys": [generate_key()],
        "public_url": url,
        "auth": {"service_tokens": [SERVICE_TOKEN], "allowed_origins": [HOST_ORIGIN]},
        "providers": providers,
        "log_level": "debug",
        **settings,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
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
        self.errors.append(f"console.error: {text}")

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
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
def console() -> Iterator[ConsoleWatch]:
    watch = ConsoleWatch()
    yield watch
    assert watch.errors == [], "console errors in the page:\n" + "\n".join(watch.errors)


async def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
