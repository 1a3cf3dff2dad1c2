"""A loopback OAuth2 token endpoint for the benchmarks (its own process, one uvicorn worker).

``POST /token/<ms>`` accepts any refresh_token (and any client authentication) and answers
after ``<ms>`` milliseconds with a fresh access token and a rotated refresh token.
``GET /count`` is how many token requests it has answered; ``POST /reset`` zeroes it.

    python -m bench.tokenserver      # prints "READY {"port": ...}" when listening
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

state = {"count": 0}


async def token(request: Request) -> Response:
    await request.body()
    state["count"] += 1
    delay = int(request.path_params["ms"]) / 1000
    if delay:
        await asyncio.sleep(delay)
    return JSONResponse(
        {
            "access_token": "at-" + secrets.token_hex(16),
            "refresh_token": "rt-" + secrets.token_hex(16),
            "token_type": "Bearer",
            "expires_in": 3600,
            "scope": "read",
        },
        headers={"Cache-Control": "no-store"},
    )


async def count(request: Request) -> Response:
    return JSONResponse({"count": state["count"]})


async def reset(request: Request) -> Response:
    state["count"] = 0
    return JSONResponse({"count": 0})


app = Starlette(
    routes=[
        Route("/token/{ms:int}", token, methods=["POST"]),
        Route("/count", count),
        Route("/reset", reset, methods=["POST"]),
    ]
)


async def main() -> None:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(
            app, lifespan="off", log_level="warning", access_log=False, backlog=4096,
            server_header=False,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.01)
    print("READY " + json.dumps({"port": sock.getsockname()[1]}), flush=True)
    await task


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
