"""The refresh engine against the real authorization server: on demand, the sweep,
single flight, transient failures, revoked grants."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from broker.errors import IntegrationNeedsReauth, IntegrationUnavailable
from broker.nodes import ExecutionContext
from broker.scheduler import sweep
from tests import oauth_support
from tests.oauth_support import Live

live_factory = oauth_support.live_factory


async def connected(live: Live) -> dict[str, Any]:
    async with live.browser() as browser:
        page = await live.popup(browser)
    assert oauth_support.page_data(page)["message"]["status"] == "connected", page.text
    async with live.broker.session() as db:
        found = await live.broker.repository.get(db, "g1", "acme")
    assert found is not None
    return found.data


def advance(live: Live, seconds: float) -> None:
    """Move the broker's clock (not the provider's) forward."""
    base = live.broker.clock
    live.broker.clock = lambda: base() + timedelta(seconds=seconds)


async def test_200_concurrent_calls_on_an_expired_connection_make_one_token_request(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory() as live:
        first = await connected(live)
        advance(live, 3600)  # the stored token is past its expiry as the broker sees it
        ctx = ExecutionContext.local(live.broker, "g1")
        results = await asyncio.gather(*(ctx.custom_integration("acme") for _ in range(200)))
        tokens = {r["access_token"] for r in results}
        assert len(tokens) == 1
        assert tokens != {first["access_token"]}
        assert live.server.token_requests["refresh_token"] == 1
        assert live.server.invalid_grant_count == 0


async def test_sweep_refreshes_what_is_due_and_only_that(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory() as live:
        first = await connected(live)
        result = await sweep(live.broker)
        assert result.claimed == 0
        advance(live, 3600 - 60)  # past next_refresh_at (12 min early), not yet expired
        result = await sweep(live.broker)
        assert (result.claimed, result.refreshed) == (1, 1)
        assert live.server.token_requests["refresh_token"] == 1
        ctx = ExecutionContext.local(live.broker, "g1")
        token = await ctx.custom_integration("acme")
        assert token["access_token"] != first["access_token"]
        assert live.server.token_requests["refresh_token"] == 1
        r = await live.service.get("/groups/g1/events")
        kinds = [e["kind"] for e in r.json()["events"]]
        assert kinds == ["refreshed", "connected"]


async def test_provider_500s_keep_handing_out_the_valid_token_then_recover(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory() as live:
        first = await connected(live)
        advance(live, 3600 - 30)  # stale (under 60 s left) but still valid
        live.server.fail_next(2, status=500)
        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("acme")
        assert got["access_token"] == first["access_token"]
        listing = (await live.service.get("/groups/g1/integrations")).json()
        assert listing["integrations"][0]["status"] == "connected"
        advance(live, 3600 + 10)  # now expired, and the provider still fails once
        with pytest.raises(IntegrationUnavailable):
            await ctx.custom_integration("acme")
        got = await ctx.custom_integration("acme")  # the provider is back
        assert got["access_token"] != first["access_token"]
        kinds = [e["kind"] for e in (await live.service.get("/groups/g1/events")).json()["events"]]
        assert kinds[:3] == ["recovered", "refresh_failed", "refresh_failed"]


async def test_revoked_grant_marks_reauth_required_and_reconnect_clears_it(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory() as live:
        await connected(live)
        assert live.server.revoke_user_grants("alice") >= 1
        ctx = ExecutionContext.local(live.broker, "g1")
        with pytest.raises(IntegrationNeedsReauth, match="connected again"):
            await ctx.custom_integration("acme", force_refresh=True)
        listing = (await live.service.get("/groups/g1/integrations")).json()
        assert listing["integrations"][0]["status"] == "reauth_required"
        r = await live.service.get("/groups/g1/integrations/acme/credentials")
        assert r.status_code == 409 and r.json()["error"]["code"] == "integration_needs_reauth"
        await connected(live)
        token = await ctx.custom_integration("acme")
        me = await live.service.get(
            live.server.userinfo_endpoint,
            headers={"Authorization": f"Bearer {token['access_token']}"},
        )
        assert me.status_code == 200
        kinds = [e["kind"] for e in (await live.service.get("/groups/g1/events")).json()["events"]]
        assert kinds[:2] == ["recovered", "reauth_required"]


async def test_a_slow_code_exchange_never_makes_a_token_look_longer_lived(
    live_factory: Callable[..., Any],
) -> None:
    """The provider issues the token, then its answer takes 2 s to arrive: the broker
    counts expires_in from its request, not from the answer, so its expiry is never later
    than the provider's (the same rule as refreshes)."""
    from tests.refresh_support import real_expiry

    async with live_factory() as live:
        live.server.timeout_next(1, seconds=2, process=True, grant_type="authorization_code")
        stored = await connected(live)
        real = real_expiry(live.server, stored["access_token"])
        assert real is not None and stored["expires_at"] <= real
