"""Storing refreshed tokens (``broker.writes.RefreshWriter``) on real SQLite and PostgreSQL:
refreshes finishing together share one transaction; each write keeps its own condition;
one failing write fails no other."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from broker.integrations import Group, register_custom_integration
from broker.runtime import Broker
from broker.store.repository import Refreshed

OWNER = "test-owner"


async def leased_rows(broker: Broker, count: int) -> list[Any]:
    """``count`` connections, each leased by OWNER; their rows as claimed."""
    rows = []
    for i in range(count):
        async with broker.session() as db, db.begin():
            await register_custom_integration(
                db, Group(f"g{i}"), "openweathermap", {"api_key": f"{i:032x}"}
            )
        async with broker.session() as db, db.begin():
            row = await broker.repository.claim(
                db, f"g{i}", "openweathermap", owner=OWNER,
                until=broker.now().replace(year=broker.now().year + 1),
            )
        assert row is not None
        rows.append(row)
    return rows


def refreshed(row: Any, key: str, *, version: int | None = None) -> Refreshed:
    return Refreshed(
        row.id, row.group_id, row.integration, row.version if version is None else version,
        {"api_key": key}, expires_at=None, next_refresh_at=None, lease_owner=OWNER,
    )


@contextmanager
def store_transactions(broker: Broker, fail_for: str | None = None) -> Iterator[list[int]]:
    """Counts committed transactions that stored a refreshed credential (how many rows
    each); with ``fail_for``, the store of that group's row raises OperationalError."""
    committed: list[int] = []
    engine = broker.database.engine.sync_engine

    def before(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.startswith("UPDATE connections SET status=") and "credential=" in statement:
            values = params.values() if isinstance(params, dict) else params
            if fail_for is not None and fail_for in values:
                raise OperationalError(statement, params, Exception("injected"))
            conn.info["stores"] = conn.info.get("stores", 0) + 1

    def commit(conn: Any) -> None:
        stores = conn.info.pop("stores", 0)
        if stores:
            committed.append(stores)

    def rollback(conn: Any) -> None:
        conn.info.pop("stores", None)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "commit", commit)
    event.listen(engine, "rollback", rollback)
    try:
        yield committed
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "commit", commit)
        event.remove(engine, "rollback", rollback)


async def stored_keys(broker: Broker, count: int) -> dict[str, str]:
    out = {}
    for i in range(count):
        got = await broker.tokens.get(
            f"g{i}", broker.registry.get("openweathermap"), use_cache=False
        )
        out[f"g{i}"] = got["api_key"]
    return out


async def test_refreshes_finishing_together_share_one_transaction(broker: Broker) -> None:
    rows = await leased_rows(broker, 20)
    with store_transactions(broker) as committed:
        results = await asyncio.gather(
            *(broker.tokens.writer.store(refreshed(r, f"new{i:029d}")) for i, r in
              enumerate(rows))
        )
    assert results == [True] * 20
    assert committed == [20]  # all queued before the first transaction began
    assert await stored_keys(broker, 20) == {f"g{i}": f"new{i:029d}" for i in range(20)}
    async with broker.session() as db:
        infos = [await broker.repository.info(db, f"g{i}", "openweathermap") for i in range(20)]
    assert {i.version for i in infos if i is not None} == {2}


async def test_each_write_keeps_its_own_condition(broker: Broker) -> None:
    """A row changed meanwhile (its version moved on) is not overwritten, and the other
    writes of the same transaction still land."""
    rows = await leased_rows(broker, 3)
    results = await asyncio.gather(
        broker.tokens.writer.store(refreshed(rows[0], "a" * 32)),
        broker.tokens.writer.store(refreshed(rows[1], "b" * 32, version=rows[1].version + 5)),
        broker.tokens.writer.store(refreshed(rows[2], "c" * 32)),
    )
    assert results == [True, False, True]
    keys = await stored_keys(broker, 3)
    assert keys == {"g0": "a" * 32, "g1": f"{1:032x}", "g2": "c" * 32}


async def test_one_failing_write_fails_no_other(broker: Broker) -> None:
    rows = await leased_rows(broker, 4)
    with store_transactions(broker, fail_for="g2") as committed:
        results = await asyncio.gather(
            *(broker.tokens.writer.store(refreshed(r, f"{i}" * 32)) for i, r in
              enumerate(rows)),
            return_exceptions=True,
        )
    assert [type(r).__name__ for r in results] == ["bool", "bool", "OperationalError", "bool"]
    assert [r for r in results if isinstance(r, bool)] == [True, True, True]
    assert committed == [1, 1, 1]  # the shared transaction failed; each was retried alone
    keys = await stored_keys(broker, 4)
    assert keys == {"g0": "0" * 32, "g1": "1" * 32, "g2": f"{2:032x}", "g3": "3" * 32}


async def test_a_caller_that_goes_away_does_not_lose_its_write(broker: Broker) -> None:
    (row,) = await leased_rows(broker, 1)
    caller = asyncio.create_task(broker.tokens.writer.store(refreshed(row, "z" * 32)))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(200):
        if (await stored_keys(broker, 1))["g0"] == "z" * 32:
            break
        await asyncio.sleep(0.01)
    assert (await stored_keys(broker, 1))["g0"] == "z" * 32
