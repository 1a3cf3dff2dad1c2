"""The repository and schema on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from cryptography.fernet import Fernet
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from broker.config import Settings
from broker.errors import CredentialCorrupt, SchemaOutOfDate
from broker.runtime import Broker
from broker.store.database import Database, _alembic_config

SECRET = "sk-live-STORE-CANARY-4e8d2b1f9a7c"


async def _put(broker: Broker, group: str, integration: str, data: dict[str, Any]) -> Any:
    async with broker.session() as db, db.begin():
        return await broker.repository.put(
            db, group, integration, data, auth_type="apikey", hint={"api_key": "…" + "x"}
        )


async def _raw_rows(broker: Broker) -> list[Any]:
    async with broker.session() as db:
        result = await db.execute(
            text(
                "SELECT group_id, integration, credential, key_id, version, hint "
                "FROM connections ORDER BY id"
            )
        )
        return list(result.all())


# --- put / get / exists / delete / list ---------------------------------------------------


async def test_put_get_exists_list_delete_round_trip(broker: Broker) -> None:
    repo = broker.repository
    info = await _put(broker, "g1", "openweathermap", {"api_key": SECRET})
    assert (info.group_id, info.integration, info.version) == ("g1", "openweathermap", 1)
    assert info.status == "connected" and info.auth_type == "apikey"
    assert info.created_at.tzinfo is not None

    async with broker.session() as db:
        assert await repo.exists(db, "g1", "openweathermap")
        assert not await repo.exists(db, "g1", "github")
        found = await repo.get(db, "g1", "openweathermap")
        assert found is not None
        assert found.data == {"api_key": SECRET}
        assert found.info.version == 1
        assert SECRET not in repr(found)  # the data field is kept out of repr
        assert await repo.get(db, "g1", "github") is None
        listed = await repo.list(db, "g1")
        assert [i.integration for i in listed] == ["openweathermap"]

    async with broker.session() as db, db.begin():
        assert await repo.delete(db, "g1", "openweathermap") is True
    async with broker.session() as db:
        assert not await repo.exists(db, "g1", "openweathermap")
        assert await repo.get(db, "g1", "openweathermap") is None
        assert await repo.list(db, "g1") == []


async def test_list_is_sorted_by_integration(broker: Broker) -> None:
    for name in ["zeta", "alpha", "mid"]:
        await _put(broker, "g1", name, {"k": name})
    async with broker.session() as db:
        assert [i.integration for i in await broker.repository.list(db, "g1")] == [
            "alpha",
            "mid",
            "zeta",
        ]


async def test_put_twice_replaces_in_place_and_bumps_version(broker: Broker) -> None:
    first = await _put(broker, "g1", "openweathermap", {"api_key": "first-key"})
    second = await _put(broker, "g1", "openweathermap", {"api_key": SECRET})
    assert (first.version, second.version) == (1, 2)
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    rows = await _raw_rows(broker)
    assert len(rows) == 1
    async with broker.session() as db:
        found = await broker.repository.get(db, "g1", "openweathermap")
    assert found is not None
    assert found.data == {"api_key": SECRET}
    assert found.info.version == 2


async def test_concurrent_puts_to_one_connection_leave_one_row_with_every_version(
    broker: Broker,
) -> None:
    n = 8
    infos = await asyncio.gather(
        *(_put(broker, "g1", "openweathermap", {"api_key": f"key-{i}"}) for i in range(n))
    )
    assert sorted(i.version for i in infos) == list(range(1, n + 1))
    rows = await _raw_rows(broker)
    assert len(rows) == 1
    assert rows[0].version == n
    async with broker.session() as db:
        found = await broker.repository.get(db, "g1", "openweathermap")
    assert found is not None
    # The stored credential is the one written by the put that got the last version.
    last = next(i for i in infos if i.version == n)
    assert found.info.updated_at == last.updated_at
    assert found.data["api_key"].startswith("key-")


async def test_group_and_integration_are_unique_in_the_table(broker: Broker) -> None:
    await _put(broker, "g1", "openweathermap", {"api_key": SECRET})
    row = (await _raw_rows(broker))[0]
    with pytest.raises(IntegrityError):
        async with broker.session() as db, db.begin():
            await db.execute(
                text(
                    "INSERT INTO connections (group_id, integration, auth_type, status, "
                    "credential, key_id, version, hint, created_at, updated_at, failure_count) "
                    "VALUES ('g1', 'openweathermap', 'apikey', 'connected', :c, :k, 1, '{}', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 0)"
                ),
                {"c": row.credential, "k": row.key_id},
            )
    assert len(await _raw_rows(broker)) == 1


async def test_delete_is_idempotent(broker: Broker) -> None:
    await _put(broker, "g1", "openweathermap", {"api_key": SECRET})
    results = []
    for _ in range(3):
        async with broker.session() as db, db.begin():
            results.append(await broker.repository.delete(db, "g1", "openweathermap"))
    assert results == [True, False, False]
    async with broker.session() as db, db.begin():
        assert await broker.repository.delete(db, "never", "existed") is False
    assert await _raw_rows(broker) == []


async def test_a_put_that_is_rolled_back_leaves_nothing(broker: Broker) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with broker.session() as db, db.begin():
            await broker.repository.put(db, "g1", "x", {"k": "v"}, auth_type="apikey")
            raise Boom
    assert await _raw_rows(broker) == []


# --- isolation between groups ---------------------------------------------------------------


async def test_one_group_never_sees_another_groups_connection(broker: Broker) -> None:
    repo = broker.repository
    await _put(broker, "g1", "openweathermap", {"api_key": "g1-secret"})
    await _put(broker, "g2", "github", {"token": "g2-secret"})
    async with broker.session() as db:
        assert [i.integration for i in await repo.list(db, "g1")] == ["openweathermap"]
        assert [i.integration for i in await repo.list(db, "g2")] == ["github"]
        assert await repo.get(db, "g2", "openweathermap") is None
        assert not await repo.exists(db, "g2", "openweathermap")
        assert await repo.get(db, "g1", "github") is None
    async with broker.session() as db, db.begin():
        assert await repo.delete(db, "g2", "openweathermap") is False
    async with broker.session() as db:
        found = await repo.get(db, "g1", "openweathermap")
        assert found is not None and found.data == {"api_key": "g1-secret"}


async def test_same_integration_in_two_groups_keeps_two_credentials(broker: Broker) -> None:
    await _put(broker, "g1", "openweathermap", {"api_key": "g1-secret"})
    await _put(broker, "g2", "openweathermap", {"api_key": "g2-secret"})
    async with broker.session() as db, db.begin():
        await broker.repository.delete(db, "g1", "openweathermap")
    async with broker.session() as db:
        assert await broker.repository.get(db, "g1", "openweathermap") is None
        found = await broker.repository.get(db, "g2", "openweathermap")
    assert found is not None and found.data == {"api_key": "g2-secret"}


async def test_ciphertext_copied_into_another_groups_row_does_not_open(broker: Broker) -> None:
    await _put(broker, "g1", "openweathermap", {"api_key": SECRET})
    await _put(broker, "g2", "openweathermap", {"api_key": "g2-own"})
    async with broker.session() as db, db.begin():
        await db.execute(
            text(
                "UPDATE connections SET credential = (SELECT credential FROM connections "
                "WHERE group_id = 'g1') WHERE group_id = 'g2'"
            )
        )
    async with broker.session() as db:
        with pytest.raises(CredentialCorrupt) as info:
            await broker.repository.get(db, "g2", "openweathermap")
    assert "group 'g2'" in str(info.value)
    assert SECRET not in str(info.value)


# --- what is on disk -------------------------------------------------------------------------


async def test_credential_column_holds_a_fernet_token_not_the_plaintext(
    broker: Broker, make_settings: Callable[..., Settings]
) -> None:
    await _put(broker, "g1", "openweathermap", {"api_key": SECRET})
    [row] = await _raw_rows(broker)
    assert SECRET not in row.credential
    assert SECRET not in str(row.hint)
    assert row.credential.startswith("gAAAAA")
    assert row.key_id == broker.keyring.primary_key_id
    key = broker.settings.encryption_keys[0].get_secret_value()
    payload = Fernet(key.encode()).decrypt(row.credential.encode())
    assert SECRET.encode() in payload  # the plaintext is only inside the token
    assert b'"g":"g1"' in payload and b'"i":"openweathermap"' in payload


# --- schema and migrations -------------------------------------------------------------------


async def test_broker_open_applies_migrations_and_leaves_none_pending(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    every = _all_revisions()
    assert every[0] == "0001"
    fresh = Database(store_url)
    try:
        assert not await fresh.has_tables()
        assert await fresh.pending_migrations() == every
    finally:
        await fresh.dispose()

    broker = await Broker.open(make_settings(database_url=store_url))
    try:
        assert await broker.database.has_tables()
        assert await broker.database.pending_migrations() == []
        async with broker.session() as db:
            versions = (await db.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert [v for (v,) in versions] == [every[-1]]
        assert await broker.database.upgrade() == []  # a second upgrade is a no-op
    finally:
        await broker.close()

    key = broker.settings.encryption_keys[0].get_secret_value()
    again = await Broker.open(make_settings(database_url=store_url, encryption_keys=[key]))
    try:
        assert await again.database.pending_migrations() == []
    finally:
        await again.close()


async def test_migrate_false_refuses_an_unmigrated_database(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    with pytest.raises(SchemaOutOfDate, match="broker db upgrade"):
        await Broker.open(make_settings(database_url=store_url), migrate=False)
    fresh = Database(store_url)
    try:
        assert not await fresh.has_tables()
    finally:
        await fresh.dispose()


def test_head_is_alembics_head() -> None:
    """``database.HEAD`` (what a start compares the database with, without Alembic) is
    the newest migration: a new migration must move it."""
    from broker.store.database import HEAD

    assert ScriptDirectory.from_config(_alembic_config()).get_heads() == [HEAD]


async def test_a_database_at_head_is_checked_without_importing_alembic(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path,
) -> None:
    """A start on a migrated database reads the recorded revision and goes on; a fresh
    process shows that Alembic was never imported (it is ~150 ms of every start)."""
    settings = make_settings(database_url=store_url)
    await (await Broker.open(settings)).close()  # migrated
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from broker.config import load_settings\n"
        "from broker.runtime import Broker\n"
        "async def main():\n"
        "    b = await Broker.open(load_settings(Path(sys.argv[1]), env={}))\n"
        "    assert await b.database.pending_migrations() == []\n"
        "    await b.close()\n"
        "asyncio.run(main())\n"
        "print('alembic' in sys.modules)\n"
    )
    assert settings.source is not None
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(settings.source), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(run.communicate(), timeout=120)
    assert run.returncode == 0, err.decode()[-3000:]
    assert out.decode().strip() == "False"


def _all_revisions() -> list[str]:
    """Every migration revision, oldest first (the tree may gain migrations)."""
    script = ScriptDirectory.from_config(_alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _schema(conn: Any) -> dict[str, Any]:
    insp = inspect(conn)
    return {
        "indexes": {i["name"]: i for i in insp.get_indexes("connections")},
        "uniques": insp.get_unique_constraints("connections"),
        "columns": {c["name"]: c for c in insp.get_columns("connections")},
    }


async def test_due_query_and_key_id_indexes_and_unique_constraint_exist(broker: Broker) -> None:
    async with broker.database.engine.connect() as conn:
        schema = await conn.run_sync(_schema)
    indexes = schema["indexes"]
    assert indexes["ix_connections_next_refresh_at"]["column_names"] == ["next_refresh_at"]
    assert indexes["ix_connections_key_id"]["column_names"] == ["key_id"]
    uniques = {u["name"]: u["column_names"] for u in schema["uniques"]}
    assert uniques.get("uq_connections_group_id_integration") == ["group_id", "integration"]
    assert schema["columns"]["credential"]["nullable"] is False
    assert schema["columns"]["key_id"]["nullable"] is False


async def test_migrations_match_the_models(broker: Broker) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from broker.store.models import Base

    def diff(conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))

    async with broker.database.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
