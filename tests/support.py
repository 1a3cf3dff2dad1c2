"""Helpers for tests that run real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
import yaml
from cryptography.hazmat.primitives import serialization
from starlette.types import ASGIApp


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True


def yaml_text(data: object) -> str:
    """``data`` as YAML the broker accepts: PyYAML writes a value that appears twice (one
    list object under two providers, say) as an anchor and an alias, and the broker refuses
    aliases in its YAML files. This writes every value out in full."""
    return yaml.dump(data, Dumper=_NoAliases, allow_unicode=True, sort_keys=False)


def loopback_socket() -> socket.socket:
    """A bound TCP socket on a free 127.0.0.1 port (its URL is known before serving)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


@asynccontextmanager
async def serve(app: ASGIApp, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in this event loop; yield its URL.

    Same loop as the test, so the broker's database pool (asyncpg is loop-bound) is shared.
    Idle connections are kept 30 s, longer than httpx keeps them (5 s): with both at 5 s, a
    test's client could send on a connection the server was closing that moment (a
    ``ReadError`` seen once under load).
    """
    sock = sock or loopback_socket()
    config = uvicorn.Config(
        app, lifespan="off", log_config=None, log_level="warning", timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


def pem(key: Any) -> str:
    """A private key (cryptography's) as unencrypted PKCS#8 PEM, as a user pastes it."""
    return str(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode())


def public_pem(key: Any) -> str:
    """The public half of ``key`` as SubjectPublicKeyInfo PEM (what a server verifies)."""
    return str(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
