"""broker/web/fastpath.py: a node's read of a connection (warm, cold, or failing) is
answered before the rest of the stack, with the same bytes as the whole way; everything
else goes the whole way and gets what it got before. Real app over a real socket, SQLite
and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from conftest import SERVICE_TOKEN

from broker.runtime import Broker
from broker.web import create_app
from broker.web.fastpath import CredentialsFastPath
from tests.support import serve

KEY = "owm-fastpath-key-0123456789abcdef"
PATH = "/groups/g1/integrations/openweathermap/credentials"


def fast_path_of(app: Any) -> CredentialsFastPath:
    node = app.middleware_stack
    while node is not None and not isinstance(node, CredentialsFastPath):
        node = getattr(node, "app", None)
    assert isinstance(node, CredentialsFastPath)
    return node


@pytest.fixture
async def live(broker: Broker) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = create_app(broker)
    async with serve(app) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10
    ) as client:
        yield app, client


def answer(r: httpx.Response) -> tuple[int, bytes, str | None, str | None]:
    return r.status_code, r.content, r.headers.get("content-type"), r.headers.get(
        "cache-control")


async def test_a_warm_read_is_answered_early_with_the_same_bytes(
    live: tuple[Any, httpx.AsyncClient],
) -> None:
    app, client = live
    r = await client.post("/groups/g1/integrations/custom/openweathermap",
                          json={"api_key": KEY})
    assert r.status_code == 200, r.text
    whole = await client.get(PATH + "?via=stack")  # a query string: the whole way
    fast = fast_path_of(app)
    # The cache is trusted once its watcher has polled the events feed (a fraction of a
    # second after the first read): until then every read goes the whole way.
    for _ in range(100):
        before = fast.answered
        early = await client.get(PATH)
        if fast.answered == before + 1:
            break
        await asyncio.sleep(0.05)
    assert fast.answered == before + 1, "the fast path never answered"
    assert answer(early) == answer(whole)
    assert early.json() == {"credentials": {"api_key": KEY}}
    assert early.headers["content-length"] == str(len(early.content))

    # A new key is read at once (the commit invalidated the cache before it returned).
    r = await client.post("/groups/g1/integrations/custom/openweathermap",
                          json={"api_key": KEY + "-2"})
    assert r.status_code == 200
    assert (await client.get(PATH)).json() == {"credentials": {"api_key": KEY + "-2"}}
    # Disconnected: never served from the cache again; the error is the whole way's.
    r = await client.post("/groups/g1/integrations/custom/openweathermap/disconnect")
    assert r.status_code == 200
    before = fast.answered
    gone = await client.get(PATH)
    assert fast.answered == before + 1
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "integration_not_connected"
    assert answer(gone) == answer(await client.get(PATH + "?via=stack"))


async def test_a_cold_read_and_its_errors_are_answered_early_as_the_whole_way_would(
    live: tuple[Any, httpx.AsyncClient], broker: Broker,
) -> None:
    """A connection this process has not read yet (the store read, and the refresh it may
    lead to, go through ``Credentials.get``), and the errors on that way: not connected,
    and the store gone (503, naming nothing of the database)."""
    app, client = live
    r = await client.post("/groups/g1/integrations/custom/openweathermap",
                          json={"api_key": KEY})
    assert r.status_code == 200
    fast = fast_path_of(app)
    broker.tokens.cache.clear()  # as a fresh process finds it
    before = fast.answered
    cold = await client.get(PATH)
    assert fast.answered == before + 1
    assert cold.json() == {"credentials": {"api_key": KEY}}
    broker.tokens.cache.clear()
    assert answer(cold) == answer(await client.get(PATH + "?via=stack"))

    missing = "/groups/g9/integrations/openweathermap/credentials"
    before = fast.answered
    early = await client.get(missing)
    assert fast.answered == before + 1
    assert early.status_code == 404
    assert answer(early) == answer(await client.get(missing + "?via=stack"))

    # The database goes away (a PostgreSQL port nobody listens on, as a lost one looks).
    from broker.store.database import Database
    from tests.serve_support import free_port

    real = broker.database
    broker.database = Database(
        f"postgresql+asyncpg://broker:secret-password@127.0.0.1:{free_port()}/nothing")
    broker.tokens.cache.clear()
    try:
        before = fast.answered
        lost = await client.get(PATH)
        assert fast.answered == before + 1
        whole = await client.get(PATH + "?via=stack")
    finally:
        await broker.database.dispose()
        broker.database = real
    assert lost.status_code == 503
    assert lost.json()["error"]["code"] == "service_unavailable"
    assert "secret-password" not in lost.text and "127.0.0.1" not in lost.text
    assert answer(lost) == answer(whole)


async def test_everything_else_goes_the_whole_way_and_gets_what_it_got_before(
    live: tuple[Any, httpx.AsyncClient], broker: Broker,
) -> None:
    app, client = live
    r = await client.post("/groups/g1/integrations/custom/openweathermap",
                          json={"api_key": KEY})
    assert r.status_code == 200
    assert (await client.get(PATH)).status_code == 200  # warm
    session = (await client.post("/connect-sessions", json={"group_id": "g1"})).json()["token"]
    fast = fast_path_of(app)
    before = fast.answered
    cases = {
        "no token": ({"Authorization": ""}, PATH, 401),
        "wrong token": ({"Authorization": "Bearer not-the-service-token"}, PATH, 401),
        "basic scheme": ({"Authorization": f"Basic {SERVICE_TOKEN}"}, PATH, 401),
        "a connect session": ({"Authorization": f"Bearer {session}"}, PATH, 403),
        "a bad group id": ({}, "/groups/-g/integrations/openweathermap/credentials", 422),
        "an unknown integration": ({}, "/groups/g1/integrations/nope/credentials", 404),
    }
    for what, (headers, path, status) in cases.items():
        r = await client.get(path, headers=headers)
        assert r.status_code == status, (what, r.text)
        assert KEY not in r.text, what
    head = await client.head(PATH)
    assert head.status_code == 200 and head.content == b""  # HEAD: the whole way
    assert fast.answered == before
