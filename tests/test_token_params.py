"""Which extra parameters go on which token request: ``token_params`` on every one,
``exchange_params`` on the code exchange only, ``refresh_params`` on refreshes only —
as the real authorization server receives them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.nodes import ExecutionContext
from tests import oauth_support
from tests.test_refresh import connected

live_factory = oauth_support.live_factory


async def test_each_request_gets_its_parameters(live_factory: Callable[..., Any]) -> None:
    async with live_factory(provider={
        "token_params": {"expires_in": "7200"},
        "exchange_params": {"on_exchange": "1"},
        "refresh_params": {"on_refresh": "1"},
    }) as live:
        await connected(live)
        await ExecutionContext.local(live.broker, "g1").custom_integration(
            "acme", force_refresh=True
        )
        seen = {r.grant_type: r.params for r in live.server.requests_seen("token")}
        assert seen["authorization_code"]["expires_in"] == "7200"
        assert seen["authorization_code"]["on_exchange"] == "1"
        assert "on_refresh" not in seen["authorization_code"]
        assert seen["refresh_token"]["expires_in"] == "7200"
        assert seen["refresh_token"]["on_refresh"] == "1"
        assert "on_exchange" not in seen["refresh_token"]
