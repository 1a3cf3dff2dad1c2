"""Issue #6, item 10: whatever ``expires_in`` a provider sends, a token gets a defined
lifetime and the sweep does not fall into a refresh loop.

The real authorization server is told to send each odd value (``include_expires_in=False``
plus ``extra_token_fields``) on the code exchange and on refreshes. After connecting (and
after a refresh), ``expires_at`` is what ``lifetime_seconds`` defines, ``next_refresh_at`` is
well ahead, and a sweep run at once refreshes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from broker.oauth.tokens import MAX_LIFETIME, lifetime_seconds
from broker.scheduler import sweep
from broker.store.models import Connection
from tests import oauth_support
from tests.oauth_support import Live, page_data
from tests.security import security_support as sec

live_factory = oauth_support.live_factory

LiveFactory = Callable[..., Any]
DEFAULT = 3600  # the provider spec's default_lifetime_seconds

MISSING = object()
VALUES: dict[str, Any] = {
    "missing": MISSING,
    "null": None,
    "zero": 0,
    "negative": -3600,
    "a-word": "soon",
    "empty-string": "",
    "numeric-string": "1800",
    "float-string": "1799.5",
    "exponent-string": "1.8e3",
    "float": 1799.6,
    "boolean": True,
    "absurdly-large": 10**12,
    "past-float-range": 10**400,
    "huge-float": 1e308,
    "a-list": [3600],
    "an-object": {"seconds": 3600},
    "tiny": 1,
    "infinity-string": "Infinity",
    "nan-string": "NaN",
}
EXPECTED = {  # every other value gives DEFAULT
    "numeric-string": 1800, "float-string": 1799, "exponent-string": 1800, "float": 1799,
    "absurdly-large": MAX_LIFETIME, "huge-float": MAX_LIFETIME, "tiny": 5,
}


async def row_schedule(live: Live) -> tuple[datetime, datetime]:
    """The connection's ``expires_at`` and ``next_refresh_at``."""
    async with live.broker.session() as db:
        row = (
            await db.execute(
                select(Connection.expires_at, Connection.next_refresh_at).where(
                    Connection.group_id == "g1", Connection.integration == "acme"
                )
            )
        ).one()
    assert row.expires_at is not None and row.next_refresh_at is not None
    return row.expires_at, row.next_refresh_at


def assert_sane(expires_at: datetime, next_at: datetime, since: datetime, lifetime: int) -> None:
    assert abs((expires_at - since).total_seconds() - lifetime) < 5, (expires_at, since)
    # Refreshed ahead of expiry, but not before ~half the lifetime has passed.
    assert next_at < expires_at
    assert next_at >= since + timedelta(seconds=0.45 * lifetime - 2), (next_at, since)


@pytest.mark.parametrize("value", list(VALUES), ids=list(VALUES))
def test_lifetime_rule_gives_a_defined_bounded_lifetime(value: str) -> None:
    got = lifetime_seconds(None if VALUES[value] is MISSING else VALUES[value], DEFAULT)
    assert got == EXPECTED.get(value, DEFAULT)


async def test_odd_expires_in_from_the_provider_gives_a_sane_schedule_and_no_refresh_loop(
    live_factory: LiveFactory,
) -> None:
    failures = []
    async with live_factory() as live, live.browser() as browser:
        live.server.config.include_expires_in = False
        for name, value in VALUES.items():
            live.server.config.extra_token_fields = (
                {} if value is MISSING else {"expires_in": value}
            )
            lifetime = EXPECTED.get(name, DEFAULT)
            try:
                since = live.broker.now()
                page = await live.popup(browser)
                assert page_data(page)["message"]["status"] == "connected", page.text
                assert_sane(*await row_schedule(live), since, lifetime)
                before = sec.token_requests(live.server)
                result = await sweep(live.broker)
                assert (result.claimed, result.refreshed) == (0, 0)
                # A node asking now gets the token without a refresh.
                r = await live.service.get("/groups/g1/integrations/acme/credentials")
                assert r.status_code == 200, r.text
                assert sec.token_requests(live.server) == before

                # The same after a refresh that answers the same odd value.
                since = live.broker.now()
                r = await live.service.get(
                    "/groups/g1/integrations/acme/credentials?force_refresh=true"
                )
                assert r.status_code == 200, r.text
                assert sec.token_requests(live.server) == before + 1
                assert_sane(*await row_schedule(live), since, lifetime)
                assert (await sweep(live.broker)).claimed == 0
            except AssertionError as exc:
                failures.append(f"expires_in {name} ({value!r:.40}): {str(exc)[-300:]}")
    assert not failures, "\n".join(failures)
