"""The connect page in a real browser (headless Chromium) against a live ``broker serve``
and the real OAuth2 authorization server (``tests/authserver``), both on 127.0.0.1.

One ``broker serve`` is shared by the module; each test uses its own group id. Most tests
open the page from its link (``connect_url``), as a person who got it by email does: the
page names the workspace and every connect asks to confirm it. A host app (``HostSite``) on
a second loopback origin embeds the page (handing it the session by ``postMessage``: no
confirmation then), opens the sign-in popup itself, and tries to fool the page.
(``tests/security/test_forced_linking.py`` is the attack on links.)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.apiserver import ApiServer
from tests.authserver import AuthServer
from tests.browser_support import (
    ConsoleWatch,
    HostSite,
    LiveServe,
    console,  # noqa: F401
    free_port_url,
    launch_chromium,
    screenshot,
    start_serve,
    stop_serve,
)

KEY = "sk-test-0123456789abcdefWXYZ"
CLIENT_ID = "broker-connect-page"
CLIENT_SECRET = secrets.token_urlsafe(24)
POPUP = {"width": 640, "height": 680}  # not the 660x660 default: proves the config is used
ROBOT = "robot@project.iam.example"
ROBOT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

APIKEY_PROVIDER = {
    "display_name": "Example AI",
    "auth_type": "apikey",
    "fields": {
        "api_key": {
            "title": "API key",
            "secret": True,
            "pattern": "^sk-[A-Za-z0-9-]{20,}$",
            "example": "sk-...",
        }
    },
}

# The host app: embeds the connect page (``?broker=<origin>&token=<session>``), hands it
# the session when it asks, and records every other message it gets.
EMBED_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>Host app</title></head>
<body>
<h1>Host app</h1>
<iframe id="broker" title="Integrations" style="width:100%;height:560px"></iframe>
<iframe id="sender" name="sender" sandbox="allow-scripts" srcdoc="<p>sandboxed</p>"
  style="width:10px;height:10px"></iframe>
<script>
var params = new URLSearchParams(location.search);
var broker = params.get("broker"), token = params.get("token");
window.received = [];
window.addEventListener("message", function (e) {
  if (e.origin === broker && e.data && e.data.type === "broker:connect-ready") {
    e.source.postMessage({ type: "broker:session", token: token }, broker);
    return;
  }
  window.received.push({ origin: e.origin, data: e.data });
});
document.getElementById("broker").src = broker + "/connect";
</script>
</body></html>
"""

