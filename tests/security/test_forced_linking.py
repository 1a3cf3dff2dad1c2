"""Issue #11, item 1: forced account linking, performed in a real browser.

Mallory uses the host platform too: she can get a connect session, and tickets, for *her own*
group. She sends the victim links. The victim's browser (headless Chromium) is signed in at
the provider, which approves at once without asking (``auto_approve``): any link that could
start a sign-in for Mallory's group would finish it with one click and store the victim's
provider account in Mallory's group. Every vector below must store nothing there; the
connect page from Mallory's link may connect only after the victim confirms a workspace
that the page names ("Mallory's workspace").

The vectors: the old authorize URL with ``?session=``; a ticket in a URL; a page on
Mallory's own origin that opens the broker's start page or connect page and posts her
ticket or session to it, or posts the ticket to ``/oauth/start`` itself (a form and a
``fetch``); and ``connect_url`` itself.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.authserver import AuthServer
from tests.browser_support import (
    ConsoleWatch,
    HostSite,
    LiveServe,
    console,  # noqa: F401
    free_port_url,
    launch_chromium,
    start_serve,
    stop_serve,
)

CLIENT_ID = "broker-forced-linking"
CLIENT_SECRET = secrets.token_urlsafe(24)
MALLORY = "g-mallory"
WORKSPACE = "Mallory's workspace"
KEY = "sk-victim-0123456789abcdefVICT"

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Env:
    serve: LiveServe
    auth: AuthServer
    host: HostSite  # the real host app's origin (allowed)
    evil: HostSite  # Mallory's own site (not allowed)

    def mallory_session(self) -> tuple[str, str]:
        """Mallory's session for her own group: its token and its link."""
        with self.serve.service() as c:
            r = c.post(
                "/connect-sessions", json={"group_id": MALLORY, "display_name": WORKSPACE}
            )
            assert r.status_code == 201, r.text
            return str(r.json()["token"]), str(r.json()["connect_url"])

    def mallory_ticket(self, token: str) -> str:
        """A ticket for Mallory's group, as the connect page would get it with her session."""
        r = httpx.post(
            f"{self.serve.url}/groups/{MALLORY}/integrations/acme/authorize",
            json={}, headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201, r.text
        return str(r.json()["ticket"])

    def stored(self, name: str = "acme") -> int:
        """The status of Mallory's connection as a node would see it (404: nothing)."""
        with self.serve.service() as c:
            return c.get(f"/groups/{MALLORY}/integrations/{name}/credentials").status_code


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # The victim is signed in at the provider, which asks nothing: one click would do.
    auth = AuthServer(auto_approve=True, auto_approve_user="victim").start()
    host = HostSite().start()
    evil = HostSite().start()
    port_url = free_port_url()
    auth.register_client(
        CLIENT_ID, CLIENT_SECRET, redirect_uris=[f"{port_url[1]}/oauth/callback"], scopes=["read"]
    )
    providers = {
        "acme": {
            "display_name": "Acme",
            "auth_type": "oauth2",
            "authorization_url": auth.authorize_endpoint,
            "token_url": auth.token_endpoint,
            "issuer": auth.issuer,
            "default_scopes": ["read"],
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        "exampleai": {
            "display_name": "Example AI",
            "auth_type": "apikey",
            "fields": {"api_key": {"title": "API key", "pattern": "^sk-[A-Za-z0-9-]{20,}$"}},
        },
    }
    serve = start_serve(
        tmp_path_factory.mktemp("forced-linking"), providers,
        allowed_origins=[host.origin], port_url=port_url,
    )
    try:
        yield Env(serve, auth, host, evil)
    finally:
        stop_serve(serve)
        evil.stop()
        host.stop()
        auth.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with launch_chromium() as b:
        yield b


@pytest_asyncio.fixture(loop_scope="module")
async def victim(browser: Any, console: ConsoleWatch) -> AsyncIterator[Any]:  # noqa: F811
    """The victim's browser tab (a fresh context: cookies, storage)."""
    context = await browser.new_context()
    page = await context.new_page()
    console.attach(page)
    context.on("page", console.attach)
    await context.route("**/favicon.ico", lambda route: route.fulfill(status=204))
    try:
        yield page
    finally:
        await context.close()


async def settle(seconds: float = 1.5) -> None:
    """Long enough for an auto-approving provider to have finished a flow (it takes well
    under 200 ms here) if anything had started one."""
    await asyncio.sleep(seconds)


async def test_the_old_authorize_link_with_a_session_starts_nothing(
    env: Env, victim: Any, console: ConsoleWatch  # noqa: F811
) -> None:
    console.expect_http(401)
    token, _ = env.mallory_session()
    response = await victim.goto(
        f"{env.serve.url}/groups/{MALLORY}/integrations/acme/authorize?session={token}"
    )
    assert response is not None and response.status == 401
    assert "cannot be started from a link" in await victim.locator("#message").inner_text()
    await settle()
    assert victim.url.startswith(env.serve.url)  # never sent to the provider
    assert env.stored() == 404
    assert env.auth.token_requests["authorization_code"] == 0


async def test_a_ticket_in_a_link_starts_nothing(
    env: Env, victim: Any, console: ConsoleWatch  # noqa: F811
) -> None:
    console.expect_http(401)
    token, _ = env.mallory_session()
    ticket = env.mallory_ticket(token)
    await victim.goto(f"{env.serve.url}/oauth/start?ticket={ticket}#ticket={ticket}")
    assert "start from the app" in await victim.locator("#message").inner_text()
    response = await victim.goto(
        f"{env.serve.url}/groups/{MALLORY}/integrations/acme/authorize?ticket={ticket}"
    )
    assert response is not None and response.status == 401
    await settle()
    assert env.stored() == 404
    assert env.auth.token_requests["authorization_code"] == 0


ATTACK_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>Free stuff</title></head>
<body>
<button id="popup" type="button">Claim</button>
<button id="connect" type="button">Claim again</button>
<form id="form" method="post" enctype="text/plain" target="sink"></form>
<iframe name="sink" title="sink"></iframe>
<script>
var data = JSON.parse(decodeURIComponent(location.hash.slice(1)));
// Mallory's ticket to the broker's start page, however it asks (or does not).
document.getElementById("popup").addEventListener("click", function () {
  var w = window.open(data.broker + "/oauth/start", "start", "popup");
  setInterval(function () {
    try { w.postMessage({ type: "broker:start", ticket: data.ticket }, "*"); } catch (e) {}
  }, 100);
});
// Mallory's session to the broker's connect page.
document.getElementById("connect").addEventListener("click", function () {
  var w = window.open(data.broker + "/connect", "page", "popup");
  setInterval(function () {
    try { w.postMessage({ type: "broker:session", token: data.token }, "*"); } catch (e) {}
  }, 100);
});
window.postTicket = function () {
  // A form (a JSON-looking text/plain body) and a no-cors fetch, straight at /oauth/start.
  var form = document.getElementById("form");
  form.action = data.broker + "/oauth/start";
  var input = document.createElement("input");
  input.name = '{"ticket": "' + data.ticket + '", "x": "';
  input.value = '"}';
  form.appendChild(input);
  form.submit();
  return fetch(data.broker + "/oauth/start", {
    method: "POST", mode: "no-cors", credentials: "include",
    headers: { "Content-Type": "text/plain" },
    body: JSON.stringify({ ticket: data.ticket }),
  }).then(function () { return "sent"; }, function () { return "failed"; });
};
</script>
</body></html>
"""


async def test_mallorys_own_site_cannot_hand_the_broker_her_ticket_or_session(
    env: Env, victim: Any, console: ConsoleWatch  # noqa: F811
) -> None:
    console.expect_http(403)
    token, _ = env.mallory_session()
    ticket = env.mallory_ticket(token)
    env.evil.pages["/attack"] = ATTACK_PAGE
    data = json.dumps({"broker": env.serve.url, "ticket": ticket, "token": token})
    await victim.goto(f"{env.evil.origin}/attack#{data}")
    broker_calls: list[tuple[str, str]] = []
    victim.context.on(
        "request",
        lambda r: broker_calls.append((r.method, r.url)) if r.url.startswith(env.serve.url)
        else None,
    )
    starts: list[int] = []
    victim.context.on(
        "response",
        lambda r: starts.append(r.status) if r.url == f"{env.serve.url}/oauth/start"
        and r.request.method == "POST" else None,
    )

    # 1. The start page, opened by Mallory's page and sent her ticket: it takes a ticket
    # only from the broker's origin or an allowed one, and so never asks her page.
    async with victim.expect_popup() as info:
        await victim.locator("#popup").click()
    start = await info.value
    await start.locator("#message").wait_for()
    # 2. The connect page, opened by her page and sent her session: likewise ignored.
    async with victim.expect_popup() as info:
        await victim.locator("#connect").click()
    page = await info.value
    await page.locator("#integrations").wait_for(state="attached")
    # 3. Her ticket posted straight at /oauth/start, by a form and by fetch.
    assert await victim.evaluate("window.postTicket()") == "sent"
    await settle()

    assert start.url == f"{env.serve.url}/oauth/start"  # still waiting: never redeemed
    assert await page.locator("body[data-loaded]").count() == 0
    assert await page.locator(".card").count() == 0
    assert starts == [403, 403], starts  # the form and the fetch, refused by origin
    posted = [url for method, url in broker_calls if method == "POST"]
    assert posted == [f"{env.serve.url}/oauth/start"] * 2, broker_calls
    sessions = [url for _, url in broker_calls if "/connect-sessions" in url]
    assert sessions == [], sessions  # the page never used her session
    assert env.stored() == 404
    assert env.auth.token_requests["authorization_code"] == 0
    # Her ticket is unspent: nothing anywhere took it.
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{env.serve.url}/oauth/start", json={"ticket": ticket},
                            headers={"Origin": env.serve.url})
    assert r.status_code == 200, r.text


async def test_mallorys_connect_link_names_her_workspace_and_stores_nothing_unconfirmed(
    env: Env, victim: Any, console: ConsoleWatch  # noqa: F811
) -> None:
    _, link = env.mallory_session()
    popups: list[Any] = []
    victim.on("popup", lambda p: popups.append(p))
    await victim.goto(link)
    await victim.locator("body[data-loaded]").wait_for()
    assert victim.url == f"{env.serve.url}/connect"  # the token left the address bar
    banner = await victim.locator("#workspace").inner_text()
    assert banner.startswith(f"Workspace: {WORKSPACE} — you opened this page from a link")

    # OAuth2: "Connect" only asks; the question names the integration and the workspace.
    acme = victim.locator('[data-integration="acme"]')
    await acme.get_by_role("button", name="Connect").click()
    box = acme.get_by_role("group", name="Confirm workspace")
    assert f"Connect Acme to the workspace “{WORKSPACE}”?" in await box.inner_text()
    await settle()
    assert popups == [] and env.stored() == 404
    await box.get_by_role("button", name="Cancel").click()
    await box.wait_for(state="detached")

    # An API key: the same.
    card = victim.locator('[data-integration="exampleai"]')
    await card.get_by_label("API key").fill(KEY)
    await card.get_by_role("button", name="Connect").click()
    box = card.get_by_role("group", name="Confirm workspace")
    assert f"Connect Example AI to the workspace “{WORKSPACE}”?" in await box.inner_text()
    await settle(0.5)
    assert env.stored("exampleai") == 404
    await box.get_by_role("button", name="Cancel").click()
    await settle(0.5)
    assert env.stored("exampleai") == 404
    assert env.stored() == 404
    assert env.auth.token_requests["authorization_code"] == 0

    # The control: the confirmation is what stands between the link and a connection —
    # confirming the named workspace connects (with one click at this provider).
    await acme.get_by_role("button", name="Connect").click()
    async with victim.expect_popup():
        await acme.get_by_role("button", name=f"Connect to {WORKSPACE}").click()
    await victim.locator('[data-integration="acme"][data-status="connected"]').wait_for()
    assert env.stored() == 200
