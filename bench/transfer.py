"""One large download or upload over a raw socket, timed (the proxy benchmark's client).

HTTP/1.1 on one fresh connection, no HTTP library: the client's cost is the same, and
small, whichever server it talks to. ``download`` reads a ``Content-Length`` or chunked
body to its end, keeping nothing; ``upload`` sends ``size`` bytes with a
``Content-Length`` in 1 MiB writes (each waiting for the socket to drain) and reads the
answer. Both return the status, the bytes moved and the seconds from the request's first
byte to the answer's last.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["Transfer", "download", "upload"]

WRITE = 1024 * 1024
READ = 1024 * 1024
_BLOCK = b"u" * WRITE


@dataclass(frozen=True)
class Transfer:
    status: int
    moved: int
    seconds: float
    answer: bytes = b""
    """The answer's body, for an upload (a download's is not kept)."""

    @property
    def mb_per_s(self) -> float:
        return self.moved / self.seconds / 1e6 if self.seconds > 0 else float("nan")


def _request(method: str, host: str, port: int, path: str, headers: dict[str, str],
             length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length is not None:
        lines += [f"Content-Length: {length}", "Content-Type: application/octet-stream"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _head(reader: asyncio.StreamReader) -> tuple[int, int | None, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length: int | None = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return status, length, chunked


async def _drain_body(
    reader: asyncio.StreamReader, length: int | None, chunked: bool, keep: bool
) -> tuple[int, bytes]:
    """Read a body to its end: (bytes read, the body if ``keep``)."""
    kept: list[bytes] = []
    total = 0
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            left = size
            while left:
                data = await reader.read(min(left, READ))
                if not data:
                    raise ConnectionError("the body ended early")
                left -= len(data)
                if keep:
                    kept.append(data)
            await reader.readexactly(2)
            total += size
        return total, b"".join(kept)
    while length is None or total < length:
        data = await reader.read(READ if length is None else min(READ, length - total))
        if not data:
            if length is None:
                break
            raise ConnectionError("the body ended early")
        total += len(data)
        if keep:
            kept.append(data)
    return total, b"".join(kept)


async def download(host: str, port: int, path: str, headers: dict[str, str]) -> Transfer:
    """GET ``path``; the body is counted, not kept."""
    reader, writer = await asyncio.open_connection(host, port, limit=READ)
    try:
        started = time.perf_counter()
        writer.write(_request("GET", host, port, path, headers))
        status, length, chunked = await _head(reader)
        total, _ = await _drain_body(reader, length, chunked, keep=False)
        return Transfer(status, total, time.perf_counter() - started)
    finally:
        writer.close()


async def upload(
    host: str, port: int, path: str, headers: dict[str, str], size: int
) -> Transfer:
    """POST ``size`` bytes to ``path``; ``answer`` is the answer's body."""
    reader, writer = await asyncio.open_connection(host, port, limit=READ)
    try:
        started = time.perf_counter()
        writer.write(_request("POST", host, port, path, headers, size))
        left = size
        while left:
            block = _BLOCK if left >= WRITE else _BLOCK[:left]
            writer.write(block)
            left -= len(block)
            await writer.drain()
        status, length, chunked = await _head(reader)
        _, answer = await _drain_body(reader, length, chunked, keep=True)
        return Transfer(status, size, time.perf_counter() - started, answer)
    finally:
        writer.close()
