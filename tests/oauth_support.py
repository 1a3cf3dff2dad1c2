"""Shared pieces of the live OAuth2 tests: a broker under real uvicorn, a real user agent,
and the real Authlib authorization server (``tests/authserver``).

Test modules use the fixture by binding it at module level (pytest collects it there)::

    from tests import oauth_support
    live_factory = oauth_support.live_factory
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
from conftest import SERVICE_TOKEN
from sqlalchemy import func, select

from broker.config import Settings
from broker.oauth.flows import hash_secret
from broker.runtime import Broker
from broker.store.models import Connection, OAuthFlow
from broker.web import create_app
from tests.authserver.server import AuthServer
from tests.support import loopback_socket, serve, url_of

__all__ = ["HOST_ORIGIN", "Live", "acme", "live_factory", "page_data", "query_param"]

HOST_ORIGIN = "http://host.example"


def query_param(url: str, name: str) -> str:
    """The single value of ``name`` in ``url``'s query."""
    values = parse_qs(urlsplit(url).query, keep_blank_values=True).get(name)
    assert values is not None and len(values) == 1, (name, url)
    return values[0]


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

    def browser(self, **kwargs: Any) -> httpx.AsyncClient:
        async def record(request: httpx.Request) -> None:
            self.visited.append(str(request.url))

        return httpx.AsyncClient(timeout=10, event_hooks={"request": [record]}, **kwargs)

    async def ticket(
        self,
        *,
        group_id: str = "g1",
        integration: str = "acme",
        session: str | None = None,
        settings: dict[str, str] | None = None,
        return_to: str | None = None,
    ) -> httpx.Response:
        """Ask for a sign-in ticket, as the connect page (with ``session``) or the host's
        backend (with the service token) does."""
        body: dict[str, Any] = {"settings": settings or {}}
        if return_to is not None:
            body["return_to"] = return_to
        path = f"/groups/{group_id}/integrations/{integration}/authorize"
        if session is None:
            return await self.service.post(path, json=body)
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            return await c.post(path, json=body, headers={"Authorization": f"Bearer {session}"})

    async def redeem(
        self, browser: httpx.AsyncClient, ticket: str, *, origin: str | None = None
    ) -> httpx.Response:
        """What the popup's start page does with its ticket: ``POST /oauth/start`` from
        the broker's own origin (``origin`` overrides it, to play a foreign page)."""
        return await browser.post(
            f"{self.url}/oauth/start",
            json={"ticket": ticket},
            headers={"Origin": self.url if origin is None else origin},
        )

    async def authorize(
        self,
        browser: httpx.AsyncClient,
        *,
        group_id: str = "g1",
        integration: str = "acme",
        session: str | None = None,
        query: str = "",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Start a sign-in as the connect page does (a ticket with a connect session for
        ``group_id``, redeemed in ``browser``): the start answer (``{"location"}``), or the
        ticket request's error. ``query`` (``&tenant=x&return_to=/y``) gives settings and
        ``return_to``."""
        session = session or await self.session_token(group_id)
        params = dict(parse_qsl(query.lstrip("&"), keep_blank_values=True))
        return_to = params.pop("return_to", None)
        r = await self.ticket(
            group_id=group_id, integration=integration, session=session, settings=params,
            return_to=return_to,
        )
        if r.status_code != 201:
            return r
        return await browser.post(
            f"{self.url}/oauth/start",
            json={"ticket": r.json()["ticket"]},
            headers={"Origin": self.url, **(headers or {})},
        )

    async def start(self, browser: httpx.AsyncClient, **kwargs: Any) -> str:
        """Start a flow; return the provider authorization URL the popup is sent to."""
        r = await self.authorize(browser, **kwargs)
        assert r.status_code == 200, r.text
        location: str = r.json()["location"]
        assert location.startswith(self.server.authorize_endpoint + "?"), location
        return location

    async def consent(
        self, browser: httpx.AsyncClient, location: str, *, approve: bool = True
    ) -> str:
        """Act as the user at the provider; return the callback URL (unfollowed)."""
        callback = await self.server.aconsent(location, approve=approve, http=browser)
        assert callback.startswith(f"{self.url}/oauth/callback?"), callback
        return callback

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
        location = await self.start(browser, group_id=group_id, session=session, query=query)
        return await browser.get(await self.consent(browser, location, approve=approve))

    async def rows(self) -> int:
        async with self.broker.session() as db:
            return int(await db.scalar(select(func.count()).select_from(Connection)) or 0)

    async def flows(self, state: str | None = None) -> int:
        """Rows in ``oauth_flows`` (for one ``state`` when given)."""
        query = select(func.count()).select_from(OAuthFlow)
        if state is not None:
            query = query.where(OAuthFlow.state_hash == hash_secret(state))
        async with self.broker.session() as db:
            return int(await db.scalar(query) or 0)


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
    """``async with live_factory(...) as live``: a broker with the ``acme`` provider (an
    oauth2 client registered at ``authserver``) served on 127.0.0.1.

    ``provider``: overrides of the acme spec; ``extra_providers``: more providers by name;
    ``settings``: more config.yaml keys (``proxy``, ``refresh``...).
    """

    @asynccontextmanager
    async def make(
        *, auth_method: str = "client_secret_basic", require_pkce: bool = True,
        provider: dict[str, Any] | None = None,
        extra_providers: dict[str, dict[str, Any]] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> AsyncIterator[Live]:
        sock = loopback_socket()
        url = url_of(sock)
        client = authserver.register_client(
            redirect_uris=[f"{url}/oauth/callback"],
            token_endpoint_auth_method=auth_method,
            require_pkce=require_pkce,
        )
        assert client.client_secret is not None
        config = make_settings(
            **(settings or {}),
            database_url=store_url,
            public_url=url,
            auth={"service_tokens": [SERVICE_TOKEN], "allowed_origins": [HOST_ORIGIN]},
            providers={
                "acme": acme(
                    authserver, client.client_id, client.client_secret,
                    token_endpoint_auth_method=auth_method, **(provider or {}),
                ),
                **(extra_providers or {}),
            },
        )
        broker = await Broker.open(config)
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
