"""Every way the OAuth2 popup flow can fail, end to end against the real authorization server.

Each failure ends on the result page with a clear message and ``"status": "error"`` in the
page's JSON, stores nothing (no row in ``connections``), and consumes the flow's state (no
row left in ``oauth_flows`` for it) so it cannot be finished later.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx
import pytest
from sqlalchemy import select, update

from broker.nodes import ExecutionContext
from broker.oauth.flows import _FLOW_SCOPE, hash_secret, new_verifier
from broker.store.models import OAuthFlow
from broker.store.repository import utcnow
from tests import oauth_support
from tests.oauth_support import HOST_ORIGIN, Live, page_data, query_param
from tests.support import loopback_socket, url_of

live_factory = oauth_support.live_factory

LiveFactory = Callable[..., Any]


# --------------------------------------------------------------------------- helpers


def with_params(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (None removes one), order kept."""
    parts = urlsplit(url)
    pairs = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    out = [(k, changes.get(k, v)) for k, v in pairs]
    out = [(k, v) for k, v in out if v is not None]
    return parts._replace(query=urlencode(out)).geturl()


def token_requests(live: Live) -> int:
    return sum(live.server.token_requests.values())


async def assert_failed(
    live: Live,
    page: httpx.Response,
    message: str,
    *,
    status_code: int = 400,
    state: str | None = None,
    rows: int = 0,
) -> None:
    """The result page says ``message``, its JSON says error, nothing stored, state gone."""
    assert page.status_code == status_code, page.text
    assert page.headers["content-type"].startswith("text/html")
    data = page_data(page)["message"]
    assert data["type"] == "broker:oauth"
    assert data["status"] == "error"
    assert message in data["error"], data["error"]
    assert message in page.text
    assert await live.rows() == rows
    if state is not None:
        assert await live.flows(state) == 0


async def sealed_flow(live: Live, state: str) -> dict[str, Any]:
    """The decrypted contents of a flow in progress (verifier, settings, ...)."""
    async with live.broker.session() as db:
        sealed = await db.scalar(
            select(OAuthFlow.sealed).where(OAuthFlow.state_hash == hash_secret(state))
        )
    assert sealed is not None
    return live.broker.keyring.open(_FLOW_SCOPE, hash_secret(state), sealed)


async def stored(live: Live, group_id: str = "g1") -> Any:
    async with live.broker.session() as db:
        return await live.broker.repository.get(db, group_id, "acme")


# --------------------------------------------------------------------------- the user says no


