"""auth_type ``oauth1`` (OAuth 1.0a) against an OAuth 1 provider built on Authlib's server
classes (tests/oauth1server.py), which verifies every signature: the popup flow
(temporary credentials, authorize, callback with the verifier, token credentials), what a
node gets (never a secret), calls signed by ctx.client and the proxy (form bodies
included), each signature method, a wrongly signed call refused, failures storing
nothing. The signing's pure parts without I/O."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.auth.oauth1 import OAuth1Provider
from broker.catalog import parse_provider
from broker.nodes import ExecutionContext
from tests import oauth_support
from tests.oauth1server import OAuth1Server
from tests.oauth_support import Live, page_data

live_factory = oauth_support.live_factory

KEY, SECRET = "consumer-key-1", "consumer-secret-1"


@pytest.fixture
def provider() -> AsyncIterator[OAuth1Server]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    server = OAuth1Server({KEY: SECRET, "rsa-consumer": public}).start()
    server.rsa_private = rsa_key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    yield server
    server.stop()


def trello_like(server: OAuth1Server, **extra: Any) -> dict[str, Any]:
    return {
        "display_name": "Boards",
        "auth_type": "oauth1",
        "request_token_url": f"{server.url}/oauth/request_token",
        "authorization_url": f"{server.url}/oauth/authorize",
        "access_token_url": f"{server.url}/oauth/access_token",
        "authorization_params": {"name": "Broker test", "scope": "read,write"},
        "client_id": KEY, "client_secret": SECRET,
        "api": {"base_url": f"{server.url}/api/me"},
        **extra,
    }


async def connect(live: Live, name: str = "boards") -> dict[str, Any]:
    async with live.browser() as browser:
        r = await live.authorize(browser, integration=name)
        assert r.status_code == 200, r.text
        location = r.json()["location"]
        approved = await browser.get(location)  # the provider approves at once
        assert approved.status_code == 302, approved.text
        page = await browser.get(approved.headers["location"])
    return dict(page_data(page)["message"])


async def stored(live: Live, name: str = "boards") -> Any:
    async with live.broker.session() as db:
        return await live.broker.repository.get(db, "g1", name)


@pytest.mark.parametrize("method", ["HMAC-SHA1", "HMAC-SHA256", "PLAINTEXT", "RSA-SHA1"])
async def test_oauth1_connects_and_every_call_is_signed_by_the_broker(
    live_factory: Callable[..., Any], provider: OAuth1Server, method: str,
) -> None:
    extra: dict[str, Any] = {"signature_method": method}
    if method == "RSA-SHA1":
        extra.update(client_id="rsa-consumer", client_secret=None,
                     rsa_private_key=provider.rsa_private)  # type: ignore[attr-defined]
    async with live_factory(extra_providers={"boards": trello_like(provider, **extra)}) as live:
        message = await connect(live)
        assert message["status"] == "connected", message
        assert provider.requests["request_token"] == provider.requests["access_token"] == 1

        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("boards")
        assert got["signed_by_broker"] is True
        assert got["access_token"].startswith("tok-") and "token_secret" not in got
        row = await stored(live)
        assert row.data["token_secret"] not in json.dumps(got) and SECRET not in json.dumps(got)

        async with ctx.client("boards") as api:
            r = await api.get("/boards", params={"filter": "open"})
            assert r.status_code == 200 and r.json()["user"] == "ada", r.text
            r = await api.post("/cards", data={"name": "a card", "pos": "top"})
            assert r.status_code == 200 and r.json()["form"] == {"name": "a card", "pos": "top"}
        r = await live.service.get("/groups/g1/integrations/boards/proxy/boards?x=1")
        assert r.status_code == 200 and r.json()["user"] == "ada", r.text
        r = await live.service.post("/groups/g1/integrations/boards/proxy/cards",
                                    data={"name": "b"})
        assert r.status_code == 200 and r.json()["form"] == {"name": "b"}, r.text
        assert provider.refused == 0


async def test_a_call_signed_with_the_wrong_secret_is_refused_by_the_provider(
    live_factory: Callable[..., Any], provider: OAuth1Server,
) -> None:
    async with live_factory(extra_providers={"boards": trello_like(provider)}) as live:
        assert (await connect(live))["status"] == "connected"
        row = await stored(live)
        spec = trello_like(provider, name="boards", client_secret="not-the-secret")
        wrong = parse_provider(spec)
        assert isinstance(wrong, OAuth1Provider)
        request = httpx.Request("GET", f"{provider.url}/api/me")
        wrong.signer(row.data["access_token"], row.data["token_secret"]).sign_request(request)
        async with httpx.AsyncClient() as http:
            r = await http.send(request)
        assert r.status_code == 401 and provider.refused == 1


@pytest.mark.parametrize("broken", ["request_token", "callback_token", "access_token"])
async def test_a_flow_that_fails_stores_nothing(
    live_factory: Callable[..., Any], provider: OAuth1Server, broken: str,
) -> None:
    spec = trello_like(provider)
    if broken == "request_token":
        spec["client_secret"] = "wrong"  # the provider refuses the temporary credentials
    async with live_factory(extra_providers={"boards": spec}) as live:
        async with live.browser() as browser:
            r = await live.authorize(browser, integration="boards")
            if broken == "request_token":
                assert r.status_code in (400, 502), r.text
                assert await stored(live) is None
                return
            approved = await browser.get(r.json()["location"])
            callback = httpx.URL(approved.headers["location"])
            if broken == "callback_token":  # a token other than the flow's own
                callback = callback.copy_set_param("oauth_token", "temp-forged")
            else:  # the provider forgot the temporary credential
                provider.state.temporary.clear()
            page = await browser.get(callback)
        message = page_data(page)["message"]
        assert message["status"] == "error", message
        assert await stored(live) is None


def test_the_schema_wants_the_operators_consumer_credentials() -> None:
    base = {"name": "b", "display_name": "B", "auth_type": "oauth1",
            "request_token_url": "https://p.example/rt", "authorization_url": "https://p.example/a",
            "access_token_url": "https://p.example/at"}
    for data in ({}, {"client_id": "k"}, {"client_id": "k", "signature_method": "RSA-SHA1",
                                          "client_secret": "s"}):
        with pytest.raises(ValueError):
            parse_provider({**base, **data})
    assert isinstance(parse_provider({**base, "client_id": "k", "client_secret": "s"}),
                      OAuth1Provider)
