"""auth_type ``app_installation`` (GitHub Apps) against the test authorization server's
app-installation endpoints (tests/authserver/apps.py), which check the app JWT's signature
and times and issue one-hour installation tokens that the API server's ``/bearer`` routes
accept: install through the popup, what a node gets, ctx.client and the proxy, renewal by a
new app JWT, a spoofed installation id refused, an installation only requested refused,
nothing stored on any failure."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.auth.app_installation import AppInstallationProvider, classify
from broker.catalog import parse_provider
from broker.errors import InvalidInput
from broker.nodes import ExecutionContext
from broker.oauth.decisions import Outcome
from tests import oauth_support
from tests.apiserver import ApiServer
from tests.authserver import AuthServer
from tests.oauth_support import Live, page_data
from tests.support import pem, public_pem

live_factory = oauth_support.live_factory

APP, SECRET, SLUG = "Iv1.robotapp", "robot-app-secret", "robot-app"


@pytest.fixture(scope="module")
def app_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def robot(authserver: AuthServer, apiserver: ApiServer, key: Any, **extra: Any) -> dict[str, Any]:
    base = authserver.base_url
    return {
        "display_name": "Robot App",
        "auth_type": "app_installation",
        "install_url": base + "/apps/{app_slug}/installations/new",
        "app_slug": SLUG, "client_id": APP, "client_secret": SECRET, "private_key": pem(key),
        "connect_values": {"installation_id": {
            "from": "callback", "name": "installation_id", "pattern": "^[0-9]{1,20}$"}},
        "ownership": {"token_url": authserver.token_endpoint,
                      "check_url": base + "/user/installations", "list_path": "installations"},
        "token_url": base + "/app/installations/{installation_id}/access_tokens",
        "api": {"base_url": f"{apiserver.url}/bearer"},
        **extra,
    }


def register_app(live: Live, key: Any) -> None:
    live.server.register_client(
        APP, SECRET, redirect_uris=[f"{live.url}/oauth/callback"],
        grant_types=["authorization_code"], token_endpoint_auth_method="client_secret_post",
        require_pkce=False, public_key=public_pem(key),
    )
    live.server.config.app_slugs = {SLUG: APP}


async def install(live: Live) -> dict[str, Any]:
    """The popup: a ticket, the start page, the install page, the callback."""
    async with live.browser() as browser:
        r = await live.authorize(browser, integration="robot")
        assert r.status_code == 200, r.text
        location = r.json()["location"]
        assert location.startswith(f"{live.server.base_url}/apps/{SLUG}/installations/new?")
        callback = await browser.get(location)
        assert callback.status_code == 302
        page = await browser.get(callback.headers["location"])
    return dict(page_data(page)["message"])


def claims_of(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


async def stored(live: Live) -> Any:
    async with live.broker.session() as db:
        return await live.broker.repository.get(db, "g1", "robot")


async def test_an_installation_connects_calls_and_renews(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer,
    app_key: Any,
) -> None:
    spec = robot(authserver, apiserver, app_key)
    async with live_factory(extra_providers={"robot": spec}) as live:
        register_app(live, app_key)
        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}["robot"]
        assert (listed["connect"], listed["auth_title"]) == ("popup", "App installation")

        message = await install(live)
        assert message["status"] == "connected", message
        (jwt_sent,) = live.server.store.app_token_requests
        claims = claims_of(jwt_sent)
        now = datetime.now(UTC).timestamp()
        assert claims["iss"] == APP and set(claims) == {"iss", "iat", "exp"}
        assert now - 62 <= claims["iat"] <= now - 58 and claims["exp"] - claims["iat"] == 540

        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("robot")
        assert got["access_token"].startswith("ghs_") and got["installation_id"] == "1"
        assert 3500 < got["expires_at"] - now <= 3600  # from the answer's ISO expires_at
        assert SECRET not in json.dumps(got) and "PRIVATE" not in json.dumps(got)
        async with ctx.client("robot") as api:
            r = await api.get("/echo")
        assert r.json()["principal"] == "installation-1"
        r = await live.service.get("/groups/g1/integrations/robot/proxy/echo")
        assert r.json()["principal"] == "installation-1"
        r = await live.service.get("/groups/g1/integrations")
        assert {i["name"]: i for i in r.json()["integrations"]}["robot"]["hint"] == {
            "installation_id": "1"}

        # Renewal: a new app JWT, one for many callers; the new token works.
        renewed = await asyncio.gather(*(
            live.broker.credentials("g1", "robot", force_refresh=True) for _ in range(5)))
        tokens = {t["access_token"] for t in renewed}
        assert got["access_token"] not in tokens
        assert 2 <= len(live.server.store.app_token_requests) <= 6
        async with ctx.client("robot") as api:
            r = await api.get("/echo")
        assert r.json()["principal"] == "installation-1"


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        # Mallory reports alice's installation (id 1) with her own code: not hers.
        ({"install_user": "mallory", "install_id": 1}, "did not confirm"),
        # An installation requested, awaiting an owner's approval.
        ({"install_action": "request"}, "requested, not made"),
    ],
)
async def test_an_installation_not_the_users_stores_nothing(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer,
    app_key: Any, setup: dict[str, Any], says: str,
) -> None:
    spec = robot(authserver, apiserver, app_key)
    async with live_factory(extra_providers={"robot": spec}) as live:
        register_app(live, app_key)
        live.server.store.installations[1] = (APP, "alice")
        for key, value in setup.items():
            setattr(live.server.config, key, value)
        message = await install(live)
        assert message["status"] == "error" and says in message["error"], message
        assert live.server.store.app_token_requests == []
        assert await stored(live) is None


async def test_a_key_the_provider_does_not_know_stores_nothing(
    live_factory: Callable[..., Any], authserver: AuthServer, apiserver: ApiServer,
    app_key: Any,
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spec = robot(authserver, apiserver, other)  # the operator configured the wrong key
    async with live_factory(extra_providers={"robot": spec}) as live:
        register_app(live, app_key)
        message = await install(live)
        assert message["status"] == "error" and "did not issue a token" in message["error"]
        assert await stored(live) is None


# ---------------------------------------------------------------- pure parts


def _spec(**data: Any) -> AppInstallationProvider:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    base: dict[str, Any] = {
        "name": "gh", "display_name": "GH", "auth_type": "app_installation",
        "install_url": "https://github.example/apps/{app_slug}/installations/new",
        "app_slug": "my-app", "client_id": "Iv1.x", "private_key": pem(key),
        "connect_values": {"installation_id": {"from": "callback", "pattern": "^[0-9]+$"}},
        "token_url": "https://api.github.example/app/installations/{installation_id}/tokens",
    }
    spec = parse_provider({**base, **data})
    assert isinstance(spec, AppInstallationProvider)
    return spec


def test_the_install_url_carries_the_state_and_the_token_url_the_installation() -> None:
    spec = _spec()
    url = httpx.URL(spec.install("st&ate"))
    assert url.path == "/apps/my-app/installations/new" and url.params["state"] == "st&ate"
    now = datetime(2026, 1, 1, tzinfo=UTC)
    request = spec.token_request({"installation_id": "42"}, now)
    assert request.url.path == "/app/installations/42/tokens"
    claims = claims_of(request.headers["authorization"].removeprefix("Bearer "))
    assert claims == {"iss": "Iv1.x", "iat": int(now.timestamp()) - 60,
                      "exp": int(now.timestamp()) + 480}
    with pytest.raises(InvalidInput):  # a value its pattern refuses
        spec.token_request({"installation_id": "../42"}, now)
    got = spec.read({"token": "ghs_x", "expires_at": "2026-01-01T01:00:00Z"}, now=now, old={})
    assert got["lifetime"] == 3600


@pytest.mark.parametrize(
    "data",
    [
        {"private_key": None},
        {"app_slug": None},
        {"ownership": {"token_url": "https://x/t", "check_url": "https://x/c",
                       "list_path": "installations"}},  # ownership needs client_secret
        {"install_url": "https://github.example/apps/{client_id}/new"},
        {"token_url": "https://api.github.example/app/installations/{nobody}/tokens"},
        {"app_jwt": {"lifetime_seconds": 900}},
    ],
)
def test_the_schema_refuses(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _spec(**data)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(None, Outcome.transient), (503, Outcome.transient), (429, Outcome.transient),
     (401, Outcome.operator), (404, Outcome.reauth), (403, Outcome.reauth)],
)
def test_failures_are_classified(status: int | None, outcome: Outcome) -> None:
    assert classify(status, None) == outcome


def test_the_catalogs_github_app_file_asks_what_githubs_docs_ask(
    tmp_path: Any, app_key: Any,
) -> None:
    from broker.config import load_settings
    from tests.support import pem, yaml_text

    path = tmp_path / "config.yaml"
    path.write_text(yaml_text({
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}",
        "providers": {"github-app": {"app_slug": "acme-bot", "client_id": "Iv23.acme",
                                     "client_secret": "s", "private_key": pem(app_key)}},
    }))
    spec = load_settings(path, env={}).resolved_providers["github-app"]
    assert isinstance(spec, AppInstallationProvider)
    assert spec.install("xyz") == "https://github.com/apps/acme-bot/installations/new?state=xyz"
    now = datetime(2026, 1, 1, tzinfo=UTC)
    request = spec.token_request({"installation_id": "42"}, now)
    assert str(request.url) == "https://api.github.com/app/installations/42/access_tokens"
    assert request.headers["x-github-api-version"] == "2022-11-28"
    claims = claims_of(request.headers["authorization"].removeprefix("Bearer "))
    assert claims["iss"] == "Iv23.acme" and claims["exp"] - int(now.timestamp()) <= 600
    assert spec.ownership is not None
    assert spec.ownership.check_url.startswith("https://api.github.com/user/installations")
