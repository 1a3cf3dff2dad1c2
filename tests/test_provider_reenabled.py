"""A provider disabled and enabled again: the sweep of a broker without the provider parks
its due connections, and a broker that has it again refreshes them (real authorization
server, SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from alembic import command
from sqlalchemy import update

from broker.config import Settings
from broker.runtime import Broker
from broker.scheduler import sweep
from broker.store.database import _alembic_config
from broker.store.models import PARKED, Connection
from tests import refresh_support
from tests.refresh_support import connect, rows

refresh_live = refresh_support.refresh_live


def advance(broker: Broker, by: timedelta) -> None:
    base = broker.clock
    broker.clock = lambda: base() + by


async def test_connections_resume_when_their_provider_is_enabled_again(
    refresh_live: Callable[..., Any], store_url: str, make_settings: Callable[..., Settings]
) -> None:
    async with refresh_live() as live:
        await connect(live, "g1")
        row, first = (await rows(live.broker))["g1"]
        assert row.next_refresh_at is not None
        due = row.next_refresh_at - live.broker.now() + timedelta(seconds=30)

        # The operator disables the provider: the sweep finds the connection due, parks it.
        keys = [k.get_secret_value() for k in live.broker.settings.encryption_keys]
        without = await Broker.open(make_settings(database_url=store_url, encryption_keys=keys))
        try:
            assert "acme" not in without.registry
            advance(without, due)
            assert (await sweep(without)).claimed == 1
            assert (await sweep(without)).claimed == 0  # parked: not claimed sweep after sweep
        finally:
            await without.close()
        parked, _ = (await rows(live.broker))["g1"]
        assert parked.next_refresh_at == PARKED and parked.lease_owner is None

        # ... and enables it again: the next sweep refreshes the token.
        again = await Broker.open(live.broker.settings)
        try:
            advance(again, due)
            result = await sweep(again)
            assert (result.claimed, result.refreshed) == (1, 1)
        finally:
            await again.close()
        row, token = (await rows(live.broker))["g1"]
        assert token["access_token"] != first["access_token"]
        assert live.server.token_requests["refresh_token"] == 1
        assert row.next_refresh_at is not None and row.next_refresh_at < PARKED


async def test_connections_parked_by_an_older_version_resume_after_the_upgrade(
    refresh_live: Callable[..., Any],
) -> None:
    """Before migration 0005 the sweep parked a connection with ``next_refresh_at`` NULL,
    which nothing ever undid: the migration marks those rows parked."""
    async with refresh_live() as live:
        await connect(live, "g1")
        row, first = (await rows(live.broker))["g1"]
        assert row.next_refresh_at is not None
        due = row.next_refresh_at - live.broker.now() + timedelta(seconds=30)
        # The schema as the version before 0005 left it (Alembic's own downgrade), and a
        # row that version parked.
        async with live.broker.database.engine.begin() as conn:
            await conn.run_sync(downgrade_to, "0004")
        async with live.broker.session() as db, db.begin():
            await db.execute(
                update(Connection).where(Connection.group_id == "g1").values(next_refresh_at=None)
            )

        upgraded = await Broker.open(live.broker.settings)  # applies 0005
        try:
            advance(upgraded, due)
            result = await sweep(upgraded)
            assert (result.claimed, result.refreshed) == (1, 1)
        finally:
            await upgraded.close()
        _, token = (await rows(live.broker))["g1"]
        assert token["access_token"] != first["access_token"]


def downgrade_to(conn: Any, revision: str) -> None:
    cfg = _alembic_config()
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, revision)
