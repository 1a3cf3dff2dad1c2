"""The ``broker`` command.

    broker serve [--config PATH] [--host HOST] [--port PORT]
    broker db upgrade
    broker keys generate
    broker keys rotate [--batch-size N]
    broker providers list

Every command reads config.yaml (``--config``, ``$BROKER_CONFIG``, or ./config.yaml) and
exits non-zero with the problems listed before it touches the database.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from .auth import kind
from .config import Settings, load_settings
from .crypto import generate_key
from .errors import BrokerError, ConfigError
from .logs import configure_logging
from .runtime import Broker

__all__ = ["main"]

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


def _config_invalid(exc: ConfigError) -> NoReturn:
    click.echo("broker: configuration is invalid:", err=True)
    for problem in exc.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(2)


def _settings(config_path: Path | None) -> Settings:
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        _config_invalid(exc)
    configure_logging(settings)
    return settings


def _run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
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


async def _with_broker(settings: Settings, fn: Callable[[Broker], Awaitable[T]], **kw: Any) -> T:
    broker = await Broker.open(settings, **kw)
    try:
        return await fn(broker)
    finally:
        await broker.close()


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


@click.group()
@click.version_option(package_name="broker")
def main() -> None:
    """Keeps API keys and OAuth2 tokens for workflow nodes, encrypted and fresh."""


@main.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--refresh/--no-refresh",
    default=True,
    show_default=True,
    help="Run the refresh sweep in this process (off when `broker refresher` runs apart).",
)
def serve(config_path: Path | None, host: str, port: int, refresh: bool) -> None:
    """Apply pending migrations and serve the HTTP API (and the refresh sweep)."""
    from .web import create_app
    from .web.server import build_server

    settings = _settings(config_path)
    if not settings.auth.service_tokens and settings.sqlite_path() is None:
        # Checked before Broker.open, which connects to and migrates the database.
        _config_invalid(ConfigError([
            f"{settings.source or '(defaults)'}: auth.service_tokens: at least one token "
            "is required when the database is not a SQLite file"
        ]))

    async def run() -> None:
        broker = await Broker.open(settings)
        try:
            app = create_app(
                broker, service_tokens=service_tokens(settings), refresher=refresh
            )
            server = build_server(
                app, settings.server, host=host, port=port, log_level=settings.log_level
            )
            log.info("serving on http://%s:%d (public_url %s)", host, port, settings.public_url)
            quiet_gc()
            await server.serve()
        finally:
            await broker.close()

    _run(run())


def quiet_gc() -> None:
    """Move everything loaded at start-up (modules, settings, the catalog: hundreds of
    thousands of objects) out of the garbage collector's sight (``gc.freeze``). A full
    collection then walks only what requests create: in a burst of 1,000 requests it was
    a pause of about 85 ms on every request in flight (bench/, issue #7)."""
    gc.collect()
    gc.freeze()


@main.command()
@config_option
def refresher(config_path: Path | None) -> None:
    """Run only the refresh sweep (for deployments that refresh apart from serving)."""
    from .scheduler import Refresher

    settings = _settings(config_path)

    async def run() -> None:
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

    _run(run())


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path: Path | None) -> None:
    """Apply pending migrations."""
    settings = _settings(config_path)

    async def noop(broker: Broker) -> None:
        return None

    _run(_with_broker(settings, noop))
    click.echo("database is up to date")


@main.group()
def keys() -> None:
    """Encryption keys."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new Fernet key (put it first in encryption_keys to make it primary)."""
    click.echo(generate_key())


@keys.command("rotate")
@config_option
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
def keys_rotate(config_path: Path | None, batch_size: int) -> None:
    """Re-encrypt every stored credential with the first key in encryption_keys."""
    settings = _settings(config_path)

    async def rotate(broker: Broker) -> Any:
        def progress(changed: int) -> None:
            click.echo(f"  re-encrypted {changed} so far", err=True)

        return await broker.rotate_keys(batch_size=batch_size, after_batch=progress)

    result = _run(_with_broker(settings, rotate, migrate=False))
    click.echo(f"re-encrypted {result.changed} row(s) under key {result.key_id}")
    if result.remaining:
        click.echo(
            f"broker: {result.remaining} row(s) are still under an older key (they changed "
            "while this ran, written by a replica that does not have the new key first); "
            "run `broker keys rotate` again once every replica has the new key first",
            err=True,
        )
        sys.exit(1)
    if result.corrupt:
        click.echo(
            f"broker: {len(result.corrupt)} row(s) did not decrypt and were left as they are "
            f"(connection ids {result.corrupt[:20]})",
            err=True,
        )
        sys.exit(1)


