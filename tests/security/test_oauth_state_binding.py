"""Issue #6, item 2: an OAuth2 ``state`` is single use, short-lived, and bound to the browser
and the group that started its flow.

``tests/test_oauth_failures.py`` checks each refusal's message and that no row is written.
Here two groups are in play, as in an attack: Alice connects group ``g1``, Mallory holds a
connect session for ``g2``. Every refusal must leave *both* groups exactly as they were
(connections and events, every column), and a stolen or swapped state must never move a
connection from one group to the other.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from broker.oauth.flows import FLOW_TTL, hash_secret
from broker.store.models import OAuthFlow
from broker.store.repository import utcnow
from tests import oauth_support
from tests.oauth_support import Live, page_data, query_param
from tests.security import security_support as sec

live_factory = oauth_support.live_factory

LiveFactory = Callable[..., Any]


async def stored_groups(live: Live) -> set[str]:
    async with live.broker.session() as db:
        return {c.group_id for g in ("g1", "g2") for c in await live.broker.repository.list(db, g)}


@pytest.mark.parametrize("attack", ["replayed", "expired", "finished_in_another_browser"])
async def test_refused_state_writes_nothing_to_either_group(
    live_factory: LiveFactory, attack: str
) -> None:
    async with live_factory() as live, live.browser() as alice, live.browser() as mallory:
        # Mallory has a flow of her own in progress for g2 (her browser holds its cookie).
        mallory_state = query_param(await live.start(mallory, group_id="g2"), "state")
        location = await live.start(alice, group_id="g1")
        state = query_param(location, "state")
        callback = await live.consent(alice, location)
        if attack == "replayed":
            first = await alice.get(callback)
            assert page_data(first)["message"]["status"] == "connected", first.text
        before = await sec.connections(live.broker)
        requests_before = sec.token_requests(live.server)

        if attack == "replayed":
            page = await alice.get(callback)
            message = "invalid or was already used"
        elif attack == "expired":
            live.broker.clock = lambda: utcnow() + FLOW_TTL + timedelta(seconds=5)
            page = await alice.get(callback)
            message = "This sign-in took too long."
        else:
            page = await mallory.get(callback)
            message = "started in another browser"

        sec.assert_error_page(page, message)
        assert await sec.connections(live.broker) == before
        assert sec.token_requests(live.server) == requests_before
        assert await live.flows(state) == 0  # burnt: it cannot be finished later either
        assert await live.flows(mallory_state) == 1  # Mallory's own flow is untouched
        assert "g2" not in await stored_groups(live)


async def test_state_finished_just_inside_ten_minutes_connects(live_factory: LiveFactory) -> None:
    # The control for "expired": the same flow 10 s short of FLOW_TTL is accepted.
    async with live_factory() as live, live.browser() as alice:
        location = await live.start(alice)
        callback = await live.consent(alice, location)
        live.broker.clock = lambda: utcnow() + FLOW_TTL - timedelta(seconds=10)
        page = await alice.get(callback)
        assert page_data(page)["message"]["status"] == "connected", page.text


async def test_flow_row_holds_only_the_hash_of_its_state_and_expires_in_ten_minutes(
    live_factory: LiveFactory,
) -> None:
    async with live_factory() as live, live.browser() as alice:
        state = query_param(await live.start(alice), "state")
        async with live.broker.session() as db:
            row = (await db.execute(select(OAuthFlow))).scalar_one()
        assert row.state_hash == hash_secret(state)
        assert state not in repr([getattr(row, c.key) for c in OAuthFlow.__table__.columns])
        assert row.ticket_hash is None  # redeemed: the ticket cannot start it again
        # Ten minutes from its start (its ticket was made just before).
        assert timedelta(minutes=10) == FLOW_TTL
        assert FLOW_TTL <= row.expires_at - row.created_at < FLOW_TTL + timedelta(seconds=5)


async def test_code_of_one_flow_with_the_state_of_another_stores_nothing_in_either_group(
    live_factory: LiveFactory,
) -> None:
    # One browser (an admin of both groups) with two flows in progress: g1's and g2's.
    async with live_factory() as live, live.browser() as browser:
        loc_1 = await live.start(browser, group_id="g1")
        loc_2 = await live.start(browser, group_id="g2")
        callback_1 = await live.consent(browser, loc_1)
        callback_2 = await live.consent(browser, loc_2)
        before = await sec.connections(live.broker)

        # g1's code presented with g2's state: the browser holds g2's cookie, so only the
        # PKCE binding (g2's verifier was not made for g1's code) stands in the way.
        swapped = sec.with_params(callback_1, state=query_param(callback_2, "state"))
        page = await browser.get(swapped)
        sec.assert_error_page(page, "Acme did not issue a token (invalid_grant).")
        assert live.server.token_requests["authorization_code"] == 1
        assert await sec.connections(live.broker) == before
        assert await stored_groups(live) == set()
        assert await live.flows(query_param(callback_2, "state")) == 0


async def test_callback_connects_only_the_group_its_flow_was_started_for(
    live_factory: LiveFactory,
) -> None:
    # Whatever the callback request says about groups or sessions, the group comes from the
    # flow recorded when the authorize route (with g1's session) started it.
    async with live_factory() as live, live.browser() as alice:
        mallory_session = await live.session_token("g2")
        callback = await live.consent(alice, await live.start(alice, group_id="g1"))
        page = await alice.get(
            f"{callback}&group_id=g2&session={mallory_session}",
            headers={"Authorization": f"Bearer {mallory_session}"},
        )
        assert page_data(page)["message"]["status"] == "connected", page.text
        assert await stored_groups(live) == {"g1"}
