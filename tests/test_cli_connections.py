"""``broker connections list`` and ``broker connect-link``, run as real subprocesses on
SQLite and PostgreSQL against a store with real rows: what an operator reads, as a table
and as JSON, and a connect link that opens a real session. No secret is ever printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.config import Settings
from broker.runtime import Broker
from broker.sessions import find_session
from tests import oauth_support

live_factory = oauth_support.live_factory


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
    return subprocess.run([sys.executable, "-m", "broker", *args, "--config",
                           str(cwd / "config.yaml")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


async def test_connections_list_and_connect_link(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(database_url=store_url)
    broker = await Broker.open(settings)
    try:
        async with broker.session() as db, db.begin():
            for group, status in (("g1", "connected"), ("g2", "reauth_required")):
                await broker.repository.put(
                    db, group, "openweathermap", {"api_key": f"owm-secret-{group}"},
                    auth_type="apikey", hint={},
                )
        async with broker.session() as db, db.begin():
            from sqlalchemy import update

            from broker.store.models import Connection

            await db.execute(update(Connection).where(Connection.group_id == "g2").values(
                status="reauth_required", last_error="the provider refused the grant"))
    finally:
        await broker.close()

    table = run(tmp_path, "connections", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["group", "integration", "auth_type", "status"]
    assert [line.split()[0] for line in lines[1:3]] == ["g1", "g2"]
    assert lines[-1] == "2 connection(s)"
    assert "owm-secret" not in table.stdout + table.stderr

    broken = run(tmp_path, "connections", "list", "--status", "reauth_required", "--json")
    assert broken.returncode == 0, broken.stderr
    rows = [json.loads(line) for line in broken.stdout.splitlines()]
    assert [row | {"updated_at": "-"} for row in rows] == [{
        "group": "g2", "integration": "openweathermap", "auth_type": "apikey",
        "status": "reauth_required", "expires_at": None, "next_refresh_at": None,
        "failures": 0, "last_error": "the provider refused the grant", "updated_at": "-",
    }]
    assert run(tmp_path, "connections", "list", "--group", "nobody").stdout.splitlines()[-1] == (
        "0 connection(s)")

    link = run(tmp_path, "connect-link", "g1", "--integration", "openweathermap",
               "--display-name", "Team One")
    assert link.returncode == 0, link.stderr
    url = link.stdout.strip()
    assert url.startswith(f"{settings.public_url}/connect#session=bcs_")
    broker = await Broker.open(settings)
    try:
        async with broker.session() as db:
            grant = await find_session(db, url.split("#session=")[1])
    finally:
        await broker.close()
    assert grant is not None and grant.group_id == "g1"
    assert grant.integrations == ["openweathermap"] and grant.display_name == "Team One"
    refused = run(tmp_path, "connect-link", "g1", "--integration", "nope")
    assert refused.returncode != 0 and "no integration named" in refused.stderr


async def test_show_refresh_and_disconnect_one_connection(
    live_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """On a real OAuth2 connection (the test authorization server): show it, refresh it
    (a new token at the provider), disconnect it (revoked there); no token is printed."""
    from tests.test_refresh import connected

    async with live_factory() as live:
        stored = await connected(live)
        config = live.broker.settings.source
        assert config is not None

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
            return subprocess.run([sys.executable, "-m", "broker", *args, "--config",
                                   str(config)], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=60, check=False)

        shown = cli("connections", "show", "g1", "acme", "--json")
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert (data["status"], data["auth_type"]) == ("connected", "oauth2")
        assert data["expires_at"] and data["events"][0]["kind"] == "connected"
        before = live.server.token_requests["refresh_token"]
        refreshed = cli("connections", "refresh", "g1", "acme")
        assert refreshed.returncode == 0, refreshed.stderr
        assert "refreshed; expires at" in refreshed.stdout
        assert live.server.token_requests["refresh_token"] == before + 1
        gone = cli("connections", "disconnect", "g1", "acme")
        assert gone.returncode == 0 and "disconnected" in gone.stdout, gone.stderr
        assert live.server.requests_seen("revoke"), "revoked at the provider"
        again = cli("connections", "show", "g1", "acme")
        assert again.returncode == 1 and "has no connection" in again.stderr
        everything = shown.stdout + refreshed.stdout + gone.stdout + shown.stderr
        assert stored["access_token"] not in everything
        assert stored["refresh_token"] not in everything
