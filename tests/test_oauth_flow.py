"""The OAuth2 popup flow end to end, against the real authorization server on 127.0.0.1.

A real HTTP user agent (httpx with a cookie jar) opens the authorize route of a broker
served by uvicorn, follows it to the provider, submits the consent form, follows the
redirect back to the broker's callback and reads the result page. A node then uses the
token against the provider's protected resource.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from broker.nodes import ExecutionContext
from tests import oauth_support
from tests.oauth_support import HOST_ORIGIN, Live, acme, page_data  # noqa: F401 (re-exported)

live_factory = oauth_support.live_factory


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_popup_flow_connects_and_a_node_uses_the_token_at_the_provider(
    live_factory: Callable[..., Any], auth_method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with live_factory(auth_method=auth_method) as live, live.browser() as browser:
        page = await live.popup(browser)
        assert page.status_code == 200, page.text
        data = page_data(page)
        assert data["message"] == {
            "type": "broker:oauth", "integration": "acme", "status": "connected", "error": None
        }
        assert data["targets"] == [live.url, HOST_ORIGIN]
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self'" in page.headers["content-security-policy"]

        ctx = ExecutionContext.local(live.broker, "g1")
        creds = await ctx.custom_integration("acme")
        assert set(creds) >= {"access_token", "token_type", "expires_at", "scope"}
        assert "refresh_token" not in creds
        me = await browser.get(
            live.server.userinfo_endpoint,
            headers={"Authorization": f"Bearer {creds['access_token']}"},
        )
        assert me.status_code == 200, me.text

        # The same from the credentials route, and the list shows it connected.
        r = await live.service.get("/groups/g1/integrations/acme/credentials")
        assert r.json()["credentials"]["access_token"] == creds["access_token"]
        listing = (await live.service.get("/groups/g1/integrations")).json()
        assert listing["integrations"][0]["status"] == "connected"

        # No secret in any URL the browser visited, in the page, or in the logs.
        async with live.broker.session() as db:
            stored = await live.broker.repository.get(db, "g1", "acme")
        assert stored is not None
        secrets = [
            stored.data["access_token"], stored.data["refresh_token"], live.client_secret
        ]
        # The authorization server runs in its own thread and logs what it issues; the
        # broker (this thread: the test's event loop) must log none of it.
        here = threading.get_ident()
        broker_logs = "\n".join(
            r.getMessage() for r in caplog.records if r.thread == here
        )
        assert "connected acme for group g1" in broker_logs  # the broker's logs were captured
        text = "\n".join(live.visited) + page.text + broker_logs
        for secret in secrets:
            assert secret not in text
        assert live.server.token_requests["authorization_code"] == 1