@main.group()
def connections() -> None:
    """Connections: list them (never a secret)."""


@connections.command("list")
@config_option
@click.option("--group", "group_id", default=None, help="Only this group.")
@click.option("--provider", "integration", default=None, help="Only this integration.")
@click.option("--status", default=None,
              help="Only this status (connected, reauth_required, unavailable, corrupt...).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines for scripts.")
def connections_list(
    config_path: Path | None, group_id: str | None, integration: str | None,
    status: str | None, as_json: bool,
) -> None:
    """Every stored connection: group, integration, auth type, status, expiry, next
    refresh, failures and the last error (the error is the broker's own text, never a
    credential)."""
    import json

    from sqlalchemy import select

    from .store.models import Connection

    settings = _settings(config_path)

    async def go(broker: Broker) -> list[dict[str, Any]]:
        query = select(
            Connection.group_id, Connection.integration, Connection.auth_type,
            Connection.status, Connection.expires_at, Connection.next_refresh_at,
            Connection.failure_count, Connection.last_error,
        ).order_by(Connection.group_id, Connection.integration)
        if group_id is not None:
            query = query.where(Connection.group_id == group_id)
        if integration is not None:
            query = query.where(Connection.integration == integration)
        if status is not None:
            query = query.where(Connection.status == status)
        async with broker.session() as db:
            rows = (await db.execute(query)).all()
        return [
            {"group": r[0], "integration": r[1], "auth_type": r[2], "status": r[3],
             "expires_at": r[4].isoformat() if r[4] else None,
             "next_refresh_at": r[5].isoformat() if r[5] else None,
             "failures": r[6], "last_error": r[7]}
            for r in rows
        ]

    found = _run(_with_broker(settings, go))
    if as_json:
        for item in found:
            click.echo(json.dumps(item))
        return
    columns = ("group", "integration", "auth_type", "status", "expires_at",
               "next_refresh_at", "failures", "last_error")
    table = [[str(item[c] if item[c] is not None else "-") for c in columns] for item in found]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"{len(found)} connection(s)")


def _one(broker: Broker, name: str) -> Any:
    if name not in broker.registry:
        raise click.BadParameter(f"no integration named {name!r}", param_hint="NAME")
    return broker.registry.get(name)


