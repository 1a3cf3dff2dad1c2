"""``broker serve`` and ``broker refresher``."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from pathlib import Path

import click

from ..errors import ConfigError
from ..runtime import Broker
from .common import (
    config_invalid,
    config_option,
    event_loop_factory,
    load_config,
    run,
    service_tokens,
    with_broker,
)
from .workers import bind, supervise

__all__ = ["quiet_gc", "refresher", "serve"]

log = logging.getLogger("broker")


@click.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--refresh/--no-refresh",
    default=True,
    show_default=True,
    help="Run the refresh sweep in this process (off when `broker refresher` runs apart).",
)
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 256),
    help="Processes serving the port (one per core to use; see README, \"Workers\").",
)
def serve(
    config_path: Path | None, host: str, port: int, refresh: bool, workers: int
) -> None:
    """Apply pending migrations and serve the HTTP API (and the refresh sweep)."""
    from ..web import create_app
    from ..web.server import build_server

    settings = load_config(config_path)
    if not settings.auth.service_tokens and settings.sqlite_path() is None:
        # Checked before Broker.open, which connects to and migrates the database.
        config_invalid(ConfigError([
            f"{settings.source or '(defaults)'}: auth.service_tokens: at least one token "
            "is required when the database is not a SQLite file"
        ]))

    loop_factory = event_loop_factory(settings.server.loop)

    async def serve_it(sock: socket.socket | None = None, worker: int | None = None) -> None:
        broker = await Broker.open(settings, migrate=sock is None)
        try:
            app = create_app(
                broker, service_tokens=service_tokens(settings), refresher=refresh,
                worker=worker,
            )
            server = build_server(
                app, settings.server, host=host, port=port, log_level=settings.log_level
            )
            if worker is None:
                log.info("serving on http://%s:%d (public_url %s)", host, port,
                         settings.public_url)
            quiet_gc()
            await server.serve(sockets=[sock] if sock is not None else None)
        finally:
            await broker.close()

    if workers == 1:
        run(serve_it(), loop_factory=loop_factory)
        return

    async def prepare(broker: Broker) -> None:
        service_tokens(settings)  # the SQLite token file, created once, before the fork

    # Migrations, the key file and the token file: once, in the parent.
    run(with_broker(settings, prepare))
    sock = bind(host, port)
    log.info("serving on http://%s:%d with %d workers (public_url %s)", host, port, workers,
             settings.public_url)

    def work(index: int) -> int:
        run(serve_it(sock, index), loop_factory=loop_factory)
        return 0

    sys.exit(supervise(workers, work))


def quiet_gc() -> None:
    """Move everything loaded at start-up (modules, settings, the catalog: hundreds of
    thousands of objects) out of the garbage collector's sight (``gc.freeze``). A full
    collection then walks only what requests create: in a burst of 1,000 requests it was
    a pause of about 85 ms on every request in flight (bench/, issue #7)."""
    gc.collect()
    gc.freeze()


@click.command()
@config_option
def refresher(config_path: Path | None) -> None:
    """Run only the refresh sweep (for deployments that refresh apart from serving)."""
    from ..scheduler import Refresher

    settings = load_config(config_path)

    async def sweep_only() -> None:
        broker = await Broker.open(settings)
        sweeper = Refresher(broker)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            sweeper.start()
            log.info("refresher running every %ss", settings.refresh.interval_seconds)
            await stop.wait()
        finally:
            await sweeper.aclose()  # lets refreshes in flight finish
            await broker.close()

    run(sweep_only(), loop_factory=event_loop_factory(settings.server.loop))
