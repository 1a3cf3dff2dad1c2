"""An HTTP server for the benchmarks, in its own process (one uvicorn worker).

    python -m bench.serve broker --config config.yaml [--warm N] [--integration NAME]
                                 [--broker-server] [--stack h11|fast]
    python -m bench.serve bare --body-size N [--stack h11|fast]

``--stack``: ``h11`` is uvicorn's pure-Python parser on asyncio's loop; ``fast`` (the
default, what ``broker serve`` runs when they are installed) is httptools on uvloop.

``broker``: the real app (``broker.web.create_app``) over the store in ``config.yaml``.
``--warm N`` warms the credential cache the way the in-process benchmark does: start the
watcher, wait for its first poll, then one pass over the connections of integration
``NAME`` (default: the API-key provider of ``bench.common``) of groups ``g0..g<N-1>``.
``--broker-server``: under the server ``broker serve`` runs (``web.server.build_server``:
its h11 protocol with read deadlines, settings from the config) instead of the plain
``uvicorn.Config`` below.

``bare``: a bare Starlette route at the same path returning a constant JSON body of
``--body-size`` bytes with the same headers (``Cache-Control: no-store``): the baseline.

Both run under the same ``uvicorn.Config`` (that of ``broker serve``, with ``warning`` logs)
and print ``READY {"port": ...}`` once they listen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.cli import quiet_gc

ROUTE = "/groups/{group_id}/integrations/{name}/credentials"


STACKS = {"h11": ("h11", "asyncio"), "fast": ("httptools", "uvloop")}
"""``--stack``: (uvicorn's ``http``, the event loop)."""


def uvicorn_config(app: Any, stack: str = "fast") -> uvicorn.Config:
    """The same for both servers: ``broker serve``'s settings, logs at ``warning``."""
    return uvicorn.Config(
        app, log_level="warning", access_log=False, proxy_headers=False,
        server_header=False, backlog=4096, timeout_graceful_shutdown=2,
        http=STACKS[stack][0],
    )


def bare_app(body_size: int) -> Starlette:
    # {"credentials":{"api_key":"xxxx..."}} padded to body_size bytes.
    overhead = len(json.dumps({"credentials": {"api_key": ""}}, separators=(",", ":")))
    body = {"credentials": {"api_key": "0" * max(0, body_size - overhead)}}

    async def constant(request: Request) -> Response:
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # The credentials route first, so matching it costs what it would alone.
    return Starlette(routes=[Route(ROUTE, constant), Route("/healthz", healthz)])


async def serve(
    app: Any, ready: dict[str, Any], before: Any = None, server: uvicorn.Server | None = None,
    stack: str = "fast",
) -> None:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    if server is None:
        server = uvicorn.Server(uvicorn_config(app, stack))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.01)
    if before is not None:
        ready.update(await before())
    quiet_gc()  # as ``broker serve`` does, for both servers
    ready["port"] = sock.getsockname()[1]
    ready["loop"] = type(asyncio.get_running_loop()).__module__.split(".")[0]
    ready["http"] = server.config.http_protocol_class.__name__
    print("READY " + json.dumps(ready), flush=True)
    await task


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app", choices=["broker", "bare"])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--warm", type=int, default=0)
    parser.add_argument("--integration", default=None)
    parser.add_argument("--broker-server", action="store_true")
    parser.add_argument("--body-size", type=int, default=0)
    parser.add_argument("--stack", choices=sorted(STACKS), default="fast")
    parser.add_argument("--prime", action="store_true",
                        help="one token request through the broker's client before READY")
    parser.add_argument("--expire-cached", metavar="GROUP",
                        help="read GROUP's OAuth2 connection into the cache while fresh, then "
                        "move the broker's clock an hour on: a cached token that runs out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    if args.app == "bare":
        await serve(bare_app(args.body_size), {}, stack=args.stack)
        return

    from broker.config import load_settings
    from broker.runtime import Broker
    from broker.web import create_app

    from .common import APIKEY, group_of

    settings = load_settings(args.config, env={})
    broker = await Broker.open(settings)
    name = args.integration or APIKEY

    async def warm() -> dict[str, Any]:
        if args.prime:
            from .burst import prime

            await prime(broker)
        if args.expire_cached:
            from .burst import expire_cached

            await expire_cached(broker, args.expire_cached)
        if not args.warm:
            return {}
        await broker.credentials(group_of(0), name)
        await asyncio.sleep(0.5)
        for i in range(args.warm):
            await broker.credentials(group_of(i), name)
        await asyncio.sleep(0.3)
        return {"cache_entries": len(broker.tokens.cache.entries)}

    app = create_app(broker)
    server = None
    if args.broker_server:
        from broker.web.server import build_server

        server = build_server(app, settings.server, host="127.0.0.1", port=0,
                              log_level="warning")
    try:
        await serve(app, {}, warm, server, stack=args.stack)
    finally:
        await broker.close()


if __name__ == "__main__":
    from broker.cli.common import event_loop_factory

    stack = sys.argv[sys.argv.index("--stack") + 1] if "--stack" in sys.argv else "fast"
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(
        loop_factory=event_loop_factory(STACKS[stack][1])
    ) as runner:
        runner.run(main(sys.argv[1:]))
