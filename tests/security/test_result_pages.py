"""Issue #6, item 5: the pages the broker renders itself.

The OAuth2 result page (where the popup ends) and the connect page: strict headers
(``Referrer-Policy: no-referrer``, a CSP without inline script), nothing loaded from another
origin, and on the result page only a status: never the code, state, verifier or a token.
Its ``postMessage`` goes only to the configured origins (the JSON block's ``targets``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from broker.oauth.flows import _FLOW_SCOPE, hash_secret
from broker.runtime import Broker
from broker.store.models import OAuthFlow
from tests import oauth_support
from tests.oauth_support import HOST_ORIGIN, Live, page_data, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory
sec_broker = sec.sec_broker

LiveFactory = Callable[..., Any]
STATIC = Path(__file__).resolve().parents[2] / "broker" / "web" / "static"
URL_ATTRS = {"src", "href", "action", "formaction", "srcset", "poster", "data", "background",
             "ping", "manifest", "xlink:href"}


class Page(HTMLParser):
    """Every URL-bearing attribute, every script, every inline handler of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []
        self.meta_refresh = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name, value in attrs:
            if name in URL_ATTRS and value is not None:
                self.urls.append((tag, name, value))
            if name.startswith("on") or name == "style":
                self.handlers.append(f"<{tag} {name}>")
        if tag == "script":
            self.scripts.append(found)
        if tag == "meta" and (found.get("http-equiv") or "").lower() == "refresh":
            self.meta_refresh = True
        if tag == "base":
            self.handlers.append("<base>")


def assert_page_loads_only_from_its_own_origin(text: str, links_to: list[str]) -> Page:
    page = Page(text)
    assert page.urls, "no URL found at all: the parser is not seeing the page"
    for tag, attr, value in page.urls:
        if tag == "a":
            # A link the user may follow: only to an allowed origin or a broker path.
            assert value in links_to, (tag, attr, value)
        elif tag == "link" and value == "data:,":
            continue  # the empty favicon: loads nothing
        else:
            assert re.match(r"/(?![/\\])", value), f"<{tag} {attr}={value!r}> loads off-origin"
    for script in page.scripts:
        # No inline script: either same-origin src, or a JSON data block (not executed).
        assert script.get("src") or script.get("type") == "application/json", script
    assert not page.handlers, page.handlers
    assert not page.meta_refresh
    return page


def assert_strict_headers(response: httpx.Response, frame_ancestors: str = "'none'") -> None:
    headers = response.headers
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    csp = {}
    for part in headers["content-security-policy"].split(";"):
        name, _, value = part.strip().partition(" ")
        csp[name] = value
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'"
    assert csp["base-uri"] == "'none'"
    assert csp["frame-ancestors"] == frame_ancestors
    assert "unsafe" not in headers["content-security-policy"]
    assert "*" not in headers["content-security-policy"]


def assert_result_page(page: httpx.Response, live_url: str, secrets: list[str]) -> None:
    assert_strict_headers(page)
    data = page_data(page)
    assert set(data) == {"message", "targets"}
    assert set(data["message"]) == {"type", "integration", "status", "error"}
    # postMessage goes to these and nowhere else: the broker's origin and the allowed ones.
    assert data["targets"] == [live_url, HOST_ORIGIN]
    assert_page_loads_only_from_its_own_origin(page.text, [f"{HOST_ORIGIN}/back"])
    for secret in secrets:
        assert secret
        assert secret not in page.text, "a secret reached the result page"


async def flow_secrets(live: Live, state: str) -> list[str]:
    async with live.broker.session() as db:
        sealed = await db.scalar(
            select(OAuthFlow.sealed).where(OAuthFlow.state_hash == hash_secret(state))
        )
    assert sealed is not None
    data = live.broker.keyring.open(_FLOW_SCOPE, hash_secret(state), sealed)
    return [state, data["verifier"]]


