"""Revocation on disconnect (issue 13, item 5), against the real authorization server's
RFC 7009 endpoint: after the row's deletion commits, best effort, bounded in time, the
outcome recorded as a ``revoked`` event; the disconnect itself never waits or fails."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests import oauth_support
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
