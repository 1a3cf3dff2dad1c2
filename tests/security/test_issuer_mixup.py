"""Issue #6, item 3 and issue #11, item 5: mix-up attacks (RFC 9207).

The attack: the user starts a flow with provider E (the attacker's, or a compromised one);
E sends the browser on to honest provider A's authorization endpoint with the broker's
client id at A and the *same* state. A's code then comes back to the broker under the state
of E's flow, and without the ``iss`` check the broker would send A's code (and PKCE
verifier) to E's token endpoint. The check must refuse it before any token request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest

from tests import oauth_support
from tests.authserver.server import AuthServer
from tests.oauth_support import page_data, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory

LiveFactory = Callable[..., Any]
EVIL_ID, EVIL_SECRET = "evil-client", "evil-client-secret-0123456789"


async def test_code_from_another_provider_under_this_flows_state_never_reaches_a_token_endpoint(
    live_factory: LiveFactory, authserver_factory: Callable[..., AuthServer]
) -> None:
    evil = authserver_factory()
    extra = {"evil": oauth_support.acme(evil, EVIL_ID, EVIL_SECRET, display_name="Evil")}
    async with live_factory(extra_providers=extra) as live, live.browser() as browser:
        evil.register_client(EVIL_ID, EVIL_SECRET, redirect_uris=[f"{live.url}/oauth/callback"])
        # The user starts a flow with Evil ...
        r = await live.authorize(browser, integration="evil")
        assert r.status_code == 200, r.text
        evil_location = r.json()["location"]
        state = query_param(evil_location, "state")
        # ... which forwards the browser to Acme with the broker's Acme client and the state.
        forwarded = acme_request_from(evil_location, live.server, live.client_id)
        callback = await live.consent(browser, forwarded)
        assert query_param(callback, "iss") == live.server.issuer
        assert query_param(callback, "state") == state

        page = await browser.get(callback)
        sec.assert_error_page(page, "The sign-in response did not come from Evil.")
        assert sec.token_requests(evil) == 0  # Acme's code never went to Evil
        assert sec.token_requests(live.server) == 0
        assert await live.rows() == 0
        assert await live.flows(state) == 0


async def test_without_any_issuer_configured_the_honest_code_never_reaches_the_evil_server(
    live_factory: LiveFactory, authserver_factory: Callable[..., AuthServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue #11, item 5: the same attack when no provider sets ``issuer``.

    Two real authorization servers: Acme (honest, the victim is signed in there) and Evil
    (enabled by the operator, then malicious or compromised). Neither has ``issuer`` in its
    spec, so the flow row holds none, and before the fix any ``iss`` was accepted: Acme's
    code and the flow's PKCE verifier went to Evil's token endpoint. Now the ``iss`` (Acme's)
    is checked against the origin of Evil's authorization URL and refused as Acme's.
    """
    evil = authserver_factory()
    extra = {
        "evil": oauth_support.acme(evil, EVIL_ID, EVIL_SECRET, display_name="Evil", issuer=None)
    }
    async with live_factory(provider={"issuer": None}, extra_providers=extra) as live, (
        live.browser()
    ) as victim:
        assert all(
            getattr(i.provider, "issuer", "set") is None
            for i in live.broker.registry if i.key in ("acme", "evil")
        )
        evil.register_client(EVIL_ID, EVIL_SECRET, redirect_uris=[f"{live.url}/oauth/callback"])
        r = await live.authorize(victim, integration="evil")
        assert r.status_code == 200, r.text
        evil_location = r.json()["location"]
        state = query_param(evil_location, "state")
        # Evil forwards the victim to Acme, with the broker's Acme client id, Evil's state
        # and Evil's PKCE challenge (whose verifier the broker would send with the code).
        forwarded = acme_request_from(evil_location, live.server, live.client_id)
        callback = await live.consent(victim, forwarded)
        assert query_param(callback, "iss") == live.server.issuer
        assert query_param(callback, "state") == state

        page = await victim.get(callback)
        sec.assert_error_page(page, "The sign-in response did not come from Evil.")
        assert sec.token_requests(evil) == 0  # neither Acme's code nor the verifier
        assert sec.token_requests(live.server) == 0
        assert await live.rows() == 0
        assert await live.flows(state) == 0
        assert "iss comes from the server of provider acme, not evil" in caplog.text
        assert query_param(callback, "code") not in caplog.text