# The host app opening the sign-in popup itself, with a ticket its backend got
# (``?broker=<origin>&ticket=<ticket>``): it answers the popup's start page, then hears
# the result.
SIGN_IN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>Host app</title></head>
<body>
<button id="connect" type="button">Connect Acme</button>
<script>
var params = new URLSearchParams(location.search);
var broker = params.get("broker"), ticket = params.get("ticket");
var popup = null;
window.results = [];
document.getElementById("connect").addEventListener("click", function () {
  popup = window.open(broker + "/oauth/start", "signin", "popup,width=600,height=600");
});
window.addEventListener("message", function (e) {
  if (e.origin !== broker || !e.data) return;
  if (e.data.type === "broker:start-ready" && e.source === popup) {
    popup.postMessage({ type: "broker:start", ticket: ticket }, broker);
  } else if (e.data.type === "broker:oauth") {
    window.results.push(e.data);
  }
});
</script>
</body></html>
"""


# One Chromium for the module (each test's new_page() is its own browser context).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with launch_chromium() as b:
        yield b


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def _close_pages(browser: Any) -> AsyncIterator[None]:
    yield
    for context in browser.contexts:
        await context.close()


@dataclass
class Env:
    serve: LiveServe
    auth: AuthServer
    host: HostSite
    api: ApiServer

    def session_url(self, group_id: str, *integrations: str) -> str:
        """The link to the page for ``group_id`` (its workspace named ``Team <group_id>``)."""
        extra: dict[str, Any] = {"display_name": workspace(group_id)}
        if integrations:
            extra["integrations"] = list(integrations)
        return self.serve.session_url(group_id, **extra)

    def session_token(self, group_id: str, *integrations: str) -> str:
        with self.serve.service() as c:
            body: dict[str, Any] = {"group_id": group_id, "display_name": workspace(group_id)}
            if integrations:
                body["integrations"] = list(integrations)
            r = c.post("/connect-sessions", json=body)
            assert r.status_code == 201, r.text
            return str(r.json()["token"])

    def embed_url(self, group_id: str, *integrations: str) -> str:
        """The host app's page embedding the connect page for ``group_id``."""
        token = self.session_token(group_id, *integrations)
        return f"{self.host.origin}/embed?broker={quote(self.serve.url)}&token={quote(token)}"

    def credentials(self, group_id: str, name: str, **params: str) -> httpx.Response:
        with self.serve.service() as c:
            return c.get(f"/groups/{group_id}/integrations/{name}/credentials", params=params)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    auth = AuthServer().start()
    api = ApiServer(basic_users={"ada": "basic-password-0123"},
                    login_users={"ada": "login-password-0123"}).start()
    # A provider page that sends Cross-Origin-Opener-Policy (as big providers' sign-in pages
    # do), then goes on to the real authorization endpoint with the same query.
    coop_page = (
        '<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<script>location.replace({json.dumps(auth.authorize_endpoint)} + location.search)"
        "</script>"
    )
    host = HostSite(
        {
            "/embed": EMBED_PAGE,
            "/coop/authorize": (coop_page, {"Cross-Origin-Opener-Policy": "same-origin"}),
            "/sign-in": SIGN_IN_PAGE,
        }
    ).start()
    oauth = {
        "auth_type": "oauth2",
        "token_url": auth.token_endpoint,
        "revocation_url": auth.revocation_endpoint,
        "issuer": auth.issuer,
        "default_scopes": ["read"],
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    providers = {
        "exampleai": APIKEY_PROVIDER,
        "acme": {
            **oauth,
            "display_name": "Acme",
            "authorization_url": auth.authorize_endpoint,
            "popup": POPUP,
        },
        "coopco": {
            **oauth,
            "display_name": "Coop Co",
            "authorization_url": host.origin + "/coop/authorize",
        },
        "basicco": {
            "display_name": "Basic Co",
            "auth_type": "basic",
            "fields": {"user": {"title": "Account name", "secret": False},
                       "secret": {"title": "Account password"}},
            "username": "{user}",
            "password": "{secret}",
            "verify": {"url": f"{api.url}/basic/status/200"},
        },
        "twostep": {
            "display_name": "Two Step",
            "auth_type": "token_exchange",
            "fields": {"user": {"title": "Login", "secret": False},
                       "secret": {"title": "Login password"}},
            "token_url": f"{api.url}/open/login",
            "token_body": {"user": "{user}", "secret": "{secret}"},
            "token_path": "data.token",
            "expires_in_path": "expiresIn",
        },
        "robot": {
            "display_name": "Robot",
            "auth_type": "jwt_bearer",
            "fields": {"key_file": {"title": "Key file", "format": "json",
                                    "max_length": 16384}},
            "private_key_from": "key_file.private_key",
            "claims": {"iss": "{key_file.client_email}", "aud": auth.token_endpoint},
            "token_url": auth.token_endpoint,
        },
        "tenantco": {
            **oauth,
            "display_name": "Tenant Co",
            "authorization_url": auth.authorize_endpoint + "?tenant={tenant}",
            "settings": {"tenant": {"title": "Tenant", "secret": False, "pattern": "^[a-z]+$"}},
        },
    }
    port_url = free_port_url()
    auth.register_client(
        CLIENT_ID, CLIENT_SECRET, redirect_uris=[f"{port_url[1]}/oauth/callback"], scopes=["read"]
    )
    auth.register_client(
        ROBOT, redirect_uris=[], grant_types=[JWT_GRANT], scopes=[],
        token_endpoint_auth_method="none", public_key=ROBOT_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
        ).decode(),
    )
    serve = start_serve(
        tmp_path_factory.mktemp("connect-page"),
        providers,
        allowed_origins=[host.origin],
        port_url=port_url,
    )
    try:
        yield Env(serve, auth, host, api)
    finally:
        stop_serve(serve)
        host.stop()
        api.stop()
        auth.stop()


