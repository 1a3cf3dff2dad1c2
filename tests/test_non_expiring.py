"""Tokens that do not expire (issue 13, item 4): a token response with no ``expires_in``
and no refresh token (GitHub OAuth Apps, Slack without rotation), or a provider that says
``expires: never``. No sweep, no forced re-authorisation; a ``refresh_on`` answer from
the API marks the connection ``reauth_required``. Against the real authorization server
and API server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from broker.nodes import ExecutionContext
from broker.scheduler import sweep
from broker.store.models import Connection
from tests import oauth_support
from tests.apiserver import ApiServer
from tests.authserver import AuthServer
from tests.oauth_support import Live
from tests.test_refresh import advance, connected

live_factory = oauth_support.live_factory


async def row(live: Live) -> Any:
    async with live.broker.session() as db:
        return (await db.execute(
            select(Connection).where(Connection.group_id == "g1",
                                     Connection.integration == "acme")
        )).scalar_one()


async def test_no_expires_in_and_no_refresh_token_is_a_token_that_does_not_expire(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer
) -> None:
    authserver.config.include_expires_in = False
    async with live_factory(provider={"api": {"base_url": f"{apiserver.url}/bearer"}}) as live:
        live.server.store.clients[live.client_id].grant_types = ["authorization_code"]
        stored = await connected(live)
        assert stored["expires_at"] is None and "refresh_token" not in stored
        info = await row(live)
        assert info.expires_at is None and info.next_refresh_at is None

        advance(live, 400 * 86400)  # past any lifetime the broker used to assume
        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("acme")
        assert got["access_token"] == stored["access_token"] and got["expires_at"] is None
        assert (await sweep(live.broker)).claimed == 0
        assert live.server.token_requests["refresh_token"] == 0

        # The provider stops accepting it: the connection needs the user again.
        assert live.server.revoke_access_token(stored["access_token"])
        r = await live.service.get("/groups/g1/integrations/acme/proxy/echo")
        assert r.status_code == 409
        assert r.headers["broker-error"] == "integration_needs_reauth"
        info = await row(live)
        assert info.status == "reauth_required"


async def test_a_provider_may_say_its_tokens_never_expire(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory(provider={"expires": "never"}) as live:
        stored = await connected(live)
        assert stored["expires_at"] is None
        info = await row(live)
        assert info.next_refresh_at is None


async def test_with_a_refresh_token_and_no_expires_in_the_default_lifetime_holds(
    live_factory: Callable[..., Any], authserver: AuthServer
) -> None:
    authserver.config.include_expires_in = False
    async with live_factory(provider={"default_lifetime_seconds": 600}) as live:
        stored = await connected(live)
        assert stored["lifetime"] == 600 and stored["refresh_token"]
