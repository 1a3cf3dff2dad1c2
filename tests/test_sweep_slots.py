"""The sweep's concurrency (``scheduler.sweep``, ``credentials.ANSWERED``):
``refresh.max_concurrency`` bounds the token requests in flight, and a refresh whose
provider has answered stores its token while the next refresh asks. A real token endpoint
on loopback that counts the requests it is answering at once; the store made slow (a busy
database) by a wrapper that only waits before the real write. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from broker.config import Settings
from broker.runtime import Broker
from broker.scheduler import sweep
from broker.store.models import Connection
from tests.support import serve

SLOTS = 3
DUE = 9
ANSWER_AFTER = 0.2
STORE_TAKES = 0.3


class Endpoint:
    """A token endpoint answering every refresh after ``ANSWER_AFTER`` seconds."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.started: list[float] = []
        self.storing = 0
        self.most_busy = 0
        """The most refreshes at once asking the provider or storing its answer."""

    def busy(self) -> None:
        self.most_busy = max(self.most_busy, self.in_flight + self.storing)

    async def token(self, request: Request) -> JSONResponse:
        form = parse_qs((await request.body()).decode())
        assert form["grant_type"] == ["refresh_token"]
        self.started.append(time.monotonic())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.busy()
        try:
            await asyncio.sleep(ANSWER_AFTER)
        finally:
            self.in_flight -= 1
        return JSONResponse({
            "access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
            "expires_in": 3600, "refresh_token": secrets.token_urlsafe(16),
        })


@asynccontextmanager
async def due_connections(
    store_url: str, make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[Broker, Endpoint]]:
    """A broker with ``SLOTS`` slots and ``DUE`` OAuth2 connections due now, whose
    provider's token endpoint is an ``Endpoint`` served on loopback."""
    endpoint = Endpoint()
    app = Starlette(routes=[Route("/token", endpoint.token, methods=["POST"])])
    async with serve(app) as url:
        settings = make_settings(
            database_url=store_url,
            refresh={"max_concurrency": SLOTS},
            providers={"acme": {
                "display_name": "Acme", "auth_type": "oauth2",
                "authorization_url": "http://127.0.0.1:9/authorize",
                "token_url": f"{url}/token", "client_id": "c", "client_secret": "s",
            }},
        )
        broker = await Broker.open(settings)
        try:
            now = datetime.now(UTC)
            async with broker.session() as db, db.begin():
                for i in range(DUE):
                    await broker.repository.put(
                        db, f"g{i}", "acme",
                        {"access_token": f"old-{i}", "token_type": "Bearer",
                         "refresh_token": f"rt-{i}",
                         "expires_at": int((now + timedelta(minutes=30)).timestamp())},
                        auth_type="oauth2", hint={},
                        expires_at=now + timedelta(minutes=30),
                        next_refresh_at=now - timedelta(seconds=5),
                    )
            yield broker, endpoint
        finally:
            await broker.close()


async def test_token_requests_are_bounded_and_a_slot_is_free_while_its_answer_is_stored(
    store_url: str, make_settings: Callable[..., Settings],
) -> None:
    async with due_connections(store_url, make_settings) as (broker, endpoint):
        real = broker.tokens.writer.store

        async def slow_store(item: Any) -> bool:
            endpoint.storing += 1
            endpoint.busy()
            try:
                await asyncio.sleep(STORE_TAKES)
                return await real(item)
            finally:
                endpoint.storing -= 1

        broker.tokens.writer.store = slow_store  # type: ignore[method-assign]
        result = await sweep(broker)

    assert (result.claimed, result.refreshed, result.failed) == (DUE, DUE, 0)
    assert len(endpoint.started) == DUE
    assert endpoint.most_in_flight == SLOTS  # never more, and the bound was used
    # More refreshes under way than slots: some asked while others stored their answers
    # (a storing refresh holds no slot). Holding one to the end, it could never exceed 3.
    assert endpoint.most_busy > SLOTS


async def test_the_stored_rows_are_the_new_tokens(
    store_url: str, make_settings: Callable[..., Settings],
) -> None:
    """Same sweep, nothing slowed: every row is at its next version, leased by nobody,
    due again later, holding a token the endpoint issued."""
    async with due_connections(store_url, make_settings) as (broker, _):
        started = datetime.now(UTC)
        result = await sweep(broker)
        assert result.refreshed == DUE
        async with broker.session() as db:
            for i in range(DUE):
                found = await broker.repository.get(db, f"g{i}", "acme")
                assert found is not None
                assert found.info.version == 2
                assert not found.data["access_token"].startswith("old-")
            rows = (await db.execute(
                Connection.__table__.select().where(Connection.integration == "acme")
            )).all()
        assert all(r.lease_owner is None for r in rows)
        assert all(r.next_refresh_at > started for r in rows)
