"""Shared fixtures: settings on a real SQLite file or a real PostgreSQL database.

``store_url`` is parametrized over SQLite and PostgreSQL. PostgreSQL cases need
``BROKER_TEST_DATABASE_URL`` (``postgresql+asyncpg://postgres@127.0.0.1:5432/test``); each
test session creates its own scratch database there and drops it at the end, so concurrent
runs do not see each other's rows. Without the variable those cases skip with a reason.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from broker.config import Settings, load_settings
from broker.crypto import generate_key
from broker.runtime import Broker
from broker.web import create_app
from tests.support import yaml_text

pytest_plugins = ["tests.authserver.fixture", "tests.apiserver.fixture"]

PG_ENV = "BROKER_TEST_DATABASE_URL"
SERVICE_TOKEN = "test-service-token-0123456789"


def _admin_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str | None]:
    """A scratch PostgreSQL database for this test session (None without the env var)."""
    base = os.environ.get(PG_ENV)
    if not base:
        yield None
        return
    import asyncio

    import asyncpg

    name = f"broker_test_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(_admin_dsn(base))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def reset_postgres(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_admin_dsn(url))
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_server_url: str | None
) -> str:
    """A database URL with an empty database behind it."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    if pg_server_url is None:
        pytest.skip(f"PostgreSQL case: set {PG_ENV} to run it")
    await reset_postgres(pg_server_url)
    return pg_server_url


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Write a config.yaml under tmp_path from keyword overrides and load it for real."""

    def make(**overrides: Any) -> Settings:
        data: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}",
            "encryption_keys": [generate_key()],
            "auth": {"service_tokens": [SERVICE_TOKEN]},
            "providers": {"openweathermap": {"verify": None}},
        }
        data.update(overrides)
        path = tmp_path / "config.yaml"
        path.write_text(yaml_text(data))
        return load_settings(path, env={})

    return make


@pytest.fixture
async def broker(store_url: str, make_settings: Callable[..., Settings]) -> AsyncIterator[Broker]:
    """An open broker on SQLite and on PostgreSQL."""
    b = await Broker.open(make_settings(database_url=store_url))
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def client(broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the app, in process, authenticated with the service token."""
    app = create_app(broker)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://broker.test",
        headers={"Authorization": f"Bearer {SERVICE_TOKEN}"},
    ) as c:
        yield c
