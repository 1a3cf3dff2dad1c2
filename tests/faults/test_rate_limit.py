"""429 with ``Retry-After`` from the token endpoint (issue #6, item 15).

The provider says when to come back. The broker must not ask before then: the
connection's ``next_refresh_at`` is at least ``now + Retry-After``, sweeps before then do not
call the token endpoint, node calls keep getting the still-valid token without a request,
and once the token has expired they are told "unavailable" rather than hammering the
provider. After the delay the next sweep refreshes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from broker.errors import IntegrationUnavailable
from broker.scheduler import sweep
from broker.store.models import Connection
from tests import oauth_support
from tests.faults.fault_support import advance, connect, stored_rows
from tests.oauth_support import Live

live_factory = oauth_support.live_factory

RETRY_AFTER = 300


async def row_of(live: Live) -> Connection:
    (row,) = await stored_rows(live.broker)
    return row


async def get(live: Live) -> dict[str, Any]:
    return await live.broker.credentials("g1", "acme")


async def test_a_429_reschedules_past_retry_after_and_no_sweep_asks_before_then(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory() as live:
        await connect(live, "g1")
        first = (await get(live))["access_token"]
        advance(live.broker, 3000)  # due (10 minutes left), not stale
        live.server.rate_limit_next(1, retry_after=RETRY_AFTER, grant_type="refresh_token")
        told_at = live.broker.now()
        result = await sweep(live.broker)
        assert result.claimed == 1
        assert live.server.token_requests["refresh_token"] == 1
        row = await row_of(live)
        assert row.next_refresh_at is not None
        assert row.next_refresh_at >= told_at + timedelta(seconds=RETRY_AFTER)
        assert (row.last_error, row.status, row.lease_owner) == ("http_429", "connected", None)

        # Until Retry-After has passed: sweeps claim nothing, nodes get the valid token,
        # and the provider hears nothing.
        waited = 0
        for step in (1, 100, 100, RETRY_AFTER - 202):
            advance(live.broker, step)
            waited += step
            assert (await sweep(live.broker)).claimed == 0, waited
            assert (await get(live))["access_token"] == first
        assert live.server.token_requests["refresh_token"] == 1

        advance(live.broker, 3)  # past Retry-After
        result = await sweep(live.broker)
        assert (result.claimed, result.refreshed) == (1, 1)
        assert live.server.token_requests["refresh_token"] == 2
        assert (await get(live))["access_token"] != first
        assert (await row_of(live)).last_error is None


async def test_a_429_on_an_expired_token_is_unavailable_without_asking_again_until_retry_after(
    live_factory: Callable[..., Any],
) -> None:
    """The token has run out and the provider answers 429: nodes are told "unavailable"
    (503 over HTTP) and, however many ask, the provider is not called again before
    Retry-After; then the next call refreshes."""
    async with live_factory() as live:
        await connect(live, "g1")
        advance(live.broker, 3600 + 10)  # expired
        live.server.rate_limit_next(1, retry_after=RETRY_AFTER, grant_type="refresh_token")
        with pytest.raises(IntegrationUnavailable):
            await get(live)
        assert live.server.token_requests["refresh_token"] == 1
        for _ in range(5):
            with pytest.raises(IntegrationUnavailable):
                await get(live)
            r = await live.service.get("/groups/g1/integrations/acme/credentials")
            assert r.status_code == 503 and r.json()["error"]["code"] == "integration_unavailable"
        advance(live.broker, RETRY_AFTER - 10)
        assert (await sweep(live.broker)).claimed == 0
        with pytest.raises(IntegrationUnavailable):
            await get(live)
        assert live.server.token_requests["refresh_token"] == 1

        advance(live.broker, 11)
        assert (await get(live))["access_token"]
        assert live.server.token_requests["refresh_token"] == 2
        assert live.server.invalid_grant_count == 0