async def test_result_pages_of_a_success_and_of_failures_carry_only_a_status(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        session = await live.session_token()
        query = f"&return_to={HOST_ORIGIN}/back"
        secrets = [live.client_secret, session]

        # A success.
        location = await live.start(browser, session=session, query=query)
        state = query_param(location, "state")
        secrets += await flow_secrets(live, state)
        nonce = next(c.value for c in browser.cookies.jar if c.name.startswith("broker_flow_"))
        secrets.append(nonce)
        callback = await live.consent(browser, location)
        secrets.append(query_param(callback, "code"))
        page = await browser.get(callback)
        assert page_data(page)["message"]["status"] == "connected", page.text
        async with live.broker.session() as db:
            row = await live.broker.repository.get(db, "g1", "acme")
        assert row is not None
        secrets += [row.data["access_token"], row.data["refresh_token"]]
        assert_result_page(page, live.url, secrets)

        # A failure at the token endpoint whose answer echoes the request.
        location = await live.start(browser, session=session, query=query)
        secrets += await flow_secrets(live, query_param(location, "state"))
        callback = await live.consent(browser, location)
        code = query_param(callback, "code")
        secrets.append(code)
        live.server.fail_next(status=400, body=f'{{"error":"invalid_grant","code":"{code}"}}')
        page = await browser.get(callback)
        sec.assert_error_page(page, "Acme did not issue a token")
        assert_result_page(page, live.url, secrets)

        # The user says no; and a replay of a used callback.
        location = await live.start(browser, session=session, query=query)
        secrets += await flow_secrets(live, query_param(location, "state"))
        page = await browser.get(await live.consent(browser, location, approve=False))
        sec.assert_error_page(page, "declined")
        assert_result_page(page, live.url, secrets)
        page = await browser.get(callback)
        sec.assert_error_page(page, "invalid or was already used")
        assert_result_page(page, live.url, secrets)


async def test_authorize_link_and_start_pages_have_the_same_strict_headers(
    sec_broker: Broker,
) -> None:
    async with sec.app_client(sec_broker, headers={}) as anonymous:
        r = await anonymous.get("/groups/g1/integrations/acme/authorize?session=bcs_nope")
        assert r.status_code == 401
        assert_strict_headers(r)
        assert_page_loads_only_from_its_own_origin(r.text, [])
        r = await anonymous.get("/oauth/start")
        assert r.status_code == 200
        assert_strict_headers(r)
        assert "connect-src 'self'" in r.headers["content-security-policy"]
        loaded = assert_page_loads_only_from_its_own_origin(r.text, [])
        assert ("script", "src", "/static/oauth-start.js") in loaded.urls
        data = json.loads(re.search(r'id="broker-start">(.*?)</script>', r.text, re.S)[1])
        assert data == {"origin": "http://broker.test",
                        "targets": ["http://broker.test", sec.HOST_ORIGIN]}
    async with sec.app_client(sec_broker) as service:
        r = await service.get("/groups/g1/integrations/acme/authorize")  # even a service
        assert r.status_code == 400
        assert_strict_headers(r)
        assert_page_loads_only_from_its_own_origin(r.text, [])


async def test_connect_page_has_a_strict_csp_framed_only_by_allowed_origins(
    sec_broker: Broker,
) -> None:
    async with sec.app_client(sec_broker) as service:
        r = await service.post("/connect-sessions", json={"group_id": "g1"})
        token = r.json()["token"]
    assert r.json()["connect_url"] == f"http://broker.test/connect#session={token}"
    async with sec.app_client(sec_broker, headers={}) as browser:
        # The token is in the link's fragment, which a browser never sends: the page is
        # the same for everyone and holds no session.
        for query in ({}, {"session": token}, {"session": "x" * 300}):
            page = await browser.get("/connect", params=query)
            assert page.status_code == 200
            assert_strict_headers(page, frame_ancestors=sec.HOST_ORIGIN)
            csp = page.headers["content-security-policy"]
            assert "connect-src 'self'" in csp
            assert "form-action 'none'" in csp
            loaded = assert_page_loads_only_from_its_own_origin(page.text, [])
            assert ("script", "src", "/static/connect.js") in loaded.urls
            assert token not in page.text
            data = re.search(r'id="broker-connect">(.*?)</script>', page.text, re.S)
            assert data is not None
            assert json.loads(data.group(1)) == {
                "origin": "http://broker.test", "allowed_origins": [sec.HOST_ORIGIN]
            }


def test_pages_scripts_post_messages_only_to_named_origins() -> None:
    # Never the "*" target: each postMessage names an origin taken from the page's data.
    for name in ("popup.js", "oauth-start.js", "connect.js"):
        source = (STATIC / name).read_text()
        calls = re.findall(r"postMessage\(([^)]*)\)", source)
        assert calls, name
        for args in calls:
            assert "*" not in args, (name, args)
            assert args.strip().endswith("origin") or "," not in args, (name, args)
    connect = (STATIC / "connect.js").read_text()
    assert "event.origin !== data.origin" in connect
    # A session or a ticket is taken only from the window that embeds or opened the page,
    # and only on an allowed origin.
    assert "data.allowed_origins.indexOf(event.origin) < 0" in connect
    start = (STATIC / "oauth-start.js").read_text()
    assert "event.source !== window.opener || data.targets.indexOf(event.origin) < 0" in start
