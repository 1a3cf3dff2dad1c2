"""Revocation on disconnect (issue 13, item 5), against the real authorization server's
RFC 7009 endpoint: after the row's deletion commits, best effort, bounded in time, the
outcome recorded as a ``revoked`` event; the disconnect itself never waits or fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from broker.catalog import parse_provider
from broker.oauth.revocation import Revocation
from tests import oauth_support
from tests.authserver import AuthServer
from tests.oauth_support import Live
from tests.serve_support import free_port
from tests.test_refresh import connected

live_factory = oauth_support.live_factory
DISCONNECT = "/groups/g1/integrations/custom/acme/disconnect"


async def revoked_event(live: Live) -> dict[str, Any] | None:
    for _ in range(200):
        r = await live.service.get("/groups/g1/events")
        found = [e for e in r.json()["events"] if e["kind"] == "revoked"]
        if found:
            return dict(found[0])
        await asyncio.sleep(0.05)
    return None


async def test_disconnect_revokes_the_refresh_token_at_the_provider(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory() as live:
        stored = await connected(live)
        r = await live.service.post(DISCONNECT)
        assert r.status_code == 200 and r.json()["status"] == "not_connected"
        event = await revoked_event(live)
        assert event is not None and event["detail"]["outcome"] == "revoked"
        seen = live.server.requests_seen("revoke")
        assert len(seen) == 1
        assert seen[0].params["token_type_hint"] == "refresh_token"
        family = live.server.store.find_family(stored["refresh_token"])
        assert family is not None and family.revoked
        assert stored["refresh_token"] not in str(event)


async def test_an_unreachable_revocation_endpoint_is_recorded_and_nothing_else(
    live_factory: Callable[..., Any],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/revoke"
    async with live_factory(provider={"revocation_url": dead}) as live:
        await connected(live)
        r = await live.service.post(DISCONNECT)
        assert r.status_code == 200
        event = await revoked_event(live)
        assert event is not None and event["detail"]["outcome"] == "unreachable"
        async with live.broker.session() as db:
            assert await live.broker.repository.get(db, "g1", "acme") is None


async def test_without_a_revocation_url_nothing_is_sent(
    live_factory: Callable[..., Any],
) -> None:
    async with live_factory(provider={"revocation_url": None}) as live:
        await connected(live)
        assert (await live.service.post(DISCONNECT)).status_code == 200
        await asyncio.sleep(0.2)
        r = await live.service.get("/groups/g1/events")
        assert "revoked" not in [e["kind"] for e in r.json()["events"]]
        assert live.server.requests_seen("revoke") == []


def described(live_server_url: str, **extra: Any) -> dict[str, Any]:
    """GitHub's kind of revocation, as data, against the test server's copy of it."""
    return {
        "revocation_url": None,
        "revocation": {
            "url": live_server_url + "/applications/{client_id}/token",
            "method": "DELETE", "format": "json", "client_auth": "basic",
            "body": {"access_token": "{access_token}"}, "ok_status": [204], **extra,
        },
    }


async def test_a_revocation_described_as_data_is_made_as_described(
    live_factory: Callable[..., Any], authserver: AuthServer,
) -> None:
    async with live_factory(provider=described(authserver.base_url)) as live:
        stored = await connected(live)
        r = await live.service.post(DISCONNECT)
        assert r.status_code == 200
        event = await revoked_event(live)
        assert event is not None and event["detail"]["outcome"] == "revoked"
        seen = live.server.requests_seen("revoke_app_token")
        assert [(x.method, x.client_auth, x.status) for x in seen] == [("DELETE", "basic", 204)]
        assert seen[0].params == {"access_token": stored["access_token"]}
        family = live.server.store.find_family(stored["access_token"])
        assert family is not None and family.revoked
        assert live.server.requests_seen("revoke") == []


async def test_a_refused_described_revocation_is_recorded_as_refused(
    live_factory: Callable[..., Any], authserver: AuthServer,
) -> None:
    # The app's credentials go in the body, where this endpoint does not look: a 401.
    spec = described(authserver.base_url, client_auth="post")
    async with live_factory(provider=spec) as live:
        stored = await connected(live)
        r = await live.service.post(DISCONNECT)
        assert r.status_code == 200
        event = await revoked_event(live)
        assert event is not None and event["detail"]["outcome"] == "refused"
        family = live.server.store.find_family(stored["access_token"])
        assert family is not None and not family.revoked


def test_a_described_revocation_request_is_built_from_the_stored_tokens() -> None:
    spec = Revocation(url="https://p.example/revoke", body={"token": "{token}"},
                      client_auth="post")
    request = spec.request("https://p.example/revoke", {"access_token": "at",
                           "refresh_token": "rt"}, client_id="cid", client_secret="cs")
    assert request is not None and request.method == "POST"
    assert request.content == b"client_id=cid&client_secret=cs&token=rt"
    request = spec.request("https://p.example/revoke", {"access_token": "at"},
                           client_id="cid", client_secret=None)
    assert request is not None and request.content == b"client_id=cid&token=at"
    needs_refresh = Revocation(url="https://p.example/r", body={"t": "{refresh_token}"},
                               format="json")
    assert needs_refresh.request("https://p.example/r", {"access_token": "at"},
                                 client_id="c", client_secret="s") is None
    request = needs_refresh.request("https://p.example/r", {"refresh_token": "rt"},
                                    client_id="c", client_secret="s")
    assert request is not None and request.content == b'{"t":"rt"}'
    assert request.headers["authorization"] == "Basic Yzpz"


def test_the_schema_refuses_two_revocations_and_unknown_names() -> None:
    base = {"name": "p", "display_name": "P", "auth_type": "oauth2", "client_id": "c",
            "authorization_url": "https://p.example/a", "token_url": "https://p.example/t"}
    with pytest.raises(ValueError, match="not both"):
        parse_provider({**base, "revocation_url": "https://p.example/r",
                        "revocation": {"url": "https://p.example/r", "body": {"t": "{token}"}}})
    with pytest.raises(ValueError, match="client_secret"):
        parse_provider({**base, "revocation": {"url": "https://p.example/r",
                                               "body": {"t": "{client_secret}"}}})
    with pytest.raises(ValueError):
        parse_provider({**base, "revocation": {"url": "https://{tenant}.p.example/r",
                                               "body": {"t": "{token}"}}})