async def new_page(browser: Any, watch: ConsoleWatch, width: int = 800) -> Any:
    page = await browser.new_page(viewport={"width": width, "height": 700})
    watch.attach(page)
    # The test provider's consent page declares no icon: Chromium's /favicon.ico guess
    # would 404 there (a console error) when the popup stays open long enough.
    await page.context.route("**/favicon.ico", lambda route: route.fulfill(status=204))
    return page


def main_navigations(page: Any) -> list[str]:
    """URLs the main frame navigates to from now on."""
    seen: list[str] = []
    page.on("framenavigated", lambda f: seen.append(f.url) if f == page.main_frame else None)
    return seen


def workspace(group_id: str) -> str:
    return f"Team {group_id}"


async def confirm_and_open_popup(page: Any, card: Any, button: Any) -> Any:
    """Click ``button`` (Connect / Reconnect) in ``card``, confirm the workspace it names
    (the page came from a link), and return the sign-in popup that opens."""
    await button.click()
    box = card.get_by_role("group", name="Confirm workspace")
    group_id = await page.evaluate("document.getElementById('workspace').textContent")
    assert group_id.startswith("Workspace: Team ")
    name = group_id.removeprefix("Workspace: ").split(" — ")[0]
    assert f"to the workspace “{name}”?" in await box.inner_text()
    async with page.expect_popup() as info:
        await box.get_by_role("button", name=f"Connect to {name}").click()
    return await info.value


async def sign_in_through_popup(
    page: Any, watch: ConsoleWatch, card: Any, button: Any, username: str
) -> Any:
    """Click ``button``, confirm, sign in at the provider in the popup, wait for it to
    close."""
    popup = await confirm_and_open_popup(page, card, button)
    watch.attach(popup)
    await popup.locator("#username").fill(username)
    async with popup.expect_event("close"):
        await popup.locator("#allow").click()
    return popup


