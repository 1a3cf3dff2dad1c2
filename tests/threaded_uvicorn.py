"""uvicorn serving a test server's ASGI app from a daemon thread, on a free 127.0.0.1 port.

Shared by the test authorization server and the test API server: a socket bound before
the thread starts (so the port is known at once), uvicorn in the thread's own event loop,
and a stop that wakes that loop at once instead of waiting for uvicorn's next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import uvicorn
from starlette.types import ASGIApp

__all__ = ["ThreadedUvicorn"]


class _UvicornServer(uvicorn.Server):
    """uvicorn.Server that exits as soon as asked (stock main_loop polls every 0.1 s)."""

    wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        assert self.wake is not None
        while not await self.on_tick(0):  # tick 0: refresh the Date header every pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)


class ThreadedUvicorn:
    """One server's lifecycle: ``start(app)`` returns its port, ``stop()`` is idempotent,
    ``sleep(s)`` sleeps in the server loop and is cut short when the server stops."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._server: _UvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def start(
        self,
        app: ASGIApp,
        *,
        inside: Callable[[], AbstractAsyncContextManager[object]] | None = None,
    ) -> int:
        """Serve ``app``; ``inside``: a context entered in the server loop around serving
        (a client the app uses there). Returns the port."""
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only then
        # (without it every response body waits ~40 ms for a delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
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
            async with inside() if inside is not None else contextlib.nullcontext():
                await server.serve(sockets=[sock])

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name=f"{self.name}:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"the test server {self.name} did not start")
            time.sleep(0.005)
        return self.port

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        if self._loop is not None and self._stopping is not None:
            # wakes the main loop and any handler sleeping in ``sleep``
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)
        self._server = self._thread = None

    async def sleep(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
