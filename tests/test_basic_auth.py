"""auth_type ``basic`` end to end against the test API server, which checks
``Authorization: Basic`` as a provider does: connect (verified), the credential a node
gets, ctx.client and the proxy; a refused credential stores nothing."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from broker.auth.basic import BasicProvider, basic_authorization
from broker.catalog import parse_provider
from broker.errors import InvalidInput
from broker.nodes import ExecutionContext
from tests import oauth_support
from tests.apiserver import ApiServer

live_factory = oauth_support.live_factory

SID, TOKEN = "AC" + "0" * 32, "auth-token-0123456789"


def twilio_like(apiserver: ApiServer, **extra: Any) -> dict[str, Any]:
    return {
        "display_name": "Twilio-like",
        "auth_type": "basic",
        "fields": {
            "username": {"title": "Account SID", "secret": False, "pattern": "^AC[0-9a-f]{32}$"},
            "password": {"title": "Auth Token"},
        },
        "verify": {"url": f"{apiserver.url}/basic/status/200"},
        "api": {"base_url": f"{apiserver.url}/basic"},
        **extra,
    }


def freshdesk_like(apiserver: ApiServer) -> dict[str, Any]:
    return {
        "display_name": "Freshdesk-like",
        "auth_type": "basic",
        "fields": {"username": {"title": "API key"}},
        "password": "X",
        "verify": {"url": f"{apiserver.url}/basic/status/200"},
        "api": {"base_url": f"{apiserver.url}/basic"},
    }


def zendesk_like(apiserver: ApiServer) -> dict[str, Any]:
    return {
        "display_name": "Zendesk-like",
        "auth_type": "basic",
        "fields": {"email": {"title": "Email", "secret": False}, "api_token": {"title": "Token"}},
        "username": "{email}/token",
        "password": "{api_token}",
        "verify": {"url": f"{apiserver.url}/basic/status/200"},
        "api": {"base_url": f"{apiserver.url}/basic"},
    }


async def test_basic_connects_verified_and_calls_the_api_both_ways(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    apiserver.config.basic_users = {SID: TOKEN, "fd-key-0123456789": "X",
                                    "a@example.com/token": "zd-token"}
    async with live_factory(extra_providers={
        "twlike": twilio_like(apiserver), "fdlike": freshdesk_like(apiserver),
        "zdtoken": zendesk_like(apiserver),
    }) as live:
        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}
        assert listed["twlike"]["auth_type"] == "basic"
        assert set(listed["twlike"]["fields"]) == {"username", "password"}
        assert set(listed["fdlike"]["fields"]) == {"username"}

        r = await live.service.post("/groups/g1/integrations/custom/twlike",
                                    json={"username": SID, "password": TOKEN})
        assert r.status_code == 200, r.text
        r = await live.service.post("/groups/g1/integrations/custom/fdlike",
                                    json={"username": "fd-key-0123456789"})
        assert r.status_code == 200, r.text
        r = await live.service.post("/groups/g1/integrations/custom/zdtoken",
                                    json={"email": "a@example.com", "api_token": "zd-token"})
        assert r.status_code == 200, r.text
        assert [x.principal for x in apiserver.requests] == [
            SID, "fd-key-0123456789", "a@example.com/token"]

        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("twlike")
        assert got == {"username": SID, "password": TOKEN,
                       "authorization": basic_authorization(SID, TOKEN)}
        assert base64.b64decode(got["authorization"].split()[1]) == f"{SID}:{TOKEN}".encode()
        async with ctx.client("fdlike") as api:
            r = await api.get("/echo")
        assert r.status_code == 200 and r.json()["principal"] == "fd-key-0123456789"
        r = await live.service.get("/groups/g1/integrations/twlike/proxy/echo")
        assert r.status_code == 200 and r.json()["principal"] == SID
        r = await live.service.get("/groups/g1/integrations/zdtoken/proxy/echo")
        assert r.status_code == 200 and r.json()["principal"] == "a@example.com/token"


async def test_a_refused_basic_credential_stores_nothing(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    apiserver.config.basic_users = {SID: TOKEN}
    async with live_factory(extra_providers={
        "twlike": twilio_like(apiserver), "zdtoken": zendesk_like(apiserver),
    }) as live:
        r = await live.service.post("/groups/g1/integrations/custom/twlike",
                                    json={"username": SID, "password": "wrong"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "credential_rejected"
        assert "wrong" not in r.text
        r = await live.service.post("/groups/g1/integrations/custom/twlike",
                                    json={"username": "not-a-sid", "password": TOKEN})
        assert r.status_code == 422 and r.json()["error"]["field"] == "username"
        # A ':' in what becomes the user name would move the split: refused before sending.
        sent = len(apiserver.requests)
        r = await live.service.post("/groups/g1/integrations/custom/zdtoken",
                                    json={"email": "a:b@example.com", "api_token": "zd"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "email"
        assert len(apiserver.requests) == sent
        async with live.broker.session() as db:
            assert await live.broker.repository.get(db, "g1", "twlike") is None
            assert await live.broker.repository.get(db, "g1", "zdtoken") is None


def _spec(**data: Any) -> Any:
    return parse_provider({"name": "b", "display_name": "B", "auth_type": "basic", **data})


@pytest.mark.parametrize(
    "data",
    [
        {"fields": {"username": {"title": "U"}}},  # password defaults to a missing field
        {"fields": {"password": {"title": "P"}}},  # so does the user name
        {"fields": {"email": {"title": "E"}}, "username": "{email}/token", "password": "{key}"},
        {"fields": {"u": {"title": "U"}}, "username": "a:{u}", "password": "X"},
        {"fields": {"u": {"title": "U"}}, "username": "{u", "password": "X"},
        {"fields": {"username": {"title": "U"}}, "password": "X",
         "apply": {"headers": {"X-Key": "{username}"}}},
    ],
)
def test_a_basic_schema_names_only_its_fields(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _spec(**data)


def test_the_header_is_rfc_7617() -> None:
    spec = _spec(fields={"username": {"title": "U"}}, password="X")
    assert isinstance(spec, BasicProvider)
    assert spec.apply_to({"username": "Aladdin"}) == (
        {"Authorization": "Basic " + base64.b64encode(b"Aladdin:X").decode()}, {}
    )
    assert basic_authorization("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="


def test_user_name_and_password_are_templates_over_the_fields() -> None:
    spec = _spec(
        fields={"subdomain": {"title": "S", "secret": False}, "email": {"title": "Email"},
                "api_token": {"title": "API token"}},
        username="{email}/token", password="{api_token}",
    )
    data = {"subdomain": "acme", "email": "a@example.com", "api_token": "tok"}
    assert spec.stored(data) == {**data, "username": "a@example.com/token", "password": "tok"}
    assert spec.apply_to(data)[0] == {
        "Authorization": basic_authorization("a@example.com/token", "tok")}
    # The user name ends at the first ':' (RFC 7617): a value putting one there is refused.
    with pytest.raises(InvalidInput) as caught:
        spec.stored({**data, "email": "a:b@example.com"})
    assert caught.value.field == "email" and "a:b" not in str(caught.value)
    # A password may contain ':'.
    assert spec.stored({**data, "api_token": "t:k"})["password"] == "t:k"