@connections.command("show")
@config_option
@click.argument("group_id")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def connections_show(config_path: Path | None, group_id: str, name: str, as_json: bool) -> None:
    """One connection: status, auth type, expiry, next refresh, failures, last error, what
    may be shown of it, and its recent events. Never a credential."""
    import json

    from sqlalchemy import select

    from .events import list_events
    from .store.models import Connection

    settings = _settings(config_path)

    async def go(broker: Broker) -> dict[str, Any] | None:
        _one(broker, name)
        async with broker.session() as db:
            row = await db.scalar(select(Connection).where(
                Connection.group_id == group_id, Connection.integration == name))
            if row is None:
                return None
            events = [e for e in await list_events(db, group_id, limit=200)
                      if e.get("integration") == name][:10]
        return {
            "group": group_id, "integration": name, "auth_type": row.auth_type,
            "status": row.status, "hint": row.hint or {},
            "expires_at": row.expires_at.isoformat() if row.expires_at else None,
            "next_refresh_at": row.next_refresh_at.isoformat() if row.next_refresh_at else None,
            "failures": row.failure_count, "last_error": row.last_error,
            "updated_at": row.updated_at.isoformat(), "events": events,
        }

    found = _run(_with_broker(settings, go))
    if found is None:
        click.echo(f"broker: {group_id} has no connection to {name}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(found, default=str))
        return
    for key, value in found.items():
        if key == "events":
            click.echo("events:")
            for event in value:
                click.echo(f"  {event.get('at')}  {event.get('kind')}  "
                           f"{json.dumps(event.get('detail') or {}, default=str)}")
        else:
            shown = json.dumps(value, default=str) if isinstance(value, dict) else value
            click.echo(f"{key}: {shown}")


@connections.command("refresh")
@config_option
@click.argument("group_id")
@click.argument("name")
def connections_refresh(config_path: Path | None, group_id: str, name: str) -> None:
    """Renew one connection's token now (the same single-flight refresh nodes share)."""
    settings = _settings(config_path)

    async def go(broker: Broker) -> Any:
        _one(broker, name)
        view = await broker.credentials(group_id, name, force_refresh=True)
        return view.get("expires_at")

    expires_at = _run(_with_broker(settings, go))
    click.echo(f"{group_id}/{name}: refreshed; expires at {expires_at or 'never'}")


@connections.command("disconnect")
@config_option
@click.argument("group_id")
@click.argument("name")
def connections_disconnect(config_path: Path | None, group_id: str, name: str) -> None:
    """Remove one connection, as the disconnect route does (revoked at the provider when it
    can be, after the removal commits)."""
    from .integrations import Group

    settings = _settings(config_path)

    async def go(broker: Broker) -> bool:
        integration = _one(broker, name)
        async with broker.session() as db, db.begin():
            existed = await broker.repository.exists(db, group_id, name)
            await integration.delete_integration(db, Group(group_id), None)
        return bool(existed)

    existed = _run(_with_broker(settings, go))
    click.echo(f"{group_id}/{name}: " + ("disconnected" if existed else "was not connected"))


@main.command("connect-link")
@config_option
@click.argument("group_id")
@click.option("--integration", "integrations", multiple=True,
              help="Limit the page to this integration (repeatable).")
@click.option("--display-name", default=None, help="The workspace name the page shows.")
def connect_link(
    config_path: Path | None, group_id: str, integrations: tuple[str, ...],
    display_name: str | None,
) -> None:
    """Create a connect session for GROUP_ID and print the connect page's URL (the quickest
    way to see the page). The URL carries the session token: hand it only to that group's
    user."""
    import re as _re
    from datetime import timedelta

    from .integrations import GROUP_ID_PATTERN
    from .sessions import create_session

    if not _re.fullmatch(GROUP_ID_PATTERN, group_id):
        raise click.BadParameter("not a group id", param_hint="GROUP_ID")
    settings = _settings(config_path)

    async def go(broker: Broker) -> str:
        for name in integrations:
            if name not in broker.registry:
                raise click.BadParameter(f"no integration named {name!r}",
                                         param_hint="--integration")
        ttl = timedelta(seconds=settings.auth.connect_session_ttl_seconds)
        async with broker.session() as db, db.begin():
            token, _ = await create_session(
                db, group_id=group_id, integrations=list(integrations) or None,
                now=broker.now(), ttl=ttl, display_name=display_name,
            )
        return f"{settings.public_url}/connect#session={token}"

    click.echo(_run(_with_broker(settings, go)))


@main.group()
def providers() -> None:
    """The provider catalog."""


@providers.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--only", "only", multiple=True, help="Convert only these entries (repeatable).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("providers-imported"), show_default=True,
              help="Where to write the provider files.")
def providers_import(source: Path, only: tuple[str, ...], out: Path) -> None:
    """Convert a file in Nango's providers.yaml format into broker provider files, and
    say, for each entry, what could not be carried over and why."""
    import yaml

    from .nangoimport import convert, dump_provider

    try:
        entries = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{source}: not YAML ({type(exc).__name__})") from None
    if not isinstance(entries, dict):
        raise click.ClickException(f"{source}: expected a mapping of provider entries")
    names = list(only) or sorted(str(k) for k in entries)
    missing = [n for n in names if n not in entries]
    if missing:
        raise click.ClickException(f"not in {source}: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    written = refused = 0
    for name in names:
        result = convert(name, entries)
        if result.data is None:
            refused += 1
            click.echo(f"{name}: refused: {result.refused}")
        else:
            written += 1
            (out / f"{name}.yaml").write_text(dump_provider(name, result.data, source.name),
                                               encoding="utf-8")
            click.echo(f"{name}: written to {out / (name + '.yaml')}")
        for note in result.notes:
            click.echo(f"  - {note}")
    click.echo(f"{written} written, {refused} refused")


@providers.command("list")
@config_option
def providers_list(config_path: Path | None) -> None:
    """The enabled providers, how each is connected, and the OAuth2 redirect URI."""
    settings = _settings(config_path)
    oauth = False
    for name, spec in settings.resolved_providers.items():
        auth_type = getattr(spec, "auth_type", "")
        oauth = oauth or kind(auth_type).connect == "popup"
        click.echo(f"{name:20} {spec.display_name:24} {auth_type}")
    if oauth:
        click.echo(
            "\nRedirect URI to register with each provider connected by a sign-in popup: "
            f"{settings.redirect_uri}"
        )
