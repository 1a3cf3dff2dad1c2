"""What every ``broker`` command shares: the ``--config`` option, loading the settings
(and configuring logging) before anything else, running a coroutine with clear errors, and
the service token the SQLite default creates for itself."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from ..config import Settings, load_settings
from ..errors import BrokerError, ConfigError
from ..logs import configure_logging
from ..runtime import Broker

__all__ = [
    "config_invalid",
    "config_option",
    "event_loop_factory",
    "load_config",
    "run",
    "service_tokens",
    "table",
    "with_broker",
]

T = TypeVar("T")
log = logging.getLogger("broker")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="BROKER_CONFIG",
    default=None,
    help="config.yaml to use (default: $BROKER_CONFIG, else ./config.yaml if present).",
)


def config_invalid(exc: ConfigError) -> NoReturn:
    click.echo("broker: configuration is invalid:", err=True)
    for problem in exc.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(2)


def load_config(config_path: Path | None) -> Settings:
    """The settings, or exit 2 listing every problem; then logging as configured."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        config_invalid(exc)
    configure_logging(settings)
    return settings


def event_loop_factory(loop: str) -> Callable[[], Any] | None:
    """A new-event-loop function for ``server.loop``: ``uvloop``, ``asyncio``, or ``auto``
    (uvloop when installed); None for asyncio's default."""
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise RuntimeError("server.loop is uvloop, which is not installed") from None
        return None
    return uvloop.new_event_loop


def run(coro: Awaitable[T], *, loop_factory: Callable[[], Any] | None = None) -> T:
    """Run ``coro`` (on a loop from ``loop_factory``, else asyncio's); the broker's errors
    and an unreachable database exit 1 with one line saying what went wrong."""
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    except BrokerError as exc:
        click.echo(f"broker: {exc}", err=True)
        sys.exit(1)
    except (OSError, DBAPIError) as exc:
        # The database cannot be reached (refused, unknown host, bad credentials).
        click.echo(
            f"broker: cannot use the database: {type(exc).__name__}: "
            f"{getattr(exc, 'orig', None) or exc}",
            err=True,
        )
        sys.exit(1)


async def with_broker(settings: Settings, fn: Callable[[Broker], Awaitable[T]], **kw: Any) -> T:
    broker = await Broker.open(settings, **kw)
    try:
        return await fn(broker)
    finally:
        await broker.close()


def table(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> list[str]:
    """``rows`` as aligned text columns (``-`` for None), a header line first."""
    cells = [[str(row[c]) if row.get(c) is not None else "-" for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    return [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(columns), *cells]
    ]


def service_tokens(settings: Settings) -> list[str]:
    """Configured service tokens, or (SQLite only) the token file beside the database."""
    tokens = [t.get_secret_value() for t in settings.auth.service_tokens]
    if tokens:
        return tokens
    db = settings.sqlite_path()
    if db is None:
        raise ConfigError(["auth.service_tokens: required when the database is not SQLite"])
    path = db.with_suffix(".token")
    if path.exists():
        return [path.read_text().strip()]
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning(
        "auth.service_tokens is empty: created a service token in %s (mode 0600); "
        "send it as `Authorization: Bearer <token>`",
        path,
    )
    return [token]
