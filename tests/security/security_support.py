"""Shared pieces of the security suite (issue #6): an in-process broker with a fixed set of
providers, table snapshots, and checks that a response leaks nothing.

Test modules bind the fixtures at module level, like ``live_factory``::

    from tests.security import security_support as sec
    sec_broker = sec.sec_broker
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import select

from broker.config import Settings
from broker.runtime import Broker
from broker.store.models import Connection, ConnectSession, Event, OAuthFlow, WebhookDelivery
from broker.web import create_app
from tests.authserver.server import AuthServer
from tests.oauth_support import page_data

__all__ = [
    "AUTH",
    "BASE_URL",
    "HOST_ORIGIN",
    "KEY_A",
    "KEY_B",
    "PROVIDERS",
    "app_client",
    "assert_no_stack_trace",
    "sec_broker",
    "snapshot",
]

BASE_URL = "http://broker.test"
HOST_ORIGIN = "http://host.example"
AUTH = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
KEY_A = "a" * 16 + "0123456789abcdef"  # 32 hex characters
KEY_B = "b" * 16 + "fedcba9876543210"

PROVIDERS: dict[str, Any] = {
    "hexkey": {
        "display_name": "Hex Key Service",
        "auth_type": "apikey",
        "fields": {"api_key": {"title": "API key", "pattern": "^[0-9a-f]{32}$"}},
    },
    "other": {
        "display_name": "Other Key Service",
        "auth_type": "apikey",
        "fields": {"api_key": {"title": "API key", "pattern": "^[0-9a-f]{32}$"}},
    },
    # Never contacted by the in-process tests: begin() only builds the provider URL.
    "acme": {
        "display_name": "Acme",
        "auth_type": "oauth2",
        "authorization_url": "https://provider.invalid/authorize",
        "token_url": "https://provider.invalid/token",
        "issuer": "https://provider.invalid",
        "default_scopes": ["read"],
        "client_id": "client-id-for-acme",
        "client_secret": "client-secret-for-acme-0123456789",
    },
}


@pytest.fixture
async def sec_broker(
    store_url: str, make_settings: Callable[..., Settings]
) -> AsyncIterator[Broker]:
    """An open broker (SQLite and PostgreSQL) with ``hexkey``, ``other`` and ``acme``."""
    settings = make_settings(
        database_url=store_url,
        public_url=BASE_URL,
        providers=PROVIDERS,
        auth={"service_tokens": [SERVICE_TOKEN], "allowed_origins": [HOST_ORIGIN]},
    )
    broker = await Broker.open(settings)
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def app_client(
    broker: Broker, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process. Unhandled errors come back as the 500 a client would see."""
    transport = httpx.ASGITransport(app=create_app(broker), raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url=BASE_URL, headers=AUTH if headers is None else headers
    ) as client:
        yield client


TABLES = (Connection, Event, OAuthFlow, ConnectSession, WebhookDelivery)


async def snapshot(broker: Broker) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, every column (versions, leases, ciphertexts included)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with broker.session() as db:
        for model in TABLES:
            columns = list(model.__table__.columns)
            rows = (await db.execute(select(*columns))).all()
            out[model.__tablename__] = sorted((tuple(r) for r in rows), key=repr)
    return out


_TRACE = re.compile(r"Traceback|File \"|\.py\", line|site-packages|/broker/|/tests/")


def assert_no_stack_trace(text: str, sent: str = "") -> None:
    """No traceback, source file path or line reference in what a client sees (unless the
    client sent that very text itself, and the API names it back as a field)."""
    for found in _TRACE.finditer(text):
        assert found.group(0) in sent, f"stack trace material {found.group(0)!r}: {text[:500]}"


# --------------------------------------------------------------------------- live OAuth2 flows


def with_params(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (None removes one), order kept."""
    parts = urlsplit(url)
    pairs = [(k, changes.get(k, v)) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return parts._replace(query=urlencode([(k, v) for k, v in pairs if v is not None])).geturl()


def token_requests(server: AuthServer) -> int:
    """Every request the server's token endpoint received (faulted ones included)."""
    return sum(server.token_requests.values())


def assert_error_page(page: httpx.Response, message: str, *, status_code: int = 400) -> None:
    """The popup's result page, saying ``message``, telling its opener ``error``."""
    assert page.status_code == status_code, page.text
    assert page.headers["content-type"].startswith("text/html"), page.headers
    data = page_data(page)["message"]
    assert data["type"] == "broker:oauth"
    assert data["status"] == "error"
    assert message in data["error"], data["error"]
    assert message in page.text


async def connections(broker: Broker) -> list[tuple[Any, ...]]:
    """The connections and events tables (what a flow may write), as they are."""
    tables = await snapshot(broker)
    return [*tables["connections"], *tables["events"]]
