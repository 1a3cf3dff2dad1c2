"""``broker events [--follow]``, ``broker connections list --status unavailable``,
``broker providers check`` and ``broker doctor``, run as real subprocesses on SQLite and
PostgreSQL, with the pure parts (what a finding means, what check prints) as unit tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update

from broker.cli.doctor import check_clock, check_keys, check_public_url
from broker.cli.providers import describe
from broker.config import Settings
from broker.crypto import generate_key
from broker.runtime import Broker
from broker.store.models import Connection
from tests.test_cli_connections import run


async def seed(settings: Settings, groups: list[str]) -> None:
    broker = await Broker.open(settings)
    try:
        async with broker.session() as db, db.begin():
            for group in groups:
                await broker.repository.put(
                    db, group, "openweathermap", {"api_key": f"owm-secret-{group}"},
                    auth_type="apikey", hint={},
                )
    finally:
        await broker.close()


async def test_events_lists_then_follows_new_ones_until_interrupted(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(database_url=store_url)
    await seed(settings, ["g1", "g2"])

    listed = run(tmp_path, "events", "--json")
    assert listed.returncode == 0, listed.stderr
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(e["group_id"], e["kind"]) for e in events] == [("g1", "connected"),
                                                            ("g2", "connected")]
    one = run(tmp_path, "events", "--group", "g2")
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 1, one.stdout
    assert "g2  openweathermap  connected" in one.stdout

    env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "events", "--follow", "--group", "g3", "--json",
        "--config", str(tmp_path / "config.yaml"),
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(2.0)  # started and following (nothing of g3 yet)
        await seed(settings, ["g3", "g4"])  # g4 is filtered out
        assert follower.stdout is not None
        line = (await asyncio.wait_for(follower.stdout.readline(), 20)).decode()
        followed = json.loads(line)
        assert (followed["group_id"], followed["kind"]) == ("g3", "connected")
    finally:
        follower.send_signal(signal.SIGINT)
        out_bytes, err_bytes = await asyncio.wait_for(follower.communicate(), 20)
    out, err = out_bytes.decode(), err_bytes.decode()
    assert follower.returncode == 0, err
    assert out == ""  # nothing more: g4's event was not g3's
    assert "owm-secret" not in listed.stdout + one.stdout + line + out + err


async def test_list_by_shown_status_finds_unavailable_connections(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(database_url=store_url)
    await seed(settings, ["g1", "g2"])
    broker = await Broker.open(settings)
    try:
        async with broker.session() as db, db.begin():
            # g2: refreshes failing and the token run out.
            await db.execute(update(Connection).where(Connection.group_id == "g2").values(
                last_error="http_503", failure_count=3,
                expires_at=broker.now() - timedelta(minutes=1)))
    finally:
        await broker.close()
    down = run(tmp_path, "connections", "list", "--status", "unavailable", "--json")
    assert down.returncode == 0, down.stderr
    rows = [json.loads(line) for line in down.stdout.splitlines()]
    assert [(r["group"], r["status"], r["last_error"], r["failures"]) for r in rows] == [
        ("g2", "unavailable", "http_503", 3)]
    fine = run(tmp_path, "connections", "list", "--status", "connected", "--json")
    assert [json.loads(line)["group"] for line in fine.stdout.splitlines()] == ["g1"]


def test_providers_check_an_enabled_and_a_catalog_provider(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    make_settings(public_url="https://broker.example.com")
    enabled = run(tmp_path, "providers", "check", "openweathermap")
    assert enabled.returncode == 0, enabled.stderr
    assert "openweathermap: OpenWeatherMap (apikey" in enabled.stdout
    assert "valid" in enabled.stdout.splitlines()[0]

    github = run(tmp_path, "providers", "check", "github")
    assert github.returncode == 0, github.stderr
    assert "not enabled" in github.stdout.splitlines()[0]
    assert "  authorization_url: https://github.com/login/oauth/authorize" in github.stdout
    assert ("  redirect URI to register with the provider: "
            "https://broker.example.com/oauth/callback") in github.stdout

    missing = run(tmp_path, "providers", "check", "no-such-provider")
    assert missing.returncode != 0 and "no provider 'no-such-provider'" in missing.stderr


def test_providers_check_refuses_an_invalid_file(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "broken.yaml").write_text(
        "auth_type: oauth2\ndisplay_name: Broken\nauthorization_url: http://{host}/auth\n"
        "token_url: https://example.com/token\n"
    )
    make_settings(catalog_paths=[str(catalog)])
    broken = run(tmp_path, "providers", "check", "broken")
    assert broken.returncode == 1
    assert "broken.yaml: invalid" in broken.stderr


def test_describe_fills_placeholders_from_examples() -> None:
    from broker.catalog import parse_provider

    spec = parse_provider({
        "name": "desk", "display_name": "Desk", "auth_type": "oauth2", "client_id": "x",
        "authorization_url": "https://{subdomain}.desk.example/oauth/authorize",
        "token_url": "https://{subdomain}.desk.example/oauth/token",
        "allowed_hosts": ["*.desk.example"],
        "settings": {"subdomain": {"title": "Subdomain", "secret": False,
                                   "pattern": "^[a-z0-9-]{1,63}$", "example": "acme"}},
    })
    settings = Settings(public_url="https://b.example")
    lines = describe(spec, settings)
    assert "  authorization_url: https://acme.desk.example/oauth/authorize" in lines
    assert "    (template: https://{subdomain}.desk.example/oauth/authorize)" in lines
    assert "  setting subdomain: Subdomain pattern ^[a-z0-9-]{1,63}$" in lines
    assert lines[-1] == "  redirect URI to register with the provider: https://b.example/oauth/callback"


async def test_doctor_passes_a_sound_deployment_and_names_what_to_fix(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    key = generate_key()
    settings = make_settings(database_url=store_url, encryption_keys=[key],
                             public_url="https://broker.example.com")
    await seed(settings, ["g1"])
    good = run(tmp_path, "doctor")
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    for name in ("configuration", "database", "migrations", "encryption keys", "public_url"):
        assert any(line.startswith("[  ok] " + name) for line in lines), (name, lines)
    assert lines[-1] == "nothing to fix"
    if not settings.is_sqlite:
        assert any(line.startswith("[  ok] clock") for line in lines), lines

    # The key the rows were written with is gone, and a provider has no client id.
    make_settings(database_url=store_url, encryption_keys=[generate_key()],
                  public_url="http://broker.example.com")
    bad = run(tmp_path, "doctor")
    assert bad.returncode == 1
    assert "[FAIL] encryption keys: 1 of 1 stored credential(s) are under key id(s)" in bad.stdout
    assert "[FAIL] public_url: http://broker.example.com is not https" in bad.stdout
    assert bad.stdout.splitlines()[-1] == "2 to fix"
    assert key not in bad.stdout + bad.stderr and "owm-secret" not in bad.stdout


def test_doctor_reports_a_database_it_cannot_reach(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    make_settings(database_url="postgresql+asyncpg://postgres@127.0.0.1:1/none",
                  encryption_keys=[generate_key()])
    down = run(tmp_path, "doctor")
    assert down.returncode == 1
    assert "[FAIL] database: cannot connect" in down.stdout
    assert "fix: check database_url" in down.stdout


def test_doctor_decisions() -> None:
    assert check_public_url("https://b.example").ok
    loopback = check_public_url("http://127.0.0.1:8000")
    assert not loopback.ok and loopback.warning
    assert not check_public_url("http://b.example").warning
    assert [c.ok for c in check_keys(["k2", "k1"], {"k2": 3})] == [True]
    rotated = check_keys(["k2", "k1"], {"k2": 3, "k1": 2})
    assert [(c.name, c.ok, c.warning) for c in rotated] == [
        ("encryption keys", True, False), ("key rotation", False, True)]
    unknown = check_keys(["k2"], {"k9": 4, "k2": 1})
    assert not unknown[0].ok and "4 of 5" in unknown[0].detail and "k9" in unknown[0].detail
    now = datetime(2026, 12, 3, tzinfo=UTC)
    assert check_clock(now, now + timedelta(seconds=2)).ok
    late = check_clock(now, now + timedelta(seconds=30))
    assert not late.ok and late.warning and "+30.0 s" in late.detail



async def test_admin_link_is_one_time_on_either_store(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """``broker admin-link`` against the store itself (the browser test runs on SQLite):
    the printed token opens one session, once, and only its hash is stored."""
    from sqlalchemy import select

    from broker.admin import redeem_link, session_ends
    from broker.store.models import AdminGrant

    settings = make_settings(database_url=store_url, public_url="https://broker.example.com")
    await seed(settings, [])
    printed = run(tmp_path, "admin-link")
    assert printed.returncode == 0, printed.stderr
    url = printed.stdout.strip()
    assert url.startswith("https://broker.example.com/admin/enter#bal_")
    token = url.split("#", 1)[1]
    broker = await Broker.open(settings)
    try:
        async with broker.session() as db:
            stored = list(await db.scalars(select(AdminGrant.token_hash)))
        assert len(stored) == 1 and token not in stored[0]
        async with broker.session() as db, db.begin():
            session = await redeem_link(db, token, now=broker.now())
        assert session is not None and session.startswith("bas_")
        async with broker.session() as db, db.begin():
            assert await redeem_link(db, token, now=broker.now()) is None  # used
            ends = await session_ends(db, session, now=broker.now())
        assert ends is not None and ends > broker.now() + timedelta(minutes=59)
    finally:
        await broker.close()


def test_doctor_on_a_fresh_sqlite_deployment_creates_nothing(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}",
                  encryption_keys=[], public_url="https://broker.example.com")
    fresh = run(tmp_path, "doctor")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "fresh.db is created at the first start" in fresh.stdout
    assert "fresh.key is created at the first start" in fresh.stdout
    assert not (tmp_path / "fresh.db").exists() and not (tmp_path / "fresh.key").exists()
