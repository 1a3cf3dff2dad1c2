"""Values learnt at connect (``connect_values``): from the sign-in callback's query (the
test authorization server adds them, as QuickBooks adds ``realmId``) and from a lookup
made with the new credential (the test API server's ``/sites``, which answers only a
working credential, as Atlassian's accessible-resources does). Stored, kept across
refreshes, handed to nodes, used in the API's address, shown in the list; a value that
cannot be learnt stores nothing. The pure parts without I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker.catalog import parse_provider
from broker.connectvalues import ConnectValue, ValueNotLearnt, from_callback, pick
from broker.nodes import ExecutionContext
from tests import oauth_support
from tests.apiserver import ApiServer
from tests.oauth_support import Live, page_data

live_factory = oauth_support.live_factory

REALM = "4620816365281234"
CLOUD = "1324a887-45db-1bf4-1e99-ef0ff456d421"
UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
KEY = "key-0123456789abcdef"


def learning(apiserver: ApiServer, **lookup: Any) -> dict[str, Any]:
    """Overrides of the acme provider: a realm from the callback, a cloud id looked up."""
    return {
        "connect_values": {
            "realm_id": {"from": "callback", "name": "realmId", "pattern": "^[0-9]{1,32}$"},
            "cloud_id": {"from": "lookup", "url": f"{apiserver.url}/bearer/sites",
                         "path": "0.id", "pattern": UUID, **lookup},
        },
        "api": {"base_url": f"{apiserver.url}/bearer/echo/{{realm_id}}/{{cloud_id}}"},
    }


async def popup(live: Live) -> dict[str, Any]:
    async with live.browser() as browser:
        page = await live.popup(browser)
    return page_data(page)["message"]


async def test_values_learnt_at_connect_reach_nodes_the_api_and_the_list(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    apiserver.config.sites = [{"id": CLOUD, "name": "acme", "url": "https://acme.example"}]
    async with live_factory(provider=learning(apiserver)) as live:
        live.server.config.callback_params = {"realmId": REALM}
        assert (await popup(live))["status"] == "connected"
        # The lookup was made with the new token (the server answers no other).
        lookups = [r for r in apiserver.requests if r.path == "/bearer/sites"]
        assert [(r.status, r.principal) for r in lookups] == [(200, "alice")]

        ctx = ExecutionContext.local(live.broker, "g1")
        got = await ctx.custom_integration("acme")
        assert (got["realm_id"], got["cloud_id"]) == (REALM, CLOUD)
        async with ctx.client("acme") as api:
            r = await api.get("/issues")
        assert r.status_code == 200 and r.json()["path"] == f"/bearer/echo/{REALM}/{CLOUD}/issues"
        r = await live.service.get("/groups/g1/integrations/acme/proxy/x")
        assert r.json()["path"] == f"/bearer/echo/{REALM}/{CLOUD}/x"

        r = await live.service.get("/groups/g1/integrations")
        listed = {i["name"]: i for i in r.json()["integrations"]}["acme"]
        assert listed["hint"] == {"realm_id": REALM, "cloud_id": CLOUD}

        # A refresh keeps them (the token response does not repeat them).
        refreshed = await live.broker.credentials("g1", "acme", force_refresh=True)
        assert refreshed["access_token"] != got["access_token"]
        assert (refreshed["realm_id"], refreshed["cloud_id"]) == (REALM, CLOUD)


@pytest.mark.parametrize(
    ("callback", "sites", "lookup", "says"),
    [
        ({}, [{"id": CLOUD}], {}, "realm_id"),  # the callback has no realmId
        ({"realmId": "12ab"}, [{"id": CLOUD}], {}, "realm_id"),  # not the pattern
        ({"realmId": REALM}, [], {}, "cloud_id"),  # the lookup answers no site
        ({"realmId": REALM}, [{"id": "../../admin"}], {}, "cloud_id"),  # hostile value
        ({"realmId": REALM}, [{"id": CLOUD}], {"path": "0.cloud"}, "cloud_id"),
    ],
)
async def test_a_value_not_learnt_stores_nothing(
    live_factory: Callable[..., Any], apiserver: ApiServer,
    callback: dict[str, str], sites: list[dict[str, Any]], lookup: dict[str, Any], says: str,
) -> None:
    apiserver.config.sites = sites
    async with live_factory(provider=learning(apiserver, **lookup)) as live:
        live.server.config.callback_params = callback
        message = await popup(live)
        assert message["status"] == "error" and says in message["error"]
        assert "../" not in message["error"]
        assert await live.rows() == 0


async def test_a_failing_lookup_stores_nothing(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    spec = learning(apiserver)
    spec["connect_values"]["cloud_id"]["url"] = f"{apiserver.url}/open/status/503"
    async with live_factory(provider=spec) as live:
        live.server.config.callback_params = {"realmId": REALM}
        message = await popup(live)
        assert message["status"] == "error" and "cloud_id" in message["error"]
        assert await live.rows() == 0


async def test_an_api_key_connection_learns_by_lookup(
    live_factory: Callable[..., Any], apiserver: ApiServer
) -> None:
    apiserver.config.api_keys = {KEY}
    apiserver.config.sites = [{"account": {"id": 42}}]
    keyed = {
        "display_name": "Keyed", "auth_type": "apikey",
        "fields": {"api_key": {"title": "API key"}},
        "apply": {"headers": {"X-Api-Key": "{api_key}"}},
        "connect_values": {"account_id": {
            "from": "lookup", "url": f"{apiserver.url}/key-header/sites",
            "path": "0.account.id", "pattern": "^[0-9]{1,12}$", "secret": True,
        }},
        # The account goes on every call, beside the key: not on the lookup that learns it.
        "api": {"base_url": f"{apiserver.url}/key-header/echo/{{account_id}}",
                "auth": {"headers": {"X-Api-Key": "{api_key}", "X-Account": "{account_id}"}}},
    }
    async with live_factory(extra_providers={"keyed": keyed}) as live:
        r = await live.service.post("/groups/g1/integrations/custom/keyed",
                                    json={"api_key": "wrong-key-0123456789"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "connect_value_missing"
        assert "account_id" in r.json()["error"]["message"]
        r = await live.service.post("/groups/g1/integrations/custom/keyed",
                                    json={"api_key": KEY})
        assert r.status_code == 200, r.text
        got = await ExecutionContext.local(live.broker, "g1").custom_integration("keyed")
        assert got == {"api_key": KEY, "account_id": "42"}
        r = await live.service.get("/groups/g1/integrations/keyed/proxy/me")
        assert r.json()["path"] == "/key-header/echo/42/me"
        assert r.json()["headers"]["x-account"] == "42"
        r = await live.service.get("/groups/g1/integrations")
        hint = {i["name"]: i for i in r.json()["integrations"]}["keyed"]["hint"]
        assert "account_id" not in hint  # a secret value is not listed


# ---------------------------------------------------------------- pure parts


def test_callback_values_are_taken_once_and_checked() -> None:
    values = {"realm_id": ConnectValue.model_validate(
        {"from": "callback", "name": "realmId", "pattern": "^[0-9]+$"})}
    assert from_callback(values, {"realmId": ["12"]}, "Q") == {"realm_id": "12"}
    for query in ({}, {"realmId": ["1a"]}, {"realmId": ["1", "2"]}, {"realm_id": ["1"]}):
        with pytest.raises(ValueNotLearnt):
            from_callback(values, query, "Q")


def test_a_lookup_value_is_picked_by_path_and_pattern() -> None:
    spec = ConnectValue.model_validate(
        {"from": "lookup", "url": "https://x.example/me", "path": "0.id", "pattern": "^[0-9]+$"})
    assert pick(spec, [{"id": 7}, {"id": 8}], "n", "X") == "7"
    assert pick(spec, [{"id": "9"}], "n", "X") == "9"
    for answer in ([], {}, [{"id": True}], [{"id": None}], [{"id": [1]}], [{"id": "1/2"}]):
        with pytest.raises(ValueNotLearnt):
            pick(spec, answer, "n", "X")


@pytest.mark.parametrize(
    ("auth_type", "value"),
    [
        ("apikey", {"from": "callback", "pattern": "^x$"}),  # no callback without a popup
        ("oauth2", {"from": "lookup", "url": "https://x.example/me", "pattern": "^x$"}),
        ("oauth2", {"from": "lookup", "path": "id", "pattern": "^x$"}),
        ("oauth2", {"from": "lookup", "url": "https://{v}.example/me", "path": "id",
                    "pattern": "^x$"}),
        ("oauth2", {"from": "callback", "url": "https://x.example/me", "pattern": "^x$"}),
        ("oauth2", {"from": "callback", "pattern": "("}),
        ("oauth2", {"from": "callback"}),
    ],
)
def test_the_schema_refuses(auth_type: str, value: dict[str, Any]) -> None:
    base: dict[str, Any] = {"name": "p", "display_name": "P", "auth_type": auth_type}
    if auth_type == "apikey":
        base["fields"] = {"api_key": {"title": "K"}}
    else:
        base.update(authorization_url="https://p.example/auth", token_url="https://p.example/t")
    with pytest.raises(ValueError):
        parse_provider({**base, "connect_values": {"v": value}})


def test_a_learnt_value_may_not_shadow_the_credential() -> None:
    with pytest.raises(ValueError, match="already has"):
        parse_provider({
            "name": "p", "display_name": "P", "auth_type": "oauth2",
            "authorization_url": "https://p.example/auth", "token_url": "https://p.example/t",
            "connect_values": {"access_token": {"from": "callback", "pattern": "^x$"}},
        })