async def test_apikey_connects_through_the_form_after_a_field_error_is_corrected(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    await page.goto(env.session_url("team-1", "exampleai"))
    card = page.locator('[data-integration="exampleai"]')
    await card.wait_for()
    await screenshot(page, "connect-not-connected")
    field = card.get_by_label("API key")
    assert await field.get_attribute("type") == "password"
    await field.fill("sk-short")
    await card.get_by_role("button", name="Connect").click()
    error = card.locator(".field-error")
    await error.filter(has_text="does not look right").wait_for()
    assert await field.get_attribute("aria-invalid") == "true"
    await screenshot(page, "connect-field-error")
    await field.fill(KEY)
    await card.get_by_role("button", name="Connect").click()
    # Opened from a link: nothing is stored before the person confirms the workspace.
    box = card.get_by_role("group", name="Confirm workspace")
    assert "Connect Example AI to the workspace “Team team-1”?" in await box.inner_text()
    assert await page.locator("#workspace").inner_text() == (
        "Workspace: Team team-1 — you opened this page from a link: check that this is your "
        "workspace before connecting anything."
    )
    assert env.credentials("team-1", "exampleai").status_code == 404
    await screenshot(page, "connect-confirm-workspace")
    await box.get_by_role("button", name="Connect to Team team-1").click()
    await page.locator('[data-integration="exampleai"][data-status="connected"]').wait_for()
    connected = page.locator('[data-integration="exampleai"]')
    text = await connected.inner_text()
    assert "Connected" in text
    assert "…WXYZ" in text and KEY not in await page.content()
    await screenshot(page, "connect-connected")
    r = env.credentials("team-1", "exampleai")
    assert r.json() == {"credentials": {"api_key": KEY}}


@pytest.mark.parametrize(
    ("name", "kind", "user", "secret", "password"),
    [
        ("basicco", "Basic", "Account name", "Account password", "basic-password-0123"),
        ("twostep", "Token exchange", "Login", "Login password", "login-password-0123"),
    ],
)
async def test_basic_and_token_exchange_connect_through_their_forms(
    browser: Any, console: ConsoleWatch, env: Env,  # noqa: F811
    name: str, kind: str, user: str, secret: str, password: str,
) -> None:
    group = f"team-{name}"
    console.expect_http(422)  # the refused credential, on purpose
    page = await new_page(browser, console)
    await page.goto(env.session_url(group, name))
    card = page.locator(f'[data-integration="{name}"]')
    await card.wait_for()
    assert kind in await card.inner_text()
    await card.get_by_label(user, exact=True).fill("ada")
    field = card.get_by_label(secret, exact=True)
    assert await field.get_attribute("type") == "password"
    await field.fill("not-the-password")
    await card.get_by_role("button", name="Connect").click()
    await card.get_by_role("group", name="Confirm workspace").get_by_role(
        "button", name=f"Connect to Team {group}").click()
    # The provider refuses: the page says so and nothing is stored.
    await card.locator(".error, .field-error, [role=alert]").filter(
        has_text="did not accept").first.wait_for()
    assert env.credentials(group, name).status_code == 404
    await field.fill(password)
    await card.get_by_role("button", name="Connect").click()
    await card.get_by_role("group", name="Confirm workspace").get_by_role(
        "button", name=f"Connect to Team {group}").click()
    await page.locator(f'[data-integration="{name}"][data-status="connected"]').wait_for()
    assert password not in await page.content()
    got = env.credentials(group, name).json()["credentials"]
    if name == "basicco":
        assert (got["username"], got["password"]) == ("ada", password)
    else:
        assert got["access_token"].startswith("sess-") and password not in json.dumps(got)


async def test_a_service_account_key_file_is_pasted_into_a_text_area(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    key_file = json.dumps({"client_email": ROBOT, "private_key": ROBOT_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()}, indent=2)
    console.expect_http(422)  # the pasted text that is not JSON, on purpose
    page = await new_page(browser, console)
    await page.goto(env.session_url("team-robot", "robot"))
    card = page.locator('[data-integration="robot"]')
    await card.wait_for()
    area = card.get_by_label("Key file")
    assert await area.evaluate("e => e.tagName") == "TEXTAREA"
    await area.fill("not json")
    await card.get_by_role("button", name="Connect").click()
    await card.get_by_role("group", name="Confirm workspace").get_by_role(
        "button", name="Connect to Team team-robot").click()
    await card.locator(".field-error").filter(has_text="JSON object").wait_for()
    await area.fill(key_file)  # a real key file: several lines
    await card.get_by_role("button", name="Connect").click()
    await card.get_by_role("group", name="Confirm workspace").get_by_role(
        "button", name="Connect to Team team-robot").click()
    await page.locator('[data-integration="robot"][data-status="connected"]').wait_for()
    assert "PRIVATE KEY" not in await page.content()
    got = env.credentials("team-robot", "robot").json()["credentials"]
    assert got["access_token"] and "key_file" not in got


async def test_oauth2_connects_through_a_popup_sized_by_the_integration(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    await page.goto(env.session_url("g-oauth", "acme"))
    card = page.locator('[data-integration="acme"]')
    await card.wait_for()
    navigations = main_navigations(page)
    await page.evaluate("window.stillHere = true")

    popup = await confirm_and_open_popup(page, card, card.get_by_role("button", name="Connect"))
    console.attach(popup)
    await popup.locator("#username").wait_for()
    assert popup.url.startswith(env.auth.authorize_endpoint + "?")
    size = await popup.evaluate("[outerWidth, outerHeight]")  # headless: no window chrome
    assert size == [POPUP["width"], POPUP["height"]], size
    await popup.locator("#username").fill("alice")
    async with popup.expect_event("close"):  # the result page closes its own window
        await popup.locator("#allow").click()

    await page.locator('[data-integration="acme"][data-status="connected"]').wait_for()
    assert await page.locator("#status").inner_text() == "Acme is connected."
    assert navigations == [] and await page.evaluate("window.stillHere") is True
    await screenshot(page, "connect-oauth-connected")
    r = env.credentials("g-oauth", "acme")
    assert r.status_code == 200 and r.json()["credentials"]["access_token"]


async def test_the_result_arrives_when_the_provider_severs_the_opener(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    """Providers that send Cross-Origin-Opener-Policy cut the popup off from the page (it
    then reads as closed): the result comes on the broker's BroadcastChannel instead."""
    page = await new_page(browser, console)
    await page.goto(env.session_url("g-coop", "coopco"))
    card = page.locator('[data-integration="coopco"]')
    popup = await confirm_and_open_popup(page, card, card.get_by_role("button", name="Connect"))
    console.attach(popup)
    await popup.locator("#username").wait_for()
    assert await popup.evaluate("window.opener === null")  # severed
    await popup.locator("#username").fill("erin")
    await popup.locator("#allow").click()
    await page.locator('[data-integration="coopco"][data-status="connected"]').wait_for()
    assert await page.locator("#status").inner_text() == "Coop Co is connected."
    assert env.credentials("g-coop", "coopco").status_code == 200


async def test_a_revoked_grant_needs_reauth_and_reconnects(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    await page.goto(env.session_url("g-reauth", "acme"))
    card = page.locator('[data-integration="acme"]')
    await sign_in_through_popup(
        page, console, card, card.get_by_role("button", name="Connect"), "bob"
    )
    await page.locator('[data-integration="acme"][data-status="connected"]').wait_for()

    assert env.auth.revoke_user_grants("bob") >= 1
    r = env.credentials("g-reauth", "acme", force_refresh="true")
    assert r.status_code == 409, r.text

    await page.reload()
    await page.locator('[data-integration="acme"][data-status="reauth_required"]').wait_for()
    assert await card.locator(".badge").inner_text() == "Needs reauth"
    reconnect = card.get_by_role("button", name="Reconnect")
    await reconnect.wait_for()
    await screenshot(page, "connect-needs-reauth")

    await sign_in_through_popup(page, console, card, reconnect, "bob")
    await page.locator('[data-integration="acme"][data-status="connected"]').wait_for()
    assert env.credentials("g-reauth", "acme").status_code == 200


async def test_disconnect_asks_for_confirmation(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    with env.serve.service() as c:
        r = c.post("/groups/g-disconnect/integrations/custom/exampleai", json={"api_key": KEY})
        assert r.status_code == 200, r.text
    page = await new_page(browser, console)
    await page.goto(env.session_url("g-disconnect", "exampleai"))
    card = page.locator('[data-integration="exampleai"][data-status="connected"]')
    await card.wait_for()
    confirm = card.get_by_role("group", name="Confirm disconnect")

    await card.get_by_role("button", name="Disconnect").click()
    await confirm.wait_for()
    await card.get_by_role("button", name="Cancel").click()
    await confirm.wait_for(state="hidden")
    await card.get_by_role("button", name="Disconnect").wait_for()
    assert env.credentials("g-disconnect", "exampleai").status_code == 200

    await card.get_by_role("button", name="Disconnect").click()
    await card.get_by_role("button", name="Yes, disconnect").click()
    await page.locator('[data-integration="exampleai"][data-status="not_connected"]').wait_for()
    assert await page.locator("#status").inner_text() == "Example AI is disconnected."
    assert env.credentials("g-disconnect", "exampleai").status_code == 404


async def test_an_unknown_or_expired_session_shows_only_a_message(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    console.expect_http(401)
    page = await new_page(browser, console)

    async def shows_only(message: str) -> None:
        error = page.locator("#session-error")
        await error.wait_for()
        assert message in await error.inner_text()
        assert await page.locator(".card, form, input, button").count() == 0
        assert await page.locator("#workspace").is_hidden()

    unknown = "bcs_" + secrets.token_urlsafe(32)
    await page.goto(f"{env.serve.url}/connect#session={unknown}")
    await shows_only("This link is not valid.")
    assert page.url == f"{env.serve.url}/connect"  # the token left the address bar

    url = env.session_url("g-expired")
    with sqlite3.connect(env.serve.database) as db:
        db.execute(
            "UPDATE connect_sessions SET expires_at = '2000-01-01 00:00:00.000000' "
            "WHERE group_id = 'g-expired'"
        )
    page = await new_page(browser, console)  # a fresh tab: nothing remembered
    await page.goto(url)
    await shows_only("This link has expired.")
    await screenshot(page, "connect-session-expired")


async def test_closing_the_popup_midway_says_so_and_stores_nothing(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    await page.goto(env.session_url("g-closed", "acme"))
    card = page.locator('[data-integration="acme"]')
    popup = await confirm_and_open_popup(page, card, card.get_by_role("button", name="Connect"))
    console.attach(popup)
    await popup.locator("#username").wait_for()
    await popup.close()
    status = page.locator("#status.error")
    await status.filter(has_text="was closed before it finished").wait_for()
    assert "Acme" in await status.inner_text()
    assert await card.get_attribute("data-status") == "not_connected"
    assert env.credentials("g-closed", "acme").status_code == 404


async def test_a_second_click_reuses_the_sign_in_window(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    await page.goto(env.session_url("g-twice", "acme"))
    card = page.locator('[data-integration="acme"]')
    button = card.get_by_role("button", name="Connect")
    popup = await confirm_and_open_popup(page, card, button)
    console.attach(popup)
    await popup.locator("#username").wait_for()
    await button.click()  # e.g. the window got lost behind this one
    async with popup.expect_event("load"):
        await card.get_by_role("button", name="Connect to Team g-twice").click()
    await popup.locator("#username").fill("dave")
    async with popup.expect_event("close"):
        await popup.locator("#allow").click()
    await page.locator('[data-integration="acme"][data-status="connected"]').wait_for()
    await asyncio.sleep(1.0)  # longer than the closed-window check takes
    assert await page.locator("#status").inner_text() == "Acme is connected."
    assert env.credentials("g-twice", "acme").status_code == 200


async def test_per_connection_settings_are_checked_before_the_popup(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    popups: list[Any] = []
    page.on("popup", lambda p: popups.append(p))
    await page.goto(env.session_url("g-tenant", "tenantco"))
    card = page.locator('[data-integration="tenantco"]')
    tenant = card.get_by_label("Tenant", exact=True)
    await tenant.fill("Not Valid!")
    await card.get_by_role("button", name="Connect").click()
    await card.locator(".field-error").filter(has_text="Tenant does not look right").wait_for()
    assert await tenant.get_attribute("aria-invalid") == "true"
    await asyncio.sleep(0.3)
    assert popups == []

    await tenant.fill("contoso")
    popup = await confirm_and_open_popup(page, card, card.get_by_role("button", name="Connect"))
    console.attach(popup)
    await popup.locator("#username").wait_for()
    assert "tenant=contoso" in popup.url
    await popup.locator("#username").fill("carol")
    async with popup.expect_event("close"):
        await popup.locator("#allow").click()
    await page.locator('[data-integration="tenantco"][data-status="connected"]').wait_for()
    assert env.credentials("g-tenant", "tenantco").status_code == 200


async def test_an_embedding_host_hands_over_the_session_and_hears_of_each_connection(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{env.serve.url}/connect")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    ancestors = [d for d in csp.split(";") if d.strip().startswith("frame-ancestors")]
    assert ancestors == [f" frame-ancestors {env.host.origin}"], csp
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"

    page = await new_page(browser, console)
    await page.goto(env.embed_url("g-embed", "exampleai"))
    frame = page.frame_locator("#broker")
    card = frame.locator('[data-integration="exampleai"]')
    await card.get_by_label("API key").fill(KEY)
    # The host app vouched for the workspace: no confirmation, connected at once.
    await card.get_by_role("button", name="Connect").click()
    await frame.locator('[data-integration="exampleai"][data-status="connected"]').wait_for()
    assert await frame.locator("body").get_attribute("data-mode") == "host"
    assert await frame.locator("#workspace").inner_text() == "Workspace: Team g-embed"
    await page.wait_for_function("window.received.length > 0")
    received = await page.evaluate("window.received")
    assert received == [
        {
            "origin": env.serve.url,
            "data": {"type": "broker:connect", "integration": "exampleai", "status": "connected"},
        }
    ]


async def test_a_host_app_opens_the_sign_in_popup_itself(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    """The host's backend gets a ticket (service token); its frontend opens the popup on
    the broker's start page and hands the ticket over when the page asks."""
    with env.serve.service() as c:
        r = c.post("/groups/g-host-popup/integrations/acme/authorize", json={})
        assert r.status_code == 201, r.text
        ticket = r.json()["ticket"]
        assert r.json()["start_url"] == f"{env.serve.url}/oauth/start"
    page = await new_page(browser, console)
    await page.goto(
        f"{env.host.origin}/sign-in?broker={quote(env.serve.url)}&ticket={quote(ticket)}"
    )
    async with page.expect_popup() as info:
        await page.locator("#connect").click()
    popup = await info.value
    console.attach(popup)
    await popup.locator("#username").wait_for()
    assert popup.url.startswith(env.auth.authorize_endpoint + "?")
    assert ticket not in popup.url
    await popup.locator("#username").fill("hana")
    async with popup.expect_event("close"):
        await popup.locator("#allow").click()
    await page.wait_for_function("window.results.length > 0")
    assert await page.evaluate("window.results") == [
        {"type": "broker:oauth", "integration": "acme", "status": "connected", "error": None}
    ]
    assert env.credentials("g-host-popup", "acme").status_code == 200


async def test_a_blocked_popup_runs_the_sign_in_in_the_page_and_comes_back(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    # What a popup blocker does to the page: window.open gives nothing.
    await page.add_init_script("window.open = function () { return null; };")
    await page.goto(env.session_url("g-blocked", "acme"))
    card = page.locator('[data-integration="acme"]')
    await card.get_by_role("button", name="Connect").click()
    await card.get_by_role("button", name="Connect to Team g-blocked").click()
    await page.locator("#username").wait_for()  # the provider, in this window
    assert page.url.startswith(env.auth.authorize_endpoint + "?")
    await page.locator("#username").fill("ivan")
    await page.locator("#allow").click()
    back = page.get_by_role("link", name="Go back")
    await back.wait_for()
    assert env.credentials("g-blocked", "acme").status_code == 200
    await back.click()
    # Back on the connect page, with the same session (kept for this tab), connected.
    await page.locator('[data-integration="acme"][data-status="connected"]').wait_for()
    assert page.url == f"{env.serve.url}/connect"


FORGED = '({type: "broker:oauth", integration: "acme", status: "connected"})'


async def test_the_page_ignores_results_posted_by_other_origins(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console)
    lists: list[str] = []
    page.context.on(  # the page's and its popups' requests
        "request",
        lambda r: lists.append(r.url) if r.url.endswith("/groups/g-forged/integrations") else None,
    )
    url = env.session_url("g-forged", "acme")
    await page.goto(env.embed_url("g-forged", "acme"))
    frame = page.frame_locator("#broker")
    card = frame.locator('[data-integration="acme"]')
    await card.and_(frame.locator('[data-status="not_connected"]')).wait_for()
    broker_frame = next(f for f in page.frames if f.url.startswith(env.serve.url))
    # A sign-in window is open: a forged result now would be believed if it counted.
    async with page.expect_popup() as info:
        await card.get_by_role("button", name="Connect").click()
    signin = await info.value
    console.attach(signin)
    await signin.locator("#username").wait_for()  # the start page's asking is over
    await broker_frame.evaluate(
        "window.seen = []; addEventListener('message', e => window.seen.push(e.origin))"
    )
    waiting = await broker_frame.locator("#status").inner_text()
    assert waiting.startswith("Finish signing in to Acme")

    # The host (an allowed origin, but not the broker's) and a sandboxed frame ("null").
    await page.evaluate(f"frames[0].postMessage({FORGED}, '*')")
    sender = page.frame(name="sender")
    assert sender is not None
    await sender.evaluate(f"parent.frames[0].postMessage({FORGED}, '*')")
    await broker_frame.wait_for_function("window.seen.length === 2")
    assert sorted(await broker_frame.evaluate("window.seen")) == sorted(
        [env.host.origin, "null"]
    )

    # The same from a host that opened the page as a popup.
    async with page.expect_popup() as info:
        await page.evaluate(f"window.opened = window.open({url!r}, 'broker', 'popup')")
    popup = await info.value
    console.attach(popup)
    await popup.locator('[data-integration="acme"]').wait_for()
    await popup.evaluate(
        "window.seen = []; addEventListener('message', e => window.seen.push(e.origin))"
    )
    await page.evaluate(f"window.opened.postMessage({FORGED}, '*')")
    await popup.wait_for_function("window.seen.length === 1")

    await asyncio.sleep(0.3)
    assert len(lists) == 2  # the iframe's first load and the popup's: nothing reloaded
    assert await broker_frame.locator("#status").inner_text() == waiting
    assert await popup.locator("#status").is_hidden()

    # A result on the broker's own channel for a window the page never opened (another
    # tab's flow, maybe another group's) is not its to announce (it only refreshes).
    async with page.expect_popup() as info:
        await page.evaluate(f"window.open('{env.serve.url}/healthz', 'other')")
    other = await info.value
    await other.wait_for_load_state()
    await other.evaluate(f"new BroadcastChannel('broker:oauth').postMessage({FORGED})")
    await popup.wait_for_function("window.seen.length === 1")
    await asyncio.sleep(0.4)
    assert await popup.locator("#status").is_hidden()

    for target in (broker_frame, popup):
        status = await target.locator('[data-integration="acme"]').get_attribute("data-status")
        assert status == "not_connected"
    assert await page.evaluate("window.received") == []
    assert env.credentials("g-forged", "acme").status_code == 404


async def test_small_screens_and_keyboard_only(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    page = await new_page(browser, console, width=360)
    await page.goto(env.session_url("g-small", "acme", "exampleai", "tenantco"))
    await page.locator("body[data-loaded]").wait_for()
    assert await page.locator(".card").count() == 3
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    await screenshot(page, "connect-360")

    for input_id in await page.locator("input").evaluate_all("els => els.map(e => e.id)"):
        label = await page.locator(f'label[for="{input_id}"]').inner_text()
        assert await page.get_by_label(label.removesuffix(" (optional)"), exact=True).evaluate(
            "e => e.id"
        ) == input_id

    field_id = "field-exampleai-api_key"
    for _ in range(20):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.id") == field_id:
            break
    else:
        pytest.fail("Tab never reached the API key field")
    await page.keyboard.type(KEY)
    await page.keyboard.press("Enter")
    # The confirmation takes the focus: Enter again confirms the workspace it names.
    assert await page.evaluate("document.activeElement.textContent") == "Connect to Team g-small"
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    await page.keyboard.press("Enter")
    await page.locator('[data-integration="exampleai"][data-status="connected"]').wait_for()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    assert env.credentials("g-small", "exampleai").json() == {"credentials": {"api_key": KEY}}


async def test_no_secret_reaches_the_page(
    browser: Any, console: ConsoleWatch, env: Env  # noqa: F811
) -> None:
    # Letters that are not hex digits: a hex key could share 5 characters with a colour
    # in the page's CSS (seen once: "4a72c"), which the check below would take for a leak.
    key = "sk-" + "".join(secrets.choice("GHJKLMNPQRSTUVWXYZ") for _ in range(32))
    page = await new_page(browser, console)
    bodies: list[asyncio.Task[bytes]] = []

    def record(response: Any) -> None:
        if not 300 <= response.status < 400:  # a redirect has no body to read
            bodies.append(asyncio.ensure_future(response.body()))

    page.on("response", record)
    await page.goto(env.session_url("g-secret", "exampleai"))
    card = page.locator('[data-integration="exampleai"]')
    await card.get_by_label("API key").fill(key)
    await card.get_by_role("button", name="Connect").click()
    await card.get_by_role("button", name="Connect to Team g-secret").click()
    await page.locator('[data-integration="exampleai"][data-status="connected"]').wait_for()
    texts = [await page.content()]
    await asyncio.gather(*bodies)  # before the reload discards them
    await page.reload()
    await page.locator('[data-integration="exampleai"][data-status="connected"]').wait_for()
    assert "…" + key[-4:] in await card.inner_text()

    texts.append(await page.content())
    texts += [b.decode("utf-8", "replace") for b in await asyncio.gather(*bodies)]
    assert len(bodies) >= 9  # page, css, js, list; the POST and list; page, css, js, list
    # No 5 consecutive characters of the key anywhere: at most its last 4.
    windows = {key[i : i + 5] for i in range(len(key) - 4)}
    leaks = [(w, t[:80]) for t in texts for w in windows if w in t]
    assert leaks == []
