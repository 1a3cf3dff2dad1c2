"""``broker connections``, ``broker events`` and ``broker connect-link``: what an operator
does to one group's connections. Never a credential on screen."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..runtime import Broker
from .common import config_option, load_config, run, table, with_broker

__all__ = ["connect_link", "connections", "event_line", "events"]


@click.group()
def connections() -> None:
    """Connections: list, show, refresh, disconnect (never a secret on screen)."""


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
    from ..overview import connection_rows

    settings = load_config(config_path)

    async def go(broker: Broker) -> list[dict[str, Any]]:
        async with broker.session() as db:
            return await connection_rows(db, now=broker.now(), group_id=group_id,
                                         integration=integration, status=status)

    found = run(with_broker(settings, go))
    if as_json:
        for item in found:
            click.echo(json.dumps(item))
        return
    columns = ("group", "integration", "auth_type", "status", "expires_at",
               "next_refresh_at", "failures", "last_error")
    for line in table(columns, found):
        click.echo(line)
    click.echo(f"{len(found)} connection(s)")


def one(broker: Broker, name: str) -> Any:
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
    from sqlalchemy import select

    from ..events import list_events
    from ..refresh import shown_status
    from ..store.models import Connection

    settings = load_config(config_path)

    async def go(broker: Broker) -> dict[str, Any] | None:
        one(broker, name)
        async with broker.session() as db:
            row = await db.scalar(select(Connection).where(
                Connection.group_id == group_id, Connection.integration == name))
            if row is None:
                return None
            events = [e for e in await list_events(db, group_id, limit=200)
                      if e.get("integration") == name][:10]
        return {
            "group": group_id, "integration": name, "auth_type": row.auth_type,
            "status": shown_status(row.status, row.last_error, row.expires_at, broker.now()),
            "hint": row.hint or {},
            "expires_at": row.expires_at.isoformat() if row.expires_at else None,
            "next_refresh_at": row.next_refresh_at.isoformat() if row.next_refresh_at else None,
            "failures": row.failure_count, "last_error": row.last_error,
            "updated_at": row.updated_at.isoformat(), "events": events,
        }

    found = run(with_broker(settings, go))
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
                click.echo(f"  {event_line(event, group=False)}")
        else:
            shown = json.dumps(value, default=str) if isinstance(value, dict) else value
            click.echo(f"{key}: {shown}")


@connections.command("refresh")
@config_option
@click.argument("group_id")
@click.argument("name")
def connections_refresh(config_path: Path | None, group_id: str, name: str) -> None:
    """Renew one connection's token now (the same single-flight refresh nodes share)."""
    settings = load_config(config_path)

    async def go(broker: Broker) -> Any:
        one(broker, name)
        view = await broker.credentials(group_id, name, force_refresh=True)
        return view.get("expires_at")

    expires_at = run(with_broker(settings, go))
    click.echo(f"{group_id}/{name}: refreshed; expires at {expires_at or 'never'}")


@connections.command("disconnect")
@config_option
@click.argument("group_id")
@click.argument("name")
def connections_disconnect(config_path: Path | None, group_id: str, name: str) -> None:
    """Remove one connection, as the disconnect route does (revoked at the provider when it
    can be, after the removal commits)."""
    from ..integrations import Group

    settings = load_config(config_path)

    async def go(broker: Broker) -> bool:
        integration = one(broker, name)
        async with broker.session() as db, db.begin():
            existed = await broker.repository.exists(db, group_id, name)
            await integration.delete_integration(db, Group(group_id), None)
        return bool(existed)

    existed = run(with_broker(settings, go))
    click.echo(f"{group_id}/{name}: " + ("disconnected" if existed else "was not connected"))


@click.command("connect-link")
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

    from ..integrations import GROUP_ID_PATTERN
    from ..sessions import create_session

    if not _re.fullmatch(GROUP_ID_PATTERN, group_id):
        raise click.BadParameter("not a group id", param_hint="GROUP_ID")
    settings = load_config(config_path)

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

    click.echo(run(with_broker(settings, go)))


def event_line(event: dict[str, Any], *, group: bool = True) -> str:
    """One event for people: when, (group,) integration, kind, and its detail (which never
    holds a secret: error codes, reasons, counts)."""
    detail = event.get("detail") or {}
    parts = [event["created_at"], *([event["group_id"]] if group else []),
             event["integration"], event["kind"]]
    if detail:
        parts.append(json.dumps(detail, sort_keys=True, default=str))
    return "  ".join(parts)


FOLLOW_SECONDS = 1.0
"""How often ``events --follow`` reads the feed."""
PAGE = 1000


@click.command("events")
@config_option
@click.option("--group", "group_id", default=None, help="Only this group (default: all).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="How many of the newest events to print first.")
@click.option("--follow", is_flag=True,
              help="Then print each new event as it is recorded, until interrupted.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(
    config_path: Path | None, group_id: str | None, limit: int, follow: bool, as_json: bool
) -> None:
    """The newest events (of one group, or of all), oldest first: connections made,
    refreshed, failing, needing reauth, disconnected. With --follow, new ones as they come
    (from every replica: the events table is the feed)."""
    from ..events import Cursor, events_after, list_events

    settings = load_config(config_path)

    def show(event: dict[str, Any]) -> None:
        click.echo(json.dumps(event, default=str) if as_json else event_line(event))

    async def go(broker: Broker) -> None:
        async with broker.session() as db:
            newest = await list_events(db, group_id, limit=limit)
        for event in reversed(newest):
            show(event)
        if not follow:
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # From the newest printed (with --group, a filter of an empty table: from 0).
        last = newest[0]["id"] if newest else 0
        cursor = Cursor(last, rescan=not broker.database.is_sqlite)
        while not stop.is_set():
            started = time.monotonic()
            found: list[dict[str, Any]] = []
            after = cursor.floor(started)
            async with broker.session() as db:
                while True:  # every page: a burst of more than one page is not held back
                    page = await events_after(db, after, group_id=group_id, limit=PAGE)
                    found += page
                    if len(page) < PAGE:
                        break
                    after = page[-1]["id"]
            fresh = cursor.take([e["id"] for e in found], started)
            for event in found:
                if event["id"] in fresh:
                    show(event)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FOLLOW_SECONDS)

    run(with_broker(settings, go))
