"""auth_type ``token_exchange`` end to end against the test API server, whose
``POST /open/login`` trades a user and a secret for a session token that its ``/session``
routes check (``X-Session-Token``), as two-step providers do: connect, what a node gets,
ctx.client and the proxy, the exchange repeated when the token stops working or nears
expiry, and every refusal storing nothing. The pure parts: reading the answer by path,
building the request, the schema's rules, classifying failures."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.auth.token_exchange import TokenExchangeProvider, classify
from broker.catalog import parse_provider
from broker.errors import IntegrationNeedsReauth
from broker.nodes import ExecutionContext
from broker.oauth.decisions import Outcome
from tests import oauth_support
from tests.apiserver import ApiServer

live_factory = oauth_support.live_factory

USER, SECRET = "ada", "correct horse battery staple"


def two_step(apiserver: ApiServer, **extra: Any) -> dict[str, Any]:
    return {
        "display_name": "Two-step",
        "auth_type": "token_exchange",
        "fields": {
            "user": {"title": "User name", "secret": False},
            "secret": {"title": "Password"},
        },
        "token_url": f"{apiserver.url}/open/login",
        "token_body": {"user": "{user}", "secret": "{secret}"},
        "token_path": "data.token",
        "expires_in_path": "expiresIn",
        "apply": {"headers": {"X-Session-Token": "{access_token}"}},
        "api": {"base_url": f"{apiserver.url}/session"},
        **extra,
    }


def logins(apiserver: ApiServer) -> int:
    return sum(1 for r in apiserver.requests if r.path == "/open/login")


async def test_connects_by_exchange_and_calls_the_api_both_ways(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    apiserver.config.login_users = {USER: SECRET}
    async with live_factory(extra_providers={"twostep": two_step(apiserver)}) as live:
        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}["twostep"]
        assert (listed["auth_type"], listed["connect"]) == ("token_exchange", "form")
        assert set(listed["fields"]) == {"user", "secret"}

        r = await live.service.post("/groups/g1/integrations/custom/twostep",
                                    json={"user": USER, "secret": SECRET})
        assert r.status_code == 200, r.text
        assert logins(apiserver) == 1

        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("twostep")
        # The node gets the token and the non-secret field, never the password.
        assert got["access_token"] in apiserver.config.sessions
        assert got["user"] == USER and SECRET not in repr(got) and "fields" not in got
        async with ctx.client("twostep") as api:
            r = await api.get("/echo")
        assert r.status_code == 200 and r.json()["principal"] == USER
        r = await live.service.get("/groups/g1/integrations/twostep/proxy/echo")
        assert r.status_code == 200 and r.json()["principal"] == USER

        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}["twostep"]
        assert listed["status"] == "connected" and listed["hint"]["user"] == USER
        assert SECRET not in r.text

        # The provider forgets the session: the API's 401 makes the broker exchange
        # again, once, and the call goes through.
        apiserver.config.sessions.clear()
        r = await live.service.get("/groups/g1/integrations/twostep/proxy/echo")
        assert r.status_code == 200 and r.json()["principal"] == USER
        assert logins(apiserver) == 2

        # Near expiry the exchange is repeated too (a forced refresh stands for the sweep).
        before = (await ctx.custom_integration("twostep"))["access_token"]
        again = await live.broker.credentials("g1", "twostep", force_refresh=True)
        assert again["access_token"] != before and logins(apiserver) == 3

        # The user's password changes at the provider: the next exchange is refused and
        # the connection needs reconnecting.
        apiserver.config.login_users = {USER: "a new password"}
        with pytest.raises(IntegrationNeedsReauth):
            await live.broker.credentials("g1", "twostep", force_refresh=True)
        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}["twostep"]
        assert listed["status"] == "reauth_required"


async def test_a_form_exchange_and_the_default_bearer(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    apiserver.config.login_users = {USER: SECRET}
    spec = two_step(apiserver, token_request_format="form",
                    api={"base_url": f"{apiserver.url}/open"})
    del spec["apply"]
    async with live_factory(extra_providers={"twostep": spec}) as live:
        r = await live.service.post("/groups/g1/integrations/custom/twostep",
                                    json={"user": USER, "secret": SECRET})
        assert r.status_code == 200, r.text
        r = await live.service.get("/groups/g1/integrations/twostep/proxy/echo")
        token = (await live.broker.credentials("g1", "twostep"))["access_token"]
        assert r.json()["headers"]["authorization"] == f"Bearer {token}"


@pytest.mark.parametrize(
    ("config", "status", "code"),
    [
        ({"login_users": {USER: "other"}}, 422, "credential_rejected"),
        ({"login_users": {USER: SECRET}, "login_status": 503}, 502, "provider_unreachable"),
    ],
)
async def test_a_refused_or_failed_exchange_stores_nothing(
    live_factory: Callable[..., Any], apiserver: ApiServer,
    config: dict[str, Any], status: int, code: str,
) -> None:
    for key, value in config.items():
        setattr(apiserver.config, key, value)
    async with live_factory(extra_providers={"twostep": two_step(apiserver)}) as live:
        r = await live.service.post("/groups/g1/integrations/custom/twostep",
                                    json={"user": USER, "secret": SECRET})
        assert r.status_code == status and r.json()["error"]["code"] == code
        assert SECRET not in r.text
        async with live.broker.session() as db:
            assert await live.broker.repository.get(db, "g1", "twostep") is None


async def test_an_answer_without_a_token_stores_nothing(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    apiserver.config.login_users = {USER: SECRET}
    spec = two_step(apiserver, token_path="data.missing")
    async with live_factory(extra_providers={"twostep": spec}) as live:
        r = await live.service.post("/groups/g1/integrations/custom/twostep",
                                    json={"user": USER, "secret": SECRET})
        assert r.status_code == 502 and "without a token" in r.json()["error"]["message"]
        async with live.broker.session() as db:
            assert await live.broker.repository.get(db, "g1", "twostep") is None


# ---------------------------------------------------------------- pure parts


def _spec(**data: Any) -> TokenExchangeProvider:
    base = {
        "name": "t", "display_name": "T", "auth_type": "token_exchange",
        "fields": {"user": {"title": "U", "secret": False}, "secret": {"title": "S"}},
        "token_url": "https://login.example.com/token",
        "token_body": {"user": "{user}", "secret": "{secret}"},
    }
    spec = parse_provider({**base, **data})
    assert isinstance(spec, TokenExchangeProvider)
    return spec


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_answer_is_read_by_path() -> None:
    spec = _spec(token_path="result.0.jwt", expires_in_path="result.0.ttl",
                 extra_fields={"account": "result.0.account"})
    got = spec.read({"result": [{"jwt": "t1", "ttl": 600, "account": "acc-1"}]},
                    now=NOW, old={"settings": {"user": "u"}})
    assert got["access_token"] == "t1" and got["lifetime"] == 600
    assert got["extra"] == {"account": "acc-1"} and got["settings"] == {"user": "u"}
    # No lifetime in the answer: the default; a renewal keeps what the old one had.
    got = spec.read({"result": [{"jwt": "t2"}]}, now=NOW,
                    old={"extra": {"account": "acc-1"}})
    assert got["lifetime"] == 3600 and got["extra"] == {"account": "acc-1"}
    for answer in ({}, {"result": []}, {"result": [{"jwt": ""}]}, {"result": [{"jwt": 5}]}):
        with pytest.raises(ValueError):
            spec.read(answer, now=NOW, old={})


def test_the_request_is_built_from_the_fields() -> None:
    spec = _spec(token_headers={"X-User": "{user}"})
    request = spec.request({"user": "ada", "secret": "s3"})
    assert request.method == "POST" and str(request.url) == "https://login.example.com/token"
    assert request.headers["x-user"] == "ada"
    assert request.headers["content-type"] == "application/json"
    assert request.content == b'{"user":"ada","secret":"s3"}'
    form = _spec(token_request_format="form").request({"user": "ada", "secret": "s&3"})
    assert form.content == b"user=ada&secret=s%263"


@pytest.mark.parametrize(
    "data",
    [
        {"token_url": "https://{secret}.example.com/token"},  # a secret in a URL
        {"token_url": "https://{user}.example.com/token"},  # a value without a pattern
        {"token_body": {"user": "{nobody}"}},
        {"token_headers": {"X-A": "{nobody}"}},
        {"token_body": {}},
        {"verify": {"url": "https://login.example.com/me"}},
        {"apply": {"headers": {"X-Key": "{secret}"}}},  # a node never has the secret
    ],
)
def test_the_schema_refuses(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _spec(**data)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(None, Outcome.transient), (500, Outcome.transient), (503, Outcome.transient),
     (429, Outcome.transient), (408, Outcome.transient), (400, Outcome.reauth),
     (401, Outcome.reauth), (403, Outcome.reauth), (302, Outcome.operator)],
)
def test_failures_are_classified(status: int | None, outcome: Outcome) -> None:
    assert classify(status) == outcome
