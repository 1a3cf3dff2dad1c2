"""The OAuth2 popup flow end to end, against the real authorization server on 127.0.0.1.

A real HTTP user agent (httpx with a cookie jar) opens the authorize route of a broker
served by uvicorn, follows it to the provider, submits the consent form, follows the
redirect back to the broker's callback and reads the result page. A node then uses the
token against the provider's protected resource.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import func, select

from broker.config import Settings
from broker.nodes import ExecutionContext
from broker.runtime import Broker
from broker.store.models import Connection
from broker.web import create_app
from tests.authserver.server import AuthServer
from tests.support import loopback_socket, serve, url_of

HOST_ORIGIN = "http://host.example"


@dataclass
class Live:
    broker: Broker
    url: str
    service: httpx.AsyncClient
    server: AuthServer
    client_id: str
    client_secret: str
    visited: list[str]

    async def session_token(self, group_id: str = "g1", **extra: Any) -> str:
        r = await self.service.post("/connect-sessions", json={"group_id": group_id, **extra})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def browser(self) -> httpx.AsyncClient:
        async def record(request: httpx.Request) -> None:
            self.visited.append(str(request.url))

        return httpx.AsyncClient(timeout=10, event_hooks={"request": [record]})

    async def popup(
        self,
        browser: httpx.AsyncClient,
        *,
        group_id: str = "g1",
        session: str | None = None,
        approve: bool = True,
        query: str = "",
    ) -> httpx.Response:
        """What a popup does: authorize -> provider consent -> callback page."""
        session = session or await self.session_token(group_id)
        r = await browser.get(
            f"{self.url}/groups/{group_id}/integrations/acme/authorize?session={session}{query}"
        )
        assert r.status_code == 302, r.text
        callback = await self.server.aconsent(r.headers["location"], approve=approve, http=browser)
        assert callback.startswith(f"{self.url}/oauth/callback?")
        return await browser.get(callback)

    async def rows(self) -> int:
        async with self.broker.session() as db:
            return int(await db.scalar(select(func.count()).select_from(Connection)) or 0)


def acme(server: AuthServer, client_id: str, client_secret: str, **extra: Any) -> dict[str, Any]:
    return {
        "display_name": "Acme",
        "auth_type": "oauth2",
        "authorization_url": server.authorize_endpoint,
        "token_url": server.token_endpoint,
        "revocation_url": server.revocation_endpoint,
        "issuer": server.issuer,
        "default_scopes": ["read"],
        "client_id": client_id,
        "client_secret": client_secret,
        **extra,
    }


@pytest.fixture
def live_factory(
    store_url: str, make_settings: Callable[..., Settings], authserver: AuthServer
) -> Callable[..., Any]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def make(
        *, auth_method: str = "client_secret_basic", require_pkce: bool = True,
        provider: dict[str, Any] | None = None,
    ) -> AsyncIterator[Live]:
        sock = loopback_socket()
        url = url_of(sock)
        client = authserver.register_client(
            redirect_uris=[f"{url}/oauth/callback"],
            token_endpoint_auth_method=auth_method,
            require_pkce=require_pkce,
        )
        assert client.client_secret is not None
        settings = make_settings(
            database_url=store_url,
            public_url=url,
            auth={"service_tokens": [SERVICE_TOKEN], "allowed_origins": [HOST_ORIGIN]},
            providers={
                "acme": acme(
                    authserver, client.client_id, client.client_secret,
                    token_endpoint_auth_method=auth_method, **(provider or {}),
                )
            },
        )
        broker = await Broker.open(settings)
        try:
            async with serve(create_app(broker), sock), httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}, timeout=10
            ) as service:
                yield Live(
                    broker, url, service, authserver, client.client_id,
                    client.client_secret, [],
                )
        finally:
            await broker.close()

    return make


def page_data(page: httpx.Response) -> dict[str, Any]:
    match = re.search(
        r'<script type="application/json" id="broker-result">(.*?)</script>', page.text, re.S
    )
    assert match, page.text
    data: dict[str, Any] = json.loads(match.group(1))
    return data


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_popup_flow_connects_and_a_node_uses_the_token_at_the_provider(
    live_factory: Callable[..., Any], auth_method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with live_factory(auth_method=auth_method) as live, live.browser() as browser:
        page = await live.popup(browser)
        assert page.status_code == 200, page.text
        data = page_data(page)
        assert data["message"] == {
            "type": "broker:oauth", "integration": "acme", "status": "connected", "error": None
        }
        assert data["targets"] == [live.url, HOST_ORIGIN]
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self'" in page.headers["content-security-policy"]

        ctx = ExecutionContext.local(live.broker, "g1")
        creds = await ctx.custom_integration("acme")
        assert set(creds) >= {"access_token", "token_type", "expires_at", "scope"}
        assert "refresh_token" not in creds
        me = await browser.get(
            live.server.userinfo_endpoint,
            headers={"Authorization": f"Bearer {creds['access_token']}"},
        )
        assert me.status_code == 200, me.text

        # The same from the credentials route, and the list shows it connected.
        r = await live.service.get("/groups/g1/integrations/acme/credentials")
        assert r.json()["credentials"]["access_token"] == creds["access_token"]
        listing = (await live.service.get("/groups/g1/integrations")).json()
        assert listing["integrations"][0]["status"] == "connected"

        # No secret in any URL the browser visited, in the page, or in the logs.
        async with live.broker.session() as db:
            stored = await live.broker.repository.get(db, "g1", "acme")
        assert stored is not None
        secrets = [
            stored.data["access_token"], stored.data["refresh_token"], live.client_secret
        ]
        # The authorization server runs in its own thread and logs what it issues; the
        # broker (this thread: the test's event loop) must log none of it.
        here = threading.get_ident()
        broker_logs = "\n".join(
            r.getMessage() for r in caplog.records if r.thread == here
        )
        assert "connected acme for group g1" in broker_logs  # the broker's logs were captured
        text = "\n".join(live.visited) + page.text + broker_logs
        for secret in secrets:
            assert secret not in text
        assert live.server.token_requests["authorization_code"] == 1