async def test_without_an_issuer_a_callback_carrying_another_servers_iss_is_refused(
    live_factory: LiveFactory, authserver_factory: Callable[..., AuthServer],
) -> None:
    # The other direction: Acme's flow, finished with an iss that is not Acme's origin
    # (Evil's, another port on the same host): no token request, nothing stored.
    evil = authserver_factory()
    async with live_factory(provider={"issuer": None}) as live, live.browser() as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        callback = await live.consent(browser, location)
        query = urlencode(
            {"code": query_param(callback, "code"), "state": state, "iss": evil.issuer}
        )
        page = await browser.get(f"{live.url}/oauth/callback?{query}")
        sec.assert_error_page(page, "The sign-in response did not come from Acme.")
        assert sec.token_requests(live.server) == 0
        assert await live.rows() == 0
        assert await live.flows(state) == 0


async def test_without_an_issuer_the_providers_own_iss_still_connects(
    live_factory: LiveFactory,
) -> None:
    # The control: Acme's own iss (its authorization URL's origin) is accepted.
    async with live_factory(provider={"issuer": None}) as live, live.browser() as browser:
        callback = await live.consent(browser, await live.start(browser))
        assert query_param(callback, "iss") == live.server.issuer
        page = await browser.get(callback)
        assert page_data(page)["message"]["status"] == "connected", page.text
        assert await live.rows() == 1


def acme_request_from(evil_location: str, acme: AuthServer, client_id: str) -> str:
    params = {
        name: query_param(evil_location, name)
        for name in ("state", "redirect_uri", "code_challenge", "code_challenge_method", "scope")
    }
    return f"{acme.authorize_endpoint}?" + urlencode(
        {"response_type": "code", "client_id": client_id, **params}
    )


@pytest.mark.parametrize(
    "iss",
    [
        pytest.param(lambda i: "https://evil.example", id="other-issuer"),
        pytest.param(lambda i: i + "/", id="trailing-slash"),
        pytest.param(lambda i: i.upper(), id="other-case"),
        pytest.param(lambda i: "", id="empty"),
        pytest.param(lambda i: [i, i], id="repeated"),
        pytest.param(lambda i: [i, "https://evil.example"], id="repeated-other"),
    ],
)
async def test_iss_that_is_not_exactly_the_providers_is_refused_before_any_token_request(
    live_factory: LiveFactory, iss: Callable[[str], str | list[str]]
) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        callback = await live.consent(browser, location)
        value = iss(live.server.issuer)
        values = value if isinstance(value, list) else [value]
        query = urlencode(
            [("code", query_param(callback, "code")), ("state", state)]
            + [("iss", v) for v in values]
        )
        page = await browser.get(f"{live.url}/oauth/callback?{query}")
        assert page.status_code == 400, page.text
        assert page_data(page)["message"]["status"] == "error"
        assert sec.token_requests(live.server) == 0
        assert await live.rows() == 0
        assert await live.flows(state) == 0


async def test_missing_iss_is_refused_when_the_provider_spec_says_it_always_sends_one(
    live_factory: LiveFactory,
) -> None:
    async with live_factory(provider={"issuer_in_response": True}) as live, (
        live.browser()
    ) as browser:
        live.server.config.include_iss = False
        location = await live.start(browser)
        callback = await live.consent(browser, location)
        assert "iss=" not in callback
        page = await browser.get(callback)
        sec.assert_error_page(page, "The sign-in response did not say it came from Acme.")
        assert sec.token_requests(live.server) == 0
        assert await live.rows() == 0
        assert await live.flows(query_param(location, "state")) == 0


async def test_missing_iss_is_accepted_when_the_provider_may_leave_it_out(
    live_factory: LiveFactory,
) -> None:
    # The control for the test above: the default (issuer_in_response: false) connects.
    async with live_factory() as live, live.browser() as browser:
        live.server.config.include_iss = False
        callback = await live.consent(browser, await live.start(browser))
        assert "iss=" not in callback
        page = await browser.get(callback)
        assert page_data(page)["message"]["status"] == "connected", page.text
