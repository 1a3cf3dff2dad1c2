"""A raw HTTP/1.1 server on 127.0.0.1 that records every connection and every byte it
managed to send, for tests that must prove a request never reached it, or that a client
stopped reading.

    async with listen(answer) as server:
        ...                                   # server.url, server.port
        await server.settle()                 # every connection handled to its end
        assert server.connections == 0

``answer(request)`` returns the status, headers and body chunks to send (chunks may be a
generator: a body too large to build is produced as it is written).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["Answer", "Listener", "Received", "listen", "ok"]


@dataclass(frozen=True)
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: Iterable[bytes] = ()


def ok(request: Received) -> Answer:
    body = b'{"ok": true}'
    return Answer(200, {"Content-Type": "application/json"}, [body])


class Listener:
    def __init__(self, answer: Callable[[Received], Answer], send_buffer: int | None) -> None:
        self.answer = answer
        self.send_buffer = send_buffer
        self.connections = 0
        self.requests: list[Received] = []
        self.body_bytes_sent = 0
        """Body bytes written and accepted by the kernel before the client went away."""
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def settle(self) -> None:
        """Wait (30 s at most) until every connection so far has been handled to its end."""
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), 30)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        if self.send_buffer is not None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            request = Received(method, target, headers, body)
            self.requests.append(request)
            answer = self.answer(request)
            out = f"HTTP/1.1 {answer.status} X\r\nConnection: close\r\n"
            out += "".join(f"{k}: {v}\r\n" for k, v in answer.headers.items())
            writer.write(out.encode("latin-1") + b"\r\n")
            await writer.drain()
            for chunk in answer.chunks:
                if writer.is_closing():
                    break
                writer.write(chunk)
                await writer.drain()
                self.body_bytes_sent += len(chunk)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: that is what some tests wait for
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def listen(
    answer: Callable[[Received], Answer] = ok, *, send_buffer: int | None = None
) -> AsyncIterator[Listener]:
    """A Listener on a free 127.0.0.1 port; ``send_buffer`` sets SO_SNDBUF on each
    connection (a small one keeps what the kernel holds for a slow reader small)."""
    listener = Listener(answer, send_buffer)
    server = await asyncio.start_server(listener._handle, "127.0.0.1", 0)
    listener.port = server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        server.close()
        await listener.settle()
        await server.wait_closed()
