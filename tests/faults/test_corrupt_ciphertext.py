"""One flipped bit in a stored ciphertext (issue #6, item 16).

A single bit of one connection's stored Fernet token is flipped in the database (bit rot,
a bad restore, a hand edit). Whether a node's read or the sweep meets it first, that
connection is reported ``corrupt`` — in the list route, as a 500 ``credential_corrupt``
naming it, in one ERROR log line naming group and integration (never a secret), and in a
``corrupt`` event — and every other connection keeps working, reads and sweep refreshes.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import update

from broker.scheduler import sweep
from broker.store.models import Connection
from tests import oauth_support
from tests.faults.fault_support import advance, connect, stored_rows
from tests.oauth_support import Live

live_factory = oauth_support.live_factory

GROUPS = ["g1", "g2", "g3"]
BROKEN = "g2"


async def flip_one_bit(live: Live, group_id: str) -> None:
    """Flip one bit in the middle of the encrypted payload of ``group_id``'s row."""
    row = next(r for r in await stored_rows(live.broker) if r.group_id == group_id)
    raw = bytearray(base64.urlsafe_b64decode(row.credential))
    raw[len(raw) // 2] ^= 0x10
    async with live.broker.session() as db, db.begin():
        await db.execute(
            update(Connection)
            .where(Connection.id == row.id)
            .values(credential=base64.urlsafe_b64encode(bytes(raw)).decode())
        )


def secrets_of(live: Live) -> set[str]:
    with live.server.store.lock:
        return {t for t in [*live.server.store.by_access, *live.server.store.by_refresh] if t}


async def statuses(live: Live) -> dict[str, str]:
    found = {}
    for group_id in GROUPS:
        r = await live.service.get(f"/groups/{group_id}/integrations")
        assert r.status_code == 200, r.text
        found[group_id] = r.json()["integrations"][0]["status"]
    return found


async def kinds(live: Live, group_id: str) -> list[str]:
    r = await live.service.get(f"/groups/{group_id}/events")
    return [e["kind"] for e in r.json()["events"]]


@pytest.mark.parametrize("found_by", ["read", "sweep"])
async def test_a_flipped_bit_marks_that_connection_corrupt_and_only_that_one(
    live_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture, found_by: str
) -> None:
    caplog.set_level(logging.INFO)
    async with live_factory() as live:
        for group_id in GROUPS:
            await connect(live, group_id)
        before = {
            g: (await live.service.get(f"/groups/{g}/integrations/acme/credentials")).json()
            for g in GROUPS
        }
        await flip_one_bit(live, BROKEN)
        live.broker.tokens.cache.clear()  # as on a replica that never read it

        if found_by == "sweep":
            advance(live.broker, 3000)  # all three are due
            result = await sweep(live.broker)
            assert (result.claimed, result.refreshed, result.failed) == (3, 2, 1)
        bodies = []
        for _ in range(2):  # the second read finds it already marked: no second event
            r = await live.service.get(f"/groups/{BROKEN}/integrations/acme/credentials")
            assert r.status_code == 500, r.text
            bodies.append(r.text)
            error = r.json()["error"]
            assert error["code"] == "credential_corrupt"
            assert "'acme'" in error["message"] and f"'{BROKEN}'" in error["message"]

        assert await statuses(live) == {"g1": "connected", "g2": "corrupt", "g3": "connected"}
        assert (await kinds(live, BROKEN)).count("corrupt") == 1
        assert (await kinds(live, BROKEN))[0] == "corrupt"
        marked = [
            r for r in caplog.records
            if r.levelno == logging.ERROR and r.name == "broker.credentials"
            and "does not decrypt" in r.getMessage()
        ]
        assert len(marked) >= 1
        assert all(f"{BROKEN}/acme" in r.getMessage() for r in marked)
        seen = caplog.text + "".join(bodies)
        assert not [s for s in secrets_of(live) if s in seen]
        row = next(r for r in await stored_rows(live.broker) if r.group_id == BROKEN)
        assert (row.status, row.next_refresh_at, row.lease_owner) == ("corrupt", None, None)

        # Every other connection keeps working: reads, and the sweep's refreshes.
        for group_id in ("g1", "g3"):
            r = await live.service.get(f"/groups/{group_id}/integrations/acme/credentials")
            assert r.status_code == 200, r.text
            if found_by == "sweep":  # refreshed by that sweep
                assert r.json() != before[group_id]
        refreshes = live.server.token_requests["refresh_token"]
        advance(live.broker, 3000)
        result = await sweep(live.broker)
        assert (result.claimed, result.refreshed, result.failed) == (2, 2, 0)
        assert live.server.token_requests["refresh_token"] == refreshes + 2
        for group_id in ("g1", "g3"):
            r = await live.service.get(f"/groups/{group_id}/integrations/acme/credentials")
            assert r.status_code == 200, r.text
        assert live.server.invalid_grant_count == 0
