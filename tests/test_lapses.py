"""A refresh whose holder stopped (``broker.lapses``, ``Repository.next_lapse``, the claims'
``lapsed_lease_owner``), on real SQLite and PostgreSQL, in one process: the holder that
"stopped" is a lease left in the row, and the answer it lost is a refresh made at the real
authorization server whose answer is thrown away. The same with real processes and SIGKILL:
``tests/faults/test_interrupted_refresh.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, text, update

from broker.integrations import Group, register_custom_integration
from broker.refresh import INTERRUPTED, LAPSE_MARGIN
from broker.runtime import Broker
from broker.scheduler import Refresher
from broker.store.models import Connection
from broker.store.repository import Refreshed
from tests import refresh_support
from tests.oauth_support import Live
from tests.refresh_support import connect, rows

refresh_live = refresh_support.refresh_live

DEAD = "4242-deadbeef0000"  # the lease owner of a process that is gone


async def api_key_rows(broker: Broker, count: int) -> list[str]:
    groups = [f"g{i}" for i in range(count)]
    for i, group in enumerate(groups):
        async with broker.session() as db, db.begin():
            await register_custom_integration(
                db, Group(group), "openweathermap", {"api_key": f"{i:032x}"}
            )
    return groups


async def set_row(broker: Broker, group: str, **values: Any) -> None:
    async with broker.session() as db, db.begin():
        await db.execute(
            update(Connection).where(Connection.group_id == group).values(**values)
        )


async def claim(broker: Broker, group: str, owner: str, until: datetime) -> Connection | None:
    async with broker.session() as db, db.begin():
        return await broker.repository.claim(
            db, group, "openweathermap", owner=owner, until=until
        )


async def test_a_claim_reports_the_holder_whose_lease_it_took_over(broker: Broker) -> None:
    """``lapsed_lease_owner``: set by a claim that took a lease its holder never released
    (it ran out), cleared by a claim of a free lease, by every release and by the store."""
    (group,) = await api_key_rows(broker, 1)
    now = broker.now()
    row = await claim(broker, group, "a", now + timedelta(seconds=30))
    assert row is not None and row.lapsed_lease_owner is None  # it was free
    assert await claim(broker, group, "b", now + timedelta(seconds=30)) is None  # held
    # "a" stops holding it: its lease runs out unreleased.
    await set_row(broker, group, lease_expires_at=now - timedelta(seconds=1))
    row = await claim(broker, group, "b", now + timedelta(seconds=30))
    assert row is not None and (row.lease_owner, row.lapsed_lease_owner) == ("b", "a")
    async with broker.session() as db, db.begin():  # renewing keeps what the claim found
        renewed = await broker.repository.renew_lease(
            db, group, "openweathermap", owner="b", until=now + timedelta(seconds=60)
        )
    assert renewed is not None and renewed.lapsed_lease_owner == "a"
    async with broker.session() as db, db.begin():
        assert await broker.repository.release(db, group, "openweathermap", owner="b")
    row = await claim(broker, group, "c", now + timedelta(seconds=30))
    assert row is not None and row.lapsed_lease_owner is None  # released: nothing lapsed

    # The sweep's claim reports it the same way; the store of a new credential clears it.
    await set_row(broker, group, lease_expires_at=now - timedelta(seconds=1),
                  next_refresh_at=now - timedelta(seconds=1))
    async with broker.database.write() as db:
        (due,) = await broker.repository.claim_due(
            db, owner="d", until=now + timedelta(seconds=30), limit=10,
            skip_locked=not broker.database.is_sqlite,
        )
    assert (due.lease_owner, due.lapsed_lease_owner) == ("d", "c")
    stored = await broker.tokens.writer.store(Refreshed(
        due.id, group, "openweathermap", due.version, {"api_key": "f" * 32},
        expires_at=None, next_refresh_at=None, lease_owner="d",
    ))
    assert stored
    async with broker.session() as db:
        row = await db.get(Connection, due.id, populate_existing=True)
    assert row is not None and (row.lease_owner, row.lapsed_lease_owner) == (None, None)


async def test_next_lapse_is_the_first_lease_of_another_holder_on_a_due_row(
    broker: Broker,
) -> None:
    groups = await api_key_rows(broker, 6)
    now = broker.now()
    due, later = now - timedelta(seconds=5), now + timedelta(hours=1)

    async def next_lapse(after: datetime = now - timedelta(minutes=1)) -> datetime | None:
        async with broker.session() as db:
            return await broker.repository.next_lapse(db, owner="me", after=after)

    assert await next_lapse() is None  # no lease anywhere
    leases = {
        # group: (lease owner, lease runs out in s, next refresh at, status)
        groups[0]: ("other-1", 20.0, due, "connected"),
        groups[1]: ("other-2", 9.0, due, "connected"),  # the first to run out
        groups[2]: ("me", 3.0, due, "connected"),  # this process's own: not watched
        groups[3]: ("other-3", 4.0, later, "connected"),  # not due: an on-demand refresh
        groups[4]: ("other-4", 2.0, None, "reauth_required"),
        groups[5]: (None, None, due, "connected"),  # due, not leased yet
    }
    for group, (owner, runs_out, next_at, status) in leases.items():
        await set_row(
            broker, group, lease_owner=owner, next_refresh_at=next_at, status=status,
            lease_expires_at=None if runs_out is None else now + timedelta(seconds=runs_out),
        )
    assert await next_lapse() == now + timedelta(seconds=9)
    # A lease that has run out already is reported too (nobody took it over yet), unless
    # it ran out before ``after`` (the watch has had the sweep run since).
    await set_row(broker, groups[0], lease_expires_at=now - timedelta(seconds=2))
    assert await next_lapse() == now - timedelta(seconds=2)
    assert await next_lapse(after=now - timedelta(seconds=1)) == now + timedelta(seconds=9)


async def test_next_lapse_walks_the_due_range_of_the_index(broker: Broker) -> None:
    """Cheap at any size: the query reads the due range of ``ix_connections_next_refresh_at``
    (like the sweep's claim), not the table. 20,000 rows not due, 20 due."""
    now = broker.now()
    sealed = broker.keyring.seal("g", "openweathermap", {"api_key": "0" * 32})
    base = {
        "integration": "openweathermap", "auth_type": "apikey", "status": "connected",
        "credential": sealed.token, "key_id": sealed.key_id, "version": 1, "hint": {},
        "created_at": now, "updated_at": now, "failure_count": 0,
    }
    rows_ = [
        {**base, "group_id": f"g{i}", "next_refresh_at": now + timedelta(days=1 + i % 30)}
        for i in range(20_000)
    ] + [
        {**base, "group_id": f"due{i}", "next_refresh_at": now - timedelta(seconds=i),
         "lease_owner": "other", "lease_expires_at": now + timedelta(seconds=10 + i)}
        for i in range(20)
    ]
    async with broker.session() as db, db.begin():
        await db.execute(insert(Connection), rows_)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "min(connections.lease_expires_at)" in statement:
            statements.append((statement, params))

    from sqlalchemy import event

    engine = broker.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        async with broker.session() as db:
            lapse = await broker.repository.next_lapse(db, owner="me", after=now)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert lapse == now + timedelta(seconds=10)
    ((statement, params),) = statements
    explain = "EXPLAIN QUERY PLAN " if broker.database.is_sqlite else "EXPLAIN "
    async with broker.database.engine.connect() as conn:
        if not broker.database.is_sqlite:
            await conn.execute(text("ANALYZE connections"))
        found = await conn.exec_driver_sql(explain + statement, tuple(params))
        plan = " ".join(str(r[-1]) for r in found)
    assert "ix_connections_next_refresh_at" in plan, plan
    assert "Seq Scan" not in plan and "SCAN connections" not in plan, plan


# --- the lease watch, in a refresher ---------------------------------------------------------

TIMEOUT = 1.0  # the provider's timeout_seconds: leases last 7 s, the watch looks every 2.3 s


async def strand(live: Live, group: str, *, runs_out_in: float) -> tuple[str, float]:
    """Make ``group``'s connection look like a refresh cut off in a process that stopped
    after the provider answered: the provider has rotated its refresh token (the answer is
    thrown away) and the row is leased by a holder that is gone, until ``runs_out_in``
    seconds from now. Returns the stored refresh token and when the lease runs out."""
    data = (await rows(live.broker))[group][1]
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(
            live.server.token_endpoint,
            data={"grant_type": "refresh_token", "refresh_token": data["refresh_token"]},
            auth=(live.client_id, live.client_secret),
        )
    assert answer.status_code == 200, answer.text  # ...and lost with the process
    now = live.broker.now()
    until = now + timedelta(seconds=runs_out_in)
    await set_row(live.broker, group, lease_owner=DEAD, lease_expires_at=until,
                  next_refresh_at=now - timedelta(seconds=1))
    return str(data["refresh_token"]), until.timestamp()


def presented_at(live: Live, refresh_token: str) -> list[float]:
    return [r.at for r in live.server.requests_seen("token")
            if r.params.get("refresh_token") == refresh_token]


@pytest.mark.parametrize("grace", [10.0, 0.0], ids=["grace-period", "no-grace"])
async def test_a_stopped_holders_refresh_is_retried_as_soon_as_its_lease_runs_out(
    refresh_live: Callable[..., Any], grace: float, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep runs every 60 s, and its first run (at start) finds the lease still held.
    The retry comes anyway just after the lease runs out, not a sweep interval later: a
    provider with a grace period (10 s here) accepts the rotated refresh token again and
    the connection lives on; one without says ``invalid_grant`` and the connection needs
    reauth, the event saying why (the process holding the refresh stopped)."""
    caplog.set_level(logging.INFO, logger="broker")
    async with refresh_live(
        provider={"timeout_seconds": TIMEOUT},
        server={"refresh_token_reuse_grace": grace},
        refresh={"interval_seconds": 60, "min_validity_seconds": 1},
    ) as live:
        await connect(live, "g1")
        stored, runs_out = await strand(live, "g1", runs_out_in=2.5)
        refresher = Refresher(live.broker)
        refresher.start()
        try:
            deadline = time.time() + 8
            while len(presented_at(live, stored)) < 2:
                assert time.time() < deadline, "no retry after the lease ran out"
                await asyncio.sleep(0.02)
            retried = presented_at(live, stored)[1]
            deadline = time.time() + 5
            while (row := (await rows(live.broker))["g1"][0]).lease_owner is not None:
                assert time.time() < deadline
                await asyncio.sleep(0.02)
        finally:
            await refresher.aclose()
        # Never before the lease ran out, and well within a second after (not 60 s).
        assert runs_out - 0.05 <= retried <= runs_out + 1.0, retried - runs_out
        assert row.lapsed_lease_owner is None
        events = (await live.service.get("/groups/g1/events")).json()["events"]
        taken_over = [r for r in caplog.records if "taking it over from " + DEAD in r.message]
        assert len(taken_over) == 1 and taken_over[0].levelno == logging.WARNING
        if grace:
            assert (row.status, row.version, row.failure_count) == ("connected", 2, 0)
            assert live.server.grace_reuses == 1 and live.server.reuse_detections == 0
            assert [e["kind"] for e in events] == ["refreshed", "connected"]
        else:
            assert (row.status, row.last_error) == ("reauth_required", "invalid_grant")
            assert live.server.reuse_detections == 1
            assert [e["kind"] for e in events] == ["reauth_required", "connected"]
            assert events[0]["detail"] == {"error": "invalid_grant", "reason": INTERRUPTED}
        print(f"\nretried {retried - runs_out:+.3f} s after the lease ran out "
              f"(margin {LAPSE_MARGIN} s)")


async def test_an_invalid_grant_without_a_takeover_gives_no_reason(
    refresh_live: Callable[..., Any],
) -> None:
    """A grant the user revoked at the provider: ``invalid_grant`` on a lease that was free
    is no interrupted refresh, and the event says only the error."""
    async with refresh_live(refresh={"interval_seconds": 60, "min_validity_seconds": 1}) as live:
        await connect(live, "g1")
        assert live.server.revoke_user_grants("alice") == 1
        await set_row(live.broker, "g1", next_refresh_at=live.broker.now())
        from broker.scheduler import sweep

        result = await sweep(live.broker)
        assert (result.claimed, result.failed) == (1, 1)
        events = (await live.service.get("/groups/g1/events")).json()["events"]
        assert events[0]["kind"] == "reauth_required"
        assert events[0]["detail"] == {"error": "invalid_grant"}


async def test_a_lease_released_in_time_brings_no_sweep_forward(
    refresh_live: Callable[..., Any],
) -> None:
    """A live holder releases its lease before it runs out: the watch, which looked again
    just after the lease would have run out, finds it gone and leaves the sweep alone (the
    row, due and free now, waits for the regular sweep 60 s on)."""
    async with refresh_live(
        provider={"timeout_seconds": TIMEOUT},
        refresh={"interval_seconds": 60, "min_validity_seconds": 1},
    ) as live:
        await connect(live, "g1")
        now = live.broker.now()
        await set_row(live.broker, "g1", lease_owner="4243-alive", next_refresh_at=now,
                      lease_expires_at=now + timedelta(seconds=2))
        refresher = Refresher(live.broker)
        refresher.start()
        try:
            await asyncio.sleep(1.0)
            await set_row(live.broker, "g1", lease_owner=None, lease_expires_at=None)
            await asyncio.sleep(2.5)  # past when the lease would have run out
        finally:
            await refresher.aclose()
        assert live.server.token_requests["refresh_token"] == 0
        assert (await rows(live.broker))["g1"][0].version == 1