async def test_consent_denied_says_access_was_declined_and_requests_no_token(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        callback = await live.consent(browser, location, approve=False)
        assert query_param(callback, "error") == "access_denied"
        page = await browser.get(callback)
        await assert_failed(live, page, "Access to Acme was declined.", state=state)
        assert page_data(page)["message"]["integration"] == "acme"
        assert token_requests(live) == 0


# --------------------------------------------------------------------------- state


async def test_callback_without_state_is_refused_and_stores_nothing(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        callback = await live.consent(browser, await live.start(browser))
        page = await browser.get(with_params(callback, state=None))
        await assert_failed(live, page, "The sign-in response has no state.")
        assert token_requests(live) == 0


async def test_forged_state_is_refused_as_invalid(live_factory: LiveFactory) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        callback = await live.consent(browser, location)
        page = await browser.get(with_params(callback, state=secrets.token_urlsafe(32)))
        await assert_failed(live, page, "invalid or was already used")
        assert token_requests(live) == 0
        # The real flow is untouched by the forgery.
        assert await live.flows(query_param(location, "state")) == 1


async def test_replayed_callback_is_refused_and_leaves_the_first_connection_untouched(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        callback = await live.consent(browser, location)
        first = await browser.get(callback)
        assert first.status_code == 200, first.text
        assert page_data(first)["message"]["status"] == "connected"
        before = await stored(live)

        again = await browser.get(callback)
        await assert_failed(
            live, again, "invalid or was already used", rows=1,
            state=query_param(location, "state"),
        )
        after = await stored(live)
        assert after.info.version == before.info.version == 1
        assert after.data == before.data
        assert live.server.token_requests["authorization_code"] == 1


async def test_expired_state_is_refused_and_consumed(live_factory: LiveFactory) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        callback = await live.consent(browser, location)
        live.broker.clock = lambda: utcnow() + timedelta(minutes=11)
        page = await browser.get(callback)
        await assert_failed(live, page, "This sign-in took too long.", state=state)
        assert token_requests(live) == 0


async def test_state_finished_in_another_browser_is_refused_and_burnt_for_both(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser, live.browser() as other:
        location = await live.start(browser)
        state = query_param(location, "state")
        callback = await live.consent(browser, location)
        assert "broker_flow" not in other.cookies

        page = await other.get(callback)
        await assert_failed(live, page, "started in another browser", state=state)
        # The browser that started it cannot use it now either.
        page = await browser.get(callback)
        await assert_failed(live, page, "invalid or was already used", state=state)
        assert token_requests(live) == 0


async def test_two_callbacks_racing_with_one_state_connect_once(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        callback = await live.consent(browser, location)
        pages = await asyncio.gather(browser.get(callback), browser.get(callback))
        statuses = sorted(page_data(p)["message"]["status"] for p in pages)
        assert statuses == ["connected", "error"]
        (refused,) = [p for p in pages if page_data(p)["message"]["status"] == "error"]
        assert "invalid or was already used" in page_data(refused)["message"]["error"]
        assert live.server.token_requests["authorization_code"] == 1
        assert await live.rows() == 1
        assert await live.flows() == 0


# --------------------------------------------------------------------------- token endpoint


@pytest.mark.parametrize("fault", ["500", "429", "timeout"])
async def test_token_endpoint_failure_shows_an_error_page_without_the_code(
    live_factory: LiveFactory, fault: str
) -> None:
    async with live_factory(provider={"timeout_seconds": 0.3}) as live, (
        live.browser()
    ) as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        callback = await live.consent(browser, location)
        code = query_param(callback, "code")
        if fault == "500":
            live.server.fail_next(status=500)
        elif fault == "429":
            live.server.rate_limit_next(retry_after=30)
        else:
            live.server.timeout_next(seconds=3)
        page = await browser.get(callback)
        await assert_failed(
            live, page, "Acme did not issue a token. Start again.", status_code=502,
            state=state,
        )
        assert code not in page.text
        assert live.server.token_requests["authorization_code"] == 1


async def test_unreachable_token_endpoint_is_a_502_error_page(
    live_factory: LiveFactory,
) -> None:
    closed = loopback_socket()  # bound, never listening: connections are refused
    try:
        async with live_factory(
            provider={"token_url": url_of(closed) + "/token"}
        ) as live, live.browser() as browser:
            location = await live.start(browser)
            callback = await live.consent(browser, location)
            page = await browser.get(callback)
            await assert_failed(
                live, page, "Acme did not issue a token. Start again.", status_code=502,
                state=query_param(location, "state"),
            )
            assert query_param(callback, "code") not in page.text
    finally:
        closed.close()


@pytest.mark.parametrize(
    ("server_config", "provider"),
    [
        # A flat response is taken as it is when token_path names nothing (Slack nests the
        # token only in the code exchange), so these answers carry no token at either level.
        pytest.param(
            {"response_shape": "slack"}, {"token_path": "nope"}, id="token_path-names-nothing"
        ),
        pytest.param(
            {"response_shape": "slack"}, {"token_path": "team.id"}, id="token_path-not-an-object"
        ),
        pytest.param({"response_shape": "slack"}, {}, id="nested-token-without-token_path"),
    ],
)
async def test_token_response_without_an_access_token_stores_nothing(
    live_factory: LiveFactory, server_config: dict[str, Any], provider: dict[str, Any]
) -> None:
    async with live_factory(provider=provider) as live, live.browser() as browser:
        for key, value in server_config.items():
            setattr(live.server.config, key, value)
        location = await live.start(browser)
        page = await browser.get(await live.consent(browser, location))
        await assert_failed(
            live, page, "Acme answered without an access token.", status_code=502,
            state=query_param(location, "state"),
        )
        assert live.server.token_requests["authorization_code"] == 1


async def test_reused_authorization_code_with_a_new_flows_state_fails_and_stores_nothing_new(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        callback = await live.consent(browser, await live.start(browser))
        assert (await browser.get(callback)).status_code == 200
        before = await stored(live)

        # A second flow in the same browser (so the browser check passes), fed the old code.
        second = await live.start(browser)
        state = query_param(second, "state")
        page = await browser.get(with_params(callback, state=state))
        await assert_failed(
            live, page, "Acme did not issue a token (invalid_grant).", state=state, rows=1
        )
        after = await stored(live)
        assert after.info.version == 1
        assert after.data == before.data
        assert live.server.token_requests["authorization_code"] == 2
        # The provider saw the replay and (RFC 6749 §4.1.2) revoked what the code produced.
        assert live.server.is_grant_revoked(before.data["access_token"])


async def test_pkce_verifier_mismatch_is_rejected_by_the_provider(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        # Reseal the flow with a verifier the challenge was not made from.
        data = await sealed_flow(live, state)
        assert data["verifier"]
        data["verifier"] = new_verifier()
        sealed = live.broker.keyring.seal(_FLOW_SCOPE, hash_secret(state), data)
        async with live.broker.session() as db, db.begin():
            await db.execute(
                update(OAuthFlow)
                .where(OAuthFlow.state_hash == hash_secret(state))
                .values(sealed=sealed.token)
            )
        page = await browser.get(await live.consent(browser, location))
        await assert_failed(
            live, page, "Acme did not issue a token (invalid_grant).", state=state
        )
        assert live.server.invalid_grant_count == 1
        seen = live.server.requests_seen("token")
        assert seen[-1].params["code_verifier"] == data["verifier"]


# --------------------------------------------------------------------------- redirect_uri, iss


async def test_redirect_uri_is_the_public_url_whatever_host_the_request_names(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        r = await live.authorize(
            browser,
            headers={
                "Host": "evil.example",
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "https",
                "Forwarded": "host=evil.example;proto=https",
            },
        )
        assert r.status_code == 200, r.text
        location = r.json()["location"]
        assert query_param(location, "redirect_uri") == f"{live.url}/oauth/callback"
        assert "evil.example" not in location
        callback = await live.consent(browser, location)
        page = await browser.get(callback)
        assert page_data(page)["message"]["status"] == "connected", page.text
        token_request = live.server.requests_seen("token")[-1]
        assert token_request.params["redirect_uri"] == f"{live.url}/oauth/callback"


async def test_callback_from_another_issuer_is_refused_before_any_token_request(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        callback = await live.consent(browser, location)
        assert query_param(callback, "iss") == live.server.issuer
        page = await browser.get(with_params(callback, iss="https://evil.example"))
        await assert_failed(
            live, page, "The sign-in response did not come from Acme.",
            state=query_param(location, "state"),
        )
        assert token_requests(live) == 0


# --------------------------------------------------------------------------- connect sessions


OTHER = {
    "other": {
        "display_name": "Other",
        "auth_type": "apikey",
        "fields": {"api_key": {"title": "API key"}},
    }
}


def assert_json_error(r: httpx.Response, status_code: int, code: str) -> dict[str, Any]:
    assert r.status_code == status_code, r.text
    assert r.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code, error
    return error


async def test_connect_session_of_another_group_gets_not_found_for_a_ticket(
    live_factory: LiveFactory,
) -> None:
    # Issue #6 supersedes #3's 403 here: another group's resources answer exactly what
    # resources that do not exist answer, so a session learns nothing about other groups.
    async with live_factory() as live, live.browser() as browser:
        session = await live.session_token("g2")
        r = await live.authorize(browser, group_id="g1", session=session)
        assert assert_json_error(r, 404, "not_found")["message"] == "Not found."
        assert await live.flows() == 0


async def test_expired_connect_session_gets_no_ticket_and_says_it_expired(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        session = await live.session_token("g1")
        live.broker.clock = lambda: utcnow() + timedelta(minutes=31)
        r = await live.authorize(browser, session=session)
        error = assert_json_error(r, 401, "unauthorized")
        assert error["reason"] == "session_expired" and "expired" in error["message"]
        assert await live.flows() == 0


async def test_connect_session_cannot_read_credentials_or_open_sessions(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        session = await live.session_token("g1")
        bearer = {"Authorization": f"Bearer {session}"}
        r = await browser.get(
            f"{live.url}/groups/g1/integrations/acme/credentials", headers=bearer
        )
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
        r = await browser.post(
            f"{live.url}/connect-sessions", json={"group_id": "g1"}, headers=bearer
        )
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"


async def test_connect_session_allow_list_limits_authorize_and_the_list(
    live_factory: LiveFactory,
) -> None:
    async with live_factory(extra_providers=OTHER) as live, live.browser() as browser:
        session = await live.session_token("g1", integrations=["other"])
        r = await live.authorize(browser, session=session)
        assert_json_error(r, 404, "not_found")
        assert await live.flows() == 0

        r = await browser.get(
            f"{live.url}/groups/g1/integrations", headers={"Authorization": f"Bearer {session}"}
        )
        assert r.status_code == 200, r.text
        assert [i["name"] for i in r.json()["integrations"]] == ["other"]
        # The service token sees both.
        listing = (await live.service.get("/groups/g1/integrations")).json()
        assert {i["name"] for i in listing["integrations"]} == {"acme", "other"}


# --------------------------------------------------------------------------- the result page


async def test_result_page_links_back_to_an_allowed_return_to(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        back = f"{HOST_ORIGIN}/back"
        page = await live.popup(browser, query=f"&return_to={quote(back, safe='')}")
        assert page_data(page)["message"]["status"] == "connected", page.text
        assert f'<a href="{back}">Go back</a>' in page.text


@pytest.mark.parametrize(
    "return_to",
    ["//evil.example", "https:/\\evil.example", "javascript:alert(1)", "/" + "x" * 512],
)
async def test_an_unsafe_or_overlong_return_to_gets_no_ticket(
    live_factory: LiveFactory, return_to: str
) -> None:
    async with live_factory() as live:
        r = await live.ticket(return_to=return_to)
        error = assert_json_error(r, 422, "invalid_input")
        assert error["field"] == "return_to"
        assert "evil.example" not in r.text and "javascript:" not in r.text
        assert await live.flows() == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param(
            {"error": "access_denied", "error_description": "<script>alert(1)</script>"},
            "Access to Acme was declined.",
            id="error_description",
        ),
        pytest.param(
            {"error": "<script>alert(1)</script>", "error_description": "<b>alert(1)</b>"},
            "Acme could not complete the sign-in.",
            id="error",
        ),
    ],
)
async def test_result_page_never_echoes_provider_error_text(
    live_factory: LiveFactory, params: dict[str, str], message: str
) -> None:
    async with live_factory() as live, live.browser() as browser:
        state = query_param(await live.start(browser), "state")
        page = await browser.get(
            f"{live.url}/oauth/callback?" + urlencode({"state": state, **params})
        )
        await assert_failed(live, page, message, state=state)
        assert "alert(1)" not in page.text
        assert "<script>alert" not in page.text
        assert token_requests(live) == 0


async def test_repeated_state_is_refused_without_a_token_request(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        state = query_param(await live.start(browser), "state")
        page = await browser.get(
            f"{live.url}/oauth/callback?state={state}&state=b&code=c"
        )
        await assert_failed(live, page, "The sign-in response repeats 'state'")
        page = await browser.get(f"{live.url}/oauth/callback?state=a%00b&code=c")
        await assert_failed(live, page, "The sign-in response has a malformed 'state'")
        assert token_requests(live) == 0


@pytest.mark.parametrize(
    ("code", "message"),
    [
        pytest.param(["a", "b"], "repeats 'code'", id="repeated"),
        pytest.param(["x" * 5000], "malformed 'code'", id="over-the-limit"),
        # ~60 KB: httpx refuses to send URLs over 64 KB at all.
        pytest.param(["x" * 60_000], "malformed 'code'", id="60KB"),
        pytest.param(["ab\x00cd"], "malformed 'code'", id="NUL"),
    ],
)
async def test_malformed_code_is_refused_and_consumes_the_state(
    live_factory: LiveFactory, code: list[str], message: str
) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        await live.consent(browser, location)  # a real code exists; it is not sent
        query = urlencode([("state", state), ("iss", live.server.issuer)]) + "".join(
            f"&code={quote(c, safe='')}" for c in code
        )
        page = await browser.get(f"{live.url}/oauth/callback?{query}")
        await assert_failed(live, page, message, state=state)
        assert token_requests(live) == 0


# --------------------------------------------------------------------------- reconnecting


async def test_reconnecting_replaces_the_tokens_in_the_same_row(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        ctx = ExecutionContext.local(live.broker, "g1")
        assert page_data(await live.popup(browser))["message"]["status"] == "connected"
        first = await ctx.custom_integration("acme")
        assert (await stored(live)).info.version == 1

        assert page_data(await live.popup(browser))["message"]["status"] == "connected"
        assert await live.rows() == 1
        row = await stored(live)
        assert row.info.version == 2
        second = await ctx.custom_integration("acme")
        assert second["access_token"] != first["access_token"]
        assert second["access_token"] == row.data["access_token"]
        me = await browser.get(
            live.server.userinfo_endpoint,
            headers={"Authorization": f"Bearer {second['access_token']}"},
        )
        assert me.status_code == 200, me.text


# --------------------------------------------------------------------------- logs


_USER_AGENT = contextvars.ContextVar("user_agent", default=False)


class _UserAgentTransport(httpx.AsyncBaseTransport):
    """Marks what the test's user agent logs (httpcore logs the redirects it follows,
    whose Location carries the code) so the test can tell it from the broker's logs."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        mark = _USER_AGENT.set(True)
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            _USER_AGENT.reset(mark)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _mark_user_agent(record: logging.LogRecord) -> bool:
    record.user_agent = _USER_AGENT.get()
    return True


async def test_debug_logs_carry_no_token_code_verifier_or_client_secret(
    live_factory: LiveFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(_mark_user_agent)
    secrets_seen: list[str] = []
    async with live_factory() as live, live.browser(
        transport=_UserAgentTransport()
    ) as browser:
        secrets_seen.append(live.client_secret)
        # A success ...
        location = await live.start(browser)
        secrets_seen.append((await sealed_flow(live, query_param(location, "state")))["verifier"])
        callback = await live.consent(browser, location)
        secrets_seen.append(query_param(callback, "code"))
        assert page_data(await browser.get(callback))["message"]["status"] == "connected"
        row = await stored(live)
        secrets_seen += [row.data["access_token"], row.data["refresh_token"]]
        await ExecutionContext.local(live.broker, "g1").custom_integration("acme")

        # ... a failure at the token endpoint, and a refused replay of the same code.
        location = await live.start(browser)
        secrets_seen.append((await sealed_flow(live, query_param(location, "state")))["verifier"])
        callback = await live.consent(browser, location)
        secrets_seen.append(query_param(callback, "code"))
        live.server.fail_next(status=500)
        assert page_data(await browser.get(callback))["message"]["status"] == "error"
        location = await live.start(browser)
        page = await browser.get(with_params(callback, state=query_param(location, "state")))
        assert page_data(page)["message"]["status"] == "error"

    here = threading.get_ident()

    def broker_side(record: logging.LogRecord) -> bool:
        # Only this thread (the authorization server logs what it issues in its own), and
        # not the test's user agent (its httpcore traces, its httpx lines naming the
        # callback URLs it opens).
        if record.thread != here:
            return False
        if getattr(record, "user_agent", False):
            return False
        return not (record.name.startswith("httpx") and live.url in record.getMessage())

    logs = "\n".join(r.getMessage() for r in caplog.records if broker_side(r))
    assert "connected acme for group g1" in logs
    # The broker's own token requests were logged (and checked) down to httpcore's traces.
    assert any(r.name == "httpx" for r in caplog.records if broker_side(r))
    assert any(r.name.startswith("httpcore") for r in caplog.records if broker_side(r))
    for secret in secrets_seen:
        assert secret
        assert secret not in logs
