"""Provider quirks, declared in the provider spec, against the real authorization server:
JSON token requests, nested token responses (Slack), extra token fields, per-connection
settings in the provider URLs, and providers without PKCE.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest

from broker.nodes import ExecutionContext
from broker.store.repository import utcnow
from tests import oauth_support
from tests.oauth_support import Live, page_data, query_param

live_factory = oauth_support.live_factory

LiveFactory = Callable[..., Any]


async def connected(live: Live, browser: httpx.AsyncClient, query: str = "") -> None:
    page = await live.popup(browser, query=query)
    assert page.status_code == 200, page.text
    assert page_data(page)["message"]["status"] == "connected", page.text


async def node_credentials(live: Live) -> dict[str, Any]:
    return await ExecutionContext.local(live.broker, "g1").custom_integration("acme")


async def works_at_provider(live: Live, browser: httpx.AsyncClient, token: str) -> None:
    me = await browser.get(
        live.server.userinfo_endpoint, headers={"Authorization": f"Bearer {token}"}
    )
    assert me.status_code == 200, me.text


def an_hour_later(live: Live) -> None:
    live.broker.clock = lambda: utcnow() + timedelta(seconds=3600)


# --------------------------------------------------------------------------- JSON bodies


async def test_json_token_requests_are_sent_as_json_for_code_and_refresh(
    live_factory: LiveFactory,
) -> None:
    async with live_factory(provider={"token_request_format": "json"}) as live, (
        live.browser()
    ) as browser:
        live.server.config.accept_json_token_requests = True
        await connected(live, browser)
        (exchange,) = live.server.requests_seen("token")
        assert exchange.headers["content-type"] == "application/json"
        assert exchange.grant_type == "authorization_code"
        assert exchange.params["redirect_uri"] == f"{live.url}/oauth/callback"
        assert exchange.params["code_verifier"]
        assert exchange.headers["authorization"].startswith("Basic ")
        first = await node_credentials(live)

        an_hour_later(live)
        second = await node_credentials(live)
        assert second["access_token"] != first["access_token"]
        refresh = live.server.requests_seen("token")[-1]
        assert refresh.grant_type == "refresh_token"
        assert refresh.headers["content-type"] == "application/json"
        await works_at_provider(live, browser, second["access_token"])


async def test_json_token_request_to_a_form_only_server_fails_and_stores_nothing(
    live_factory: LiveFactory,
) -> None:
    # The server ignores JSON bodies unless told otherwise: proof the body was JSON.
    async with live_factory(provider={"token_request_format": "json"}) as live, (
        live.browser()
    ) as browser:
        page = await live.popup(browser)
        assert page.status_code == 400, page.text
        data = page_data(page)["message"]
        assert data["status"] == "error"
        assert "Acme did not issue a token" in data["error"]
        assert await live.rows() == 0
        assert live.server.requests_seen("token")[-1].headers["content-type"] == (
            "application/json"
        )


# --------------------------------------------------------------------------- response shapes


async def test_nested_token_response_is_read_from_token_path_with_extra_fields(
    live_factory: LiveFactory,
) -> None:
    provider = {"token_path": "authed_user", "extra_fields": {"team_id": "team.id"}}
    async with live_factory(provider=provider) as live, live.browser() as browser:
        live.server.config.response_shape = "slack"
        live.server.config.team_id = "T0ACME"
        await connected(live, browser)
        creds = await node_credentials(live)
        assert creds["team_id"] == "T0ACME"
        assert creds["access_token"].startswith("at_")
        assert creds["scope"] == "read"
        assert "refresh_token" not in creds
        await works_at_provider(live, browser, creds["access_token"])

        # Refreshes come back nested too; the extra field stays.
        an_hour_later(live)
        again = await node_credentials(live)
        assert again["access_token"] != creds["access_token"]
        assert again["team_id"] == "T0ACME"
        assert live.server.token_requests["refresh_token"] == 1
        await works_at_provider(live, browser, again["access_token"])


async def test_extra_token_fields_named_in_the_spec_reach_the_node(
    live_factory: LiveFactory,
) -> None:
    provider = {"extra_fields": {"instance_url": "instance_url", "absent": "no.such.path"}}
    async with live_factory(provider=provider) as live, live.browser() as browser:
        live.server.config.extra_token_fields = {
            "instance_url": "https://acme.my.example.com",
            "signature": "not-kept",
        }
        await connected(live, browser)
        creds = await node_credentials(live)
        assert creds["instance_url"] == "https://acme.my.example.com"
        assert "signature" not in creds
        assert "absent" not in creds


# --------------------------------------------------------------------------- settings


TENANT = {
    "settings": {"tenant": {"title": "Tenant", "secret": False, "pattern": "^[a-z]+$"}},
}


@pytest.fixture
def tenant_spec(authserver: Any) -> dict[str, Any]:
    return {
        **TENANT,
        "authorization_url": authserver.authorize_endpoint + "?t={tenant}",
        "token_url": authserver.token_endpoint + "?t={tenant}",
    }


async def test_connection_setting_fills_the_provider_urls_and_reaches_the_node(
    live_factory: LiveFactory, tenant_spec: dict[str, Any]
) -> None:
    async with live_factory(provider=tenant_spec) as live, live.browser() as browser:
        location = await live.start(browser, query="&tenant=acme")
        assert query_param(location, "t") == "acme"
        assert "tenant" not in location  # the value is in the URL, not the name
        page = await browser.get(await live.consent(browser, location))
        assert page_data(page)["message"]["status"] == "connected", page.text
        creds = await node_credentials(live)
        assert creds["tenant"] == "acme"
        await works_at_provider(live, browser, creds["access_token"])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param("", "Tenant is required.", id="missing"),
        pytest.param("&tenant=", "Tenant is required.", id="empty"),
        pytest.param("&tenant=Not-Valid", "Tenant does not look right.", id="bad"),
        pytest.param(
            "&tenant=evil.example%2F%23", "Tenant does not look right.", id="url-injection"
        ),
    ],
)
async def test_missing_or_bad_setting_gets_no_ticket_and_a_422_naming_it(
    live_factory: LiveFactory, tenant_spec: dict[str, Any], query: str, message: str
) -> None:
    async with live_factory(provider=tenant_spec) as live, live.browser() as browser:
        r = await live.authorize(browser, query=query)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error == {"code": "invalid_input", "message": message, "field": "tenant"}
        assert await live.flows() == 0
        assert await live.rows() == 0
        assert sum(live.server.token_requests.values()) == 0


# --------------------------------------------------------------------------- PKCE off


async def test_provider_without_pkce_connects_without_challenge_or_verifier(
    live_factory: LiveFactory,
) -> None:
    async with live_factory(provider={"pkce": False}, require_pkce=False) as live, (
        live.browser()
    ) as browser:
        location = await live.start(browser)
        assert "code_challenge" not in location
        page = await browser.get(await live.consent(browser, location))
        assert page_data(page)["message"]["status"] == "connected", page.text
        (exchange,) = live.server.requests_seen("token")
        assert "code_verifier" not in exchange.params
        creds = await node_credentials(live)
        await works_at_provider(live, browser, creds["access_token"])


async def test_pkce_provider_sends_an_s256_challenge_and_then_its_verifier(
    live_factory: LiveFactory,
) -> None:
    # The counterpart: with PKCE on (the default), which the client registration requires.
    async with live_factory(require_pkce=True) as live, live.browser() as browser:
        location = await live.start(browser)
        assert query_param(location, "code_challenge_method") == "S256"
        page = await browser.get(await live.consent(browser, location))
        assert page_data(page)["message"]["status"] == "connected", page.text
        (exchange,) = live.server.requests_seen("token")
        assert len(exchange.params["code_verifier"]) >= 43
