"""auth_type ``oauth2_cc``: the user submits a client id and secret, the broker fetches
tokens with the client credentials grant from the real authorization server, and fetches
a new one (once, however many nodes ask at the same time) when it nears expiry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from broker.errors import CredentialRejected, ProviderUnreachable
from broker.nodes import ExecutionContext
from broker.store.repository import utcnow
from tests import oauth_support
from tests.authserver.models import Client
from tests.authserver.server import AuthServer
from tests.oauth_support import Live

live_factory = oauth_support.live_factory

TRIGGER = "/groups/g1/integrations/custom/m2m"


@pytest.fixture
def m2m(
    live_factory: Callable[..., Any], authserver: AuthServer
) -> Callable[..., Any]:
    """``async with m2m(auth_method) as (live, client)``: a broker with the inline ``m2m``
    provider, and a client_credentials client at the authorization server (the broker
    knows nothing of the client until its id and secret are submitted)."""

    @asynccontextmanager
    async def make(
        auth_method: str = "client_secret_basic", **spec: Any
    ) -> AsyncIterator[tuple[Live, Client]]:
        provider = {
            "display_name": "Acme M2M",
            "auth_type": "oauth2_cc",
            "token_url": authserver.token_endpoint,
            "default_scopes": ["read"],
            "token_endpoint_auth_method": auth_method,
            **spec,
        }
        async with live_factory(extra_providers={"m2m": provider}) as live:
            yield live, authserver.register_client(
                grant_types=["client_credentials"], token_endpoint_auth_method=auth_method
            )

    return make


async def connect(live: Live, client: Client, **body: Any) -> Any:
    return await live.service.post(
        TRIGGER,
        json={"client_id": client.client_id, "client_secret": client.client_secret, **body},
    )


async def stored(live: Live) -> Any:
    async with live.broker.session() as db:
        return await live.broker.repository.get(db, "g1", "m2m")


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_submitted_client_credentials_connect_and_the_node_gets_a_working_token(
    m2m: Callable[..., Any], auth_method: str
) -> None:
    async with m2m(auth_method) as (live, client):
        r = await connect(live, client)
        assert r.status_code == 200, r.text
        assert r.json() == {"integration": "m2m", "status": "connected"}
        assert client.client_secret is not None
        assert client.client_secret not in r.text
        assert live.server.token_requests["client_credentials"] == 1

        # The client authenticated the way the spec says.
        seen = live.server.requests_seen("token")[-1]
        assert seen.grant_type == "client_credentials"
        assert seen.params["scope"] == "read"
        if auth_method == "client_secret_post":
            assert seen.params["client_secret"] == client.client_secret
            assert "authorization" not in seen.headers
        else:
            assert seen.headers["authorization"].startswith("Basic ")
            assert "client_secret" not in seen.params

        creds = await ExecutionContext.local(live.broker, "g1").custom_integration("m2m")
        assert set(creds) == {"access_token", "token_type", "expires_at", "scope"}
        assert creds["scope"] == "read"
        assert client.client_secret not in repr(creds)
        # The same over HTTP, and the list shows it connected.
        r = await live.service.get("/groups/g1/integrations/m2m/credentials")
        assert r.json()["credentials"] == creds
        listing = (await live.service.get("/groups/g1/integrations")).json()
        status = {i["name"]: i["status"] for i in listing["integrations"]}
        assert status["m2m"] == "connected"

        me = await live.service.get(
            live.server.userinfo_endpoint,
            headers={"Authorization": f"Bearer {creds['access_token']}"},
        )
        assert me.status_code == 200, me.text
        assert me.json()["client_id"] == client.client_id
        assert me.json()["username"] is None  # a client's token, not a user's

        row = await stored(live)
        assert row.info.auth_type == "oauth2_cc"
        assert row.info.hint == {"client_id": client.client_id}


async def test_wrong_client_secret_is_rejected_with_422_and_nothing_is_stored(
    m2m: Callable[..., Any]
) -> None:
    async with m2m() as (live, client):
        r = await connect(live, client, client_secret="not-the-secret-0123456789")
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == CredentialRejected.code
        assert error["field"] == "client_secret"
        assert "not-the-secret" not in r.text
        assert await live.rows() == 0
        assert live.server.token_requests["client_credentials"] == 1


async def test_missing_client_secret_is_invalid_input_without_a_token_request(
    m2m: Callable[..., Any]
) -> None:
    async with m2m() as (live, client):
        r = await live.service.post(TRIGGER, json={"client_id": client.client_id})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_input"
        assert r.json()["error"]["field"] == "client_secret"
        assert await live.rows() == 0
        assert live.server.token_requests["client_credentials"] == 0


@pytest.mark.parametrize("fault", ["500", "429"])
async def test_token_endpoint_failure_is_502_provider_unreachable_and_nothing_is_stored(
    m2m: Callable[..., Any], fault: str
) -> None:
    async with m2m() as (live, client):
        if fault == "500":
            live.server.fail_next(status=500)
        else:
            live.server.rate_limit_next()
        r = await connect(live, client)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == ProviderUnreachable.code
        assert await live.rows() == 0
        # The next attempt works.
        assert (await connect(live, client)).status_code == 200
        assert await live.rows() == 1


async def test_token_near_expiry_is_fetched_again_once_for_twenty_concurrent_nodes(
    m2m: Callable[..., Any]
) -> None:
    async with m2m() as (live, client):
        assert (await connect(live, client)).status_code == 200
        ctx = ExecutionContext.local(live.broker, "g1")
        first = await ctx.custom_integration("m2m")
        assert live.server.token_requests["client_credentials"] == 1

        # An hour later the token (3600 s) has expired: the next use fetches a new one.
        live.broker.clock = lambda: utcnow() + timedelta(seconds=3600)
        results = await asyncio.gather(*(ctx.custom_integration("m2m") for _ in range(20)))
        assert live.server.token_requests["client_credentials"] == 2
        tokens = {r["access_token"] for r in results}
        assert len(tokens) == 1
        (token,) = tokens
        assert token != first["access_token"]
        assert all(r["expires_at"] > first["expires_at"] for r in results)

        row = await stored(live)
        assert row.info.version == 2
        assert row.data["access_token"] == token
        # The stored client credentials were used again, and kept for the next time.
        assert row.data["client"]["client_secret"] == client.client_secret
        me = await live.service.get(
            live.server.userinfo_endpoint, headers={"Authorization": f"Bearer {token}"}
        )
        assert me.status_code == 200, me.text

        # Still fresh: no further request.
        await asyncio.gather(*(ctx.custom_integration("m2m") for _ in range(5)))
        assert live.server.token_requests["client_credentials"] == 2


async def test_short_lived_tokens_are_renewed_before_they_expire(
    m2m: Callable[..., Any]
) -> None:
    async with m2m() as (live, client):
        live.server.config.access_token_lifetime = 60
        assert (await connect(live, client)).status_code == 200
        ctx = ExecutionContext.local(live.broker, "g1")
        first = await ctx.custom_integration("m2m")
        assert live.server.token_requests["client_credentials"] == 1
        # Half its lifetime later it is too close to expiry to hand out.
        live.broker.clock = lambda: utcnow() + timedelta(seconds=31)
        second = await ctx.custom_integration("m2m")
        assert second["access_token"] != first["access_token"]
        assert live.server.token_requests["client_credentials"] == 2
