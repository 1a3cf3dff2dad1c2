"""The HTTP server of ``broker serve``: uvicorn, with deadlines on slow clients and a cap.

uvicorn (0.55) bounds the size of a request head (h11's 16 KiB) and closes a kept-alive
connection idle for ``timeout_keep_alive``, but it has no deadline for reading a request:
a client that opens a connection and sends nothing, or sends its headers a byte at a time,
or its body a byte at a time, holds the socket (and, for a body, a task of the app) for as
long as it likes. Its ``limit_concurrency`` answers a plain-text 503 and counts the
connection asking as one of its own limit.

So ``broker serve`` runs uvicorn's own h11 protocol with a connection-level timer
(``DeadlineH11Protocol``) rather than an ASGI middleware: only the protocol sees a request
head arrive byte by byte, before the app is called at all, and the same timer then bounds
the body. One deadline at a time, chosen from what h11 says the client owes:

- the request head: ``server.header_timeout_seconds`` from the connection opening, or from
  the first byte of the next request on a kept-alive connection (the idle wait between
  requests is uvicorn's keep-alive timer, ``server.keep_alive_seconds``);
- the request body: ``server.body_timeout_seconds`` from the end of the head to the end of
  the body, however it trickles in (bodies are at most 64 KiB here, so a deadline on the
  whole body, not on each read, is what stops a trickle);
- none while the client owes nothing (the app is working, or the response is going out).

When a deadline passes the connection is closed; an app waiting for the rest of a body
sees the client disconnect. WebSocket upgrades are off (the broker has none).

Two parsers carry the same deadlines (``server.http``): uvicorn's ``httptools`` protocol
(the C parser, ``DeadlineHttpToolsProtocol``: the default when httptools is installed, as
it is with the broker) and its pure-Python ``h11`` one (``DeadlineH11Protocol``). uvicorn's
own protocols are never used bare: they have no such timer. ``server.loop`` picks the event
loop ``broker serve`` runs on: uvloop when installed (``auto``), else asyncio's
(``cli.common.event_loop_factory``).

``server.max_connections`` is checked when a request arrives: with that many other
connections open, the request gets the broker's JSON 503 (``service_unavailable``) with
``Connection: close``. A connection still sending its head counts too, for at most the
header deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import h11
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

try:  # the C parser; without it, h11 (the same deadlines either way)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from ..config import ServerSettings
from ..errors import ServiceUnavailable

__all__ = [
    "DeadlineH11Protocol", "DeadlineHttpToolsProtocol", "build_server", "protocol_class",
]

log = logging.getLogger("broker.web.server")
Phase = Literal["head", "body"]


class _Deadlines:
    """The timer both protocols share: one read deadline at a time (see the module
    docstring), and the cap on connections. ``build_server`` makes a subclass of a protocol
    with the configured values; the class attributes are those of a default config."""

    header_timeout: float = ServerSettings().header_timeout_seconds
    body_timeout: float = ServerSettings().body_timeout_seconds
    max_connections: int | None = None

    # Set by uvicorn's protocol classes.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None
    app: Any
    connections: set[Any]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: Phase | None = None
        if self.max_connections is not None:
            self.app = _Capped(self.app, self.connections, self.max_connections)

    # asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm("head")  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    # deadlines -------------------------------------------------------------------------
    def _arm(self, phase: Phase) -> None:
        self._disarm()
        timeout = self.header_timeout if phase == "head" else self.body_timeout
        self._phase = phase
        self._deadline = self.loop.call_later(timeout, self._expired, phase, timeout)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._phase = None

    def _expired(self, phase: Phase, timeout: float) -> None:
        self._deadline = None
        self._phase = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        what = "a request head" if phase == "head" else "a request body"
        log.info("closed the connection from %s: %s took over %g s", client, what, timeout)
        self.transport.close()


class DeadlineH11Protocol(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol with the read deadlines and the cap (h11 says what the
    client owes: its head, its body, or nothing)."""

    # asyncio.Protocol ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._phase is None and self.conn.their_state is h11.IDLE:
            self._arm("head")  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    # deadlines -------------------------------------------------------------------------
    def _follow(self) -> None:
        """Set the deadline for what the client owes now (h11's view of it)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif state is not h11.IDLE:
            # DONE, MUST_CLOSE, CLOSED, ERROR: the client owes nothing more.
            self._disarm()
        elif self._phase == "body":
            # The body of a request answered before it was read has ended: next request.
            self._disarm()


if HttpToolsProtocol is not None:

    class DeadlineHttpToolsProtocol(_Deadlines, HttpToolsProtocol):
        """uvicorn's httptools protocol with the read deadlines and the cap: the head's
        deadline from the connection (or the next request's first byte) to the end of its
        headers, the body's from there to the end of the message."""

        _in_message = False
        """Between a request's first byte and its end (set per connection)."""

        def data_received(self, data: bytes) -> None:
            if self._phase is None and not self._in_message:
                self._arm("head")  # the next request's first byte on a kept-alive connection
            super().data_received(data)

        def on_message_begin(self) -> None:
            self._in_message = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._arm("body")  # ended at once by on_message_complete when there is none
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_message = False
            self._disarm()
            super().on_message_complete()

else:  # pragma: no cover
    DeadlineHttpToolsProtocol = None  # type: ignore[assignment,misc]


def protocol_class(http: str) -> type[Any]:
    """The protocol for ``server.http``: ``httptools``, ``h11``, or ``auto`` (httptools
    when installed)."""
    if http == "h11" or (http == "auto" and DeadlineHttpToolsProtocol is None):
        return DeadlineH11Protocol
    if DeadlineHttpToolsProtocol is None:
        raise RuntimeError("server.http is httptools, which is not installed")
    return DeadlineHttpToolsProtocol


class _Capped:
    """The app, behind a cap on connections open at once (this one included)."""

    def __init__(self, app: ASGIApp, connections: set[Any], limit: int) -> None:
        self.app = app
        self.connections = connections
        self.limit = limit
        self._refused = 0
        self._reported = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or len(self.connections) <= self.limit:
            await self.app(scope, receive, send)
            return
        self._report()
        error = ServiceUnavailable(
            "The broker is serving as many connections as it is allowed to. Try again shortly."
        )
        response = JSONResponse(
            error.to_dict(),
            status_code=error.status_code,
            headers={"Connection": "close", "Retry-After": "1", "Cache-Control": "no-store"},
        )
        await response(scope, receive, send)

    def _report(self) -> None:
        # One line per 10 s at most: a flood of refusals must not flood the log.
        self._refused += 1
        now = time.monotonic()
        if now - self._reported >= 10:
            log.warning(
                "refused %d request(s): %d connections open (server.max_connections is %d)",
                self._refused, len(self.connections), self.limit,
            )
            self._refused = 0
            self._reported = now


def build_server(
    app: ASGIApp, limits: ServerSettings, *, host: str, port: int, log_level: str
) -> uvicorn.Server:
    """The uvicorn server ``broker serve`` runs ``app`` under, with ``limits`` applied."""
    base = protocol_class(limits.http)
    protocol = type(
        f"Broker{base.__name__.removeprefix('Deadline')}",
        (base,),
        {
            "header_timeout": limits.header_timeout_seconds,
            "body_timeout": limits.body_timeout_seconds,
            "max_connections": limits.max_connections,
        },
    )
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            http=protocol,
            ws="none",
            timeout_keep_alive=limits.keep_alive_seconds,
            log_level=log_level,
            proxy_headers=False,
            server_header=False,
            # uvicorn's access log prints query strings (the callback's ?code=...&state=...;
            # whatever a client puts there): the broker's own (accesslog.py) prints none.
            access_log=False,
            log_config=None,  # uvicorn logs through the broker's handler (logs.py)
        )
    )
