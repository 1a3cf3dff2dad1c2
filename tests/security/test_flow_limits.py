"""Issue #11, items 4, 8 and part of 9: what one browser can make the broker keep, how long a
flow lives, and the callback's odd requests.

- One connect session asking for ticket after ticket (the review made 3,000 flow rows in
  35 s) keeps at most ``MAX_FLOWS_PER_OWNER`` flows; other sessions' flows are untouched;
  the sweep prunes flows and sessions whose time ran out.
- A flow needs its connect session to be valid when it starts and when it finishes.
- ``HEAD /oauth/callback`` never spends the code; a flow row whose sealed part was tampered
  with ends on the result page, not a JSON 500.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update

from broker.oauth.flows import FLOW_TTL, MAX_FLOWS_PER_OWNER, TICKET_TTL, hash_secret
from broker.runtime import Broker
from broker.scheduler import sweep
from broker.sessions import find_session
from broker.store.models import ConnectSession, OAuthFlow
from broker.store.repository import utcnow
from tests import oauth_support
from tests.oauth_support import Live, page_data, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory
sec_broker = sec.sec_broker

LiveFactory = Callable[..., Any]
TICKETS = "/groups/{group}/integrations/acme/authorize"


async def count(broker: Broker, model: Any, *where: Any) -> int:
    async with broker.session() as db:
        return int(await db.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def session(client: Any, group: str = "g1") -> str:
    r = await client.post("/connect-sessions", json={"group_id": group})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


async def test_one_session_asking_again_and_again_keeps_at_most_the_cap(
    sec_broker: Broker,
) -> None:
    async with sec.app_client(sec_broker) as service:
        mine, other = await session(service), await session(service, "g2")
        mine_hash = (await find_session_db(sec_broker, mine)).token_hash
        other_hash = (await find_session_db(sec_broker, other)).token_hash
        # The other session's flows, made first: they must survive the flood.
        for _ in range(3):
            r = await service.post(TICKETS.format(group="g2"), json={},
                                   headers={"Authorization": f"Bearer {other}"})
            assert r.status_code == 201
        tickets = []
        long_path = "/" + "p" * 500  # the longest return_to allowed (512)
        for _ in range(120):
            r = await service.post(
                TICKETS.format(group="g1"), json={"return_to": long_path},
                headers={"Authorization": f"Bearer {mine}"},
            )
            assert r.status_code == 201, r.text
            tickets.append(r.json()["ticket"])
        # Redeeming some (started flows count too) makes no room for more.
        for ticket in tickets[-5:]:
            r = await service.post("/oauth/start", json={"ticket": ticket},
                                   headers={"Origin": sec.BASE_URL})
            assert r.status_code == 200, r.text
        # Service-token tickets (the host's backend) are capped per group.
        for _ in range(30):
            r = await service.post(TICKETS.format(group="g3"), json={})
            assert r.status_code == 201
    assert await count(sec_broker, OAuthFlow, OAuthFlow.session_hash == mine_hash) == (
        MAX_FLOWS_PER_OWNER
    )
    assert await count(sec_broker, OAuthFlow, OAuthFlow.session_hash == other_hash) == 3
    assert await count(sec_broker, OAuthFlow, OAuthFlow.group_id == "g3") == (
        MAX_FLOWS_PER_OWNER
    )
    # The newest were kept: the last ticket still works, the first is gone.
    async with sec.app_client(sec_broker) as service:
        r = await service.post("/oauth/start", json={"ticket": tickets[0]},
                               headers={"Origin": sec.BASE_URL})
        assert r.status_code == 400, r.text
        r = await service.post("/oauth/start", json={"ticket": tickets[-6]},
                               headers={"Origin": sec.BASE_URL})
        assert r.status_code == 200, r.text


async def find_session_db(broker: Broker, token: str) -> Any:
    async with broker.session() as db:
        grant = await find_session(db, token)
    assert grant is not None
    return grant


async def test_the_sweep_prunes_flows_and_sessions_whose_time_ran_out(
    sec_broker: Broker,
) -> None:
    async with sec.app_client(sec_broker) as service:
        token = await session(service)
        for _ in range(4):
            r = await service.post(TICKETS.format(group="g1"), json={},
                                   headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 201
    assert await count(sec_broker, OAuthFlow) == 4
    assert await count(sec_broker, ConnectSession) == 1
    real = sec_broker.clock
    try:
        # Tickets ran out, but not long ago: kept a while, so a late step hears "too late".
        sec_broker.clock = lambda: real() + TICKET_TTL + timedelta(seconds=5)
        result = await sweep(sec_broker)
        assert (result.pruned_flows, result.pruned_sessions) == (0, 0)
        sec_broker.clock = lambda: real() + TICKET_TTL + FLOW_TTL + timedelta(seconds=5)
        result = await sweep(sec_broker)
        assert result.pruned_flows == 4 and result.pruned_sessions == 0
        sec_broker.clock = lambda: real() + timedelta(minutes=31)  # the session expired
        result = await sweep(sec_broker)
        assert result.pruned_sessions == 1
    finally:
        sec_broker.clock = real
    assert await count(sec_broker, OAuthFlow) == 0
    assert await count(sec_broker, ConnectSession) == 0


async def expire_session(live: Live, token: str) -> None:
    async with live.broker.session() as db, db.begin():
        await db.execute(
            update(ConnectSession)
            .where(ConnectSession.token_hash == hash_secret(token))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


async def test_a_flow_cannot_finish_after_its_connect_session_ended(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        token = await live.session_token("g1")
        location = await live.start(browser, session=token)
        callback = await live.consent(browser, location)
        await expire_session(live, token)
        page = await browser.get(callback)
        sec.assert_error_page(page, "The connect session ended", status_code=401)
        assert await live.rows() == 0
        assert sec.token_requests(live.server) == 0  # refused before the code was spent
        assert await live.flows(query_param(location, "state")) == 0


async def test_a_ticket_cannot_start_after_its_connect_session_ended(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as browser:
        token = await live.session_token("g1")
        r = await live.ticket(session=token)
        assert r.status_code == 201
        await expire_session(live, token)
        r = await live.redeem(browser, r.json()["ticket"])
        assert r.status_code == 401, r.text
        assert "The connect session ended" in r.json()["error"]["message"]
        assert not [c for c in browser.cookies.jar if c.name.startswith("broker_flow_")]


async def test_a_flow_made_with_the_service_token_has_no_session_to_outlive(
    live_factory: LiveFactory,
) -> None:
    # The control: the host's backend (service token) made the ticket; nothing to expire.
    async with live_factory() as live, live.browser() as browser:
        r = await live.ticket()
        assert r.status_code == 201
        started = await live.redeem(browser, r.json()["ticket"])
        page = await browser.get(await live.consent(browser, started.json()["location"]))
        assert page_data(page)["message"]["status"] == "connected", page.text


async def test_head_on_the_callback_does_not_spend_the_code(live_factory: LiveFactory) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        callback = await live.consent(browser, location)
        r = await browser.head(callback)
        assert r.status_code == 405
        assert r.headers["allow"] == "GET"
        assert sec.token_requests(live.server) == 0
        assert await live.flows(query_param(location, "state")) == 1
        page = await browser.get(callback)
        assert page_data(page)["message"]["status"] == "connected", page.text


async def test_a_tampered_flow_ends_on_the_result_page(live_factory: LiveFactory) -> None:
    async with live_factory() as live, live.browser() as browser:
        location = await live.start(browser)
        state = query_param(location, "state")
        async with live.broker.session() as db, db.begin():
            sealed = await db.scalar(
                select(OAuthFlow.sealed).where(OAuthFlow.state_hash == hash_secret(state))
            )
            assert sealed is not None
            flipped = sealed[:40] + ("A" if sealed[40] != "A" else "B") + sealed[41:]
            await db.execute(
                update(OAuthFlow)
                .where(OAuthFlow.state_hash == hash_secret(state))
                .values(sealed=flipped)
            )
        page = await browser.get(await live.consent(browser, location))
        sec.assert_error_page(page, "This sign-in cannot be finished.", status_code=500)
        assert sec.token_requests(live.server) == 0
        assert await live.rows() == 0
        assert await live.flows(state) == 0  # consumed: nobody can finish it
