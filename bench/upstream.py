"""A provider's API for the proxy benchmark: a raw ASGI app under uvicorn, in its own process.

    python -m bench.upstream --key KEY [--keep-alive S]   # prints "READY {"port": ...}"

Every request must carry ``X-Api-Key: KEY`` (else 401, ``{"error": "bad key"}``):

- ``GET /data/<n>``: ``n`` bytes (``application/octet-stream``), one ``send``;
- ``GET /blob/<n>``: ``n`` bytes streamed in 64 KiB chunks, with a ``Content-Length``;
- ``POST /sink``: reads the body to its end, keeping nothing; answers ``{"bytes": <read>}``.

Raw ASGI (no framework): the upstream is the same for the direct and the proxied requests,
so whatever it costs is in both; the less it costs, the more the comparison shows of the
proxy. Same ``uvicorn.Config`` as ``bench.serve``'s servers, except that an idle kept-alive
connection is closed after ``--keep-alive`` seconds (uvicorn's default: 5).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

CHUNK = 64 * 1024
_ZEROS = b"x" * CHUNK
Send = Any
Receive = Any


def _head(status: int, length: int, content_type: bytes) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(length).encode()),
        ],
    }


async def _answer(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(_head(status, len(body), content_type))
    await send({"type": "http.response.body", "body": body})


def app_for(key: str) -> Any:
    """The ASGI app checking ``X-Api-Key: key`` (see the module docstring)."""
    expected = key.encode()
    bodies: dict[int, bytes] = {}
    bad_key = json.dumps({"error": "bad key"}).encode()
    json_type = b"application/json"
    octets = b"application/octet-stream"

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        given = next((v for k, v in scope["headers"] if k == b"x-api-key"), None)
        if given != expected:
            await _answer(send, 401, bad_key, json_type)
            return
        path: str = scope["path"]
        if path.startswith("/data/"):
            n = int(path[6:])
            body = bodies.get(n)
            if body is None:
                body = bodies[n] = b"x" * n
            await _answer(send, 200, body, octets)
        elif path.startswith("/blob/"):
            left = int(path[6:])
            await send(_head(200, left, octets))
            while left > 0:
                chunk = _ZEROS if left >= CHUNK else _ZEROS[:left]
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
        elif path == "/sink" and scope["method"] == "POST":
            read = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                read += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await _answer(send, 200, json.dumps({"bytes": read}).encode(), json_type)
        else:
            await _answer(send, 404, b'{"error": "no such path"}', json_type)

    return app


async def main(argv: list[str]) -> None:
    import uvicorn

    from .serve import serve, uvicorn_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True)
    parser.add_argument("--keep-alive", type=int, default=5)
    args = parser.parse_args(argv)
    app = app_for(args.key)
    config = uvicorn_config(app)
    config.timeout_keep_alive = args.keep_alive
    await serve(app, {}, server=uvicorn.Server(config))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1:]))
