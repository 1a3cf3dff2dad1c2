"""Encryption keys end to end: the key file, wrong keys, rotation, and the CLI.

Everything runs against a real SQLite file and (with BROKER_TEST_DATABASE_URL) a real
PostgreSQL database; the CLI tests run ``python -m broker`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from broker.config import Settings
from broker.crypto import Keyring, Sealed, generate_key, key_id, parse_key
from broker.errors import EncryptionKeyError
from broker.runtime import Broker
from broker.store.database import Database
from broker.store.repository import Repository

INTEGRATION = "openweathermap"

# --- helpers ---------------------------------------------------------------------------------


def _db_path(settings: Settings) -> Path:
    path = settings.sqlite_path()
    assert path is not None
    return path


def _group(i: int) -> str:
    return f"g{i:03d}"


def _data(i: int) -> dict[str, str]:
    return {"api_key": f"secret-{i:03d}-{'x' * 20}"}


async def _seed(settings: Settings, n: int) -> Broker:
    """Open a broker, store ``n`` connections (one per group), return it still open."""
    broker = await Broker.open(settings)
    async with broker.session() as db, db.begin():
        for i in range(n):
            await broker.repository.put(db, _group(i), INTEGRATION, _data(i), auth_type="apikey")
    return broker


async def _seed_and_close(settings: Settings, n: int) -> None:
    broker = await _seed(settings, n)
    await broker.close()


async def _rows(url: str) -> list[tuple[Any, ...]]:
    """Every row of ``connections`` as stored, read without any key."""
    database = Database(url)
    try:
        async with database.session() as db:
            result = await db.execute(
                text(
                    "SELECT id, group_id, integration, credential, key_id, version "
                    "FROM connections ORDER BY id"
                )
            )
            return [tuple(r) for r in result.all()]
    finally:
        await database.dispose()


async def _alembic_versions(url: str) -> list[str]:
    database = Database(url)
    try:
        async with database.session() as db:
            return [v for (v,) in await db.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        await database.dispose()


async def _open_all(settings: Settings, n: int) -> None:
    """Open a broker with ``settings`` and check every seeded row decrypts to its data."""
    broker = await Broker.open(settings)
    try:
        async with broker.session() as db:
            for i in range(n):
                found = await broker.repository.get(db, _group(i), INTEGRATION)
                assert found is not None
                assert found.data == _data(i)
    finally:
        await broker.close()


def _files(db: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of the SQLite file and its -wal/-shm companions that exist."""
    out = {}
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db}{suffix}")
        if p.exists():
            out[suffix] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BROKER_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "broker", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Interrupted(Exception):
    pass


# --- the key file beside a SQLite database -----------------------------------------------------


async def test_first_run_without_keys_creates_a_0600_key_file_logs_it_and_reuses_it(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(encryption_keys=[])
    db = _db_path(settings)
    key_file = db.with_suffix(".key")
    assert not key_file.exists()

    caplog.set_level(logging.INFO, logger="broker")
    broker = await _seed(settings, 1)
    await broker.close()

    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    parse_key(key, where="test")  # a valid Fernet key
    assert broker.keyring.key_ids == [key_id(key.strip().encode())]
    created = [r for r in caplog.records if r.name == "broker" and str(key_file) in r.getMessage()]
    assert len(created) == 1
    assert created[0].levelno == logging.WARNING
    assert "0600" in created[0].getMessage()
    assert key.strip() not in caplog.text

    caplog.clear()
    again = await Broker.open(make_settings(encryption_keys=[]))
    try:
        assert again.keyring.key_ids == broker.keyring.key_ids
        async with again.session() as s:
            found = await again.repository.get(s, _group(0), INTEGRATION)
        assert found is not None and found.data == _data(0)
    finally:
        await again.close()
    assert key_file.read_text() == key
    assert str(key_file) not in caplog.text  # nothing created, nothing announced


async def test_key_file_setting_is_used_instead_of_the_one_beside_the_database(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    chosen = tmp_path / "keys" / "custom.key"
    settings = make_settings(encryption_keys=[], key_file=str(chosen))
    await _seed_and_close(settings, 1)
    assert chosen.exists()
    assert stat.S_IMODE(chosen.stat().st_mode) == 0o600
    assert not _db_path(settings).with_suffix(".key").exists()
    await _open_all(make_settings(encryption_keys=[], key_file=str(chosen)), 1)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_the_sqlite_files_never_contain_a_stored_secret(
    client: httpx.AsyncClient, broker: Broker
) -> None:
    secret = secrets.token_hex(16)
    r = await client.post(f"/groups/g1/integrations/custom/{INTEGRATION}", json={"api_key": secret})
    assert r.status_code == 200, r.text
    r = await client.get(f"/groups/g1/integrations/{INTEGRATION}/credentials")
    assert r.json() == {"credentials": {"api_key": secret}}

    db = _db_path(broker.settings)
    needle = secret.encode()
    while_open = _files(db)
    assert while_open, "the database file should exist"
    for suffix, (content, _) in while_open.items():
        assert needle not in content, f"plaintext secret found in {db}{suffix}"

    await broker.close()
    after = _files(db)
    everything = b"".join(content for content, _ in after.values())
    assert needle not in everything
    # Not vacuous: the committed row (a Fernet token) is in the files we searched.
    assert b"gAAAAA" in everything
    assert b"".join(c for c, _ in while_open.values()).count(b"gAAAAA") >= 1


# --- refusing to start with the wrong key, changing nothing ------------------------------------


async def test_missing_key_file_with_existing_data_refuses_and_changes_nothing(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(encryption_keys=[])
    await _seed_and_close(settings, 3)
    db = _db_path(settings)
    key_file = db.with_suffix(".key")
    key_file.unlink()
    before = _files(db)

    with pytest.raises(EncryptionKeyError) as info:
        await Broker.open(make_settings(encryption_keys=[]))
    message = str(info.value)
    assert str(key_file) in message
    assert "already holds data" in message
    assert "will not start with a new key" in message
    assert not key_file.exists()
    assert _files(db) == before


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_wrong_key_with_existing_data_refuses_names_the_key_id_and_changes_nothing(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    right, wrong = generate_key(), generate_key()
    await _seed_and_close(make_settings(database_url=store_url, encryption_keys=[right]), 3)
    settings = make_settings(database_url=store_url, encryption_keys=[wrong])
    rows, versions = await _rows(store_url), await _alembic_versions(store_url)
    files = _files(_db_path(settings)) if settings.is_sqlite else None

    with pytest.raises(EncryptionKeyError) as info:
        await Broker.open(settings)
    message = str(info.value)
    assert f"3 stored credential(s) are encrypted under key id(s) {key_id(right.encode())}" in (
        message
    )
    assert f"configured: {key_id(wrong.encode())}" in message
    assert "Nothing was changed" in message
    assert right not in message and wrong not in message

    assert await _rows(store_url) == rows
    assert await _alembic_versions(store_url) == versions
    if files is not None:
        assert _files(_db_path(settings)) == files
        assert not _db_path(settings).with_suffix(".key").exists()


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_key_check_runs_before_migrations(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """With a migration pending and the wrong key, the migration is not applied."""
    right, wrong = generate_key(), generate_key()
    broker = await _seed(make_settings(database_url=store_url, encryption_keys=[right]), 1)
    async with broker.session() as db, db.begin():
        # Make every migration pending again (the tables stay: applying them would fail).
        await db.execute(text("DELETE FROM alembic_version"))
    pending = await broker.database.pending_migrations()
    await broker.close()
    assert pending[0] == "0001"

    with pytest.raises(EncryptionKeyError, match="Nothing was changed"):
        await Broker.open(make_settings(database_url=store_url, encryption_keys=[wrong]))
    assert await _alembic_versions(store_url) == []


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_postgres_without_configured_keys_refuses_to_start(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    with pytest.raises(EncryptionKeyError, match="encryption_keys is empty"):
        await Broker.open(make_settings(database_url=store_url, encryption_keys=[]))
    database = Database(store_url)
    try:
        assert not await database.has_tables()
    finally:
        await database.dispose()


@pytest.mark.parametrize(
    ("keys", "where"),
    [
        (["not-a-key-SENTINEL-1234567890"], "encryption_keys[0]"),
        ([generate_key(), "not-a-key-SENTINEL-1234567890"], "encryption_keys[1]"),
        ([Fernet.generate_key().decode()[:-2] + "SENTINEL"], "encryption_keys[0]"),
    ],
    ids=["first", "second", "damaged"],
)
async def test_malformed_configured_key_is_refused_naming_it_before_the_database_is_touched(
    make_settings: Callable[..., Settings], keys: list[str], where: str
) -> None:
    settings = make_settings(encryption_keys=keys)
    with pytest.raises(EncryptionKeyError) as info:
        await Broker.open(settings)
    message = str(info.value)
    assert message.startswith(f"{where}: not a Fernet key")
    assert "SENTINEL" not in message
    assert not _db_path(settings).exists()


async def test_malformed_key_file_is_refused_naming_the_file(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(encryption_keys=[])
    key_file = _db_path(settings).with_suffix(".key")
    key_file.write_text("SENTINEL-not-a-key\n")
    with pytest.raises(EncryptionKeyError) as info:
        await Broker.open(settings)
    assert str(info.value).startswith(f"{key_file}: not a Fernet key")
    assert "SENTINEL" not in str(info.value)
    assert key_file.read_text() == "SENTINEL-not-a-key\n"


# --- rotation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_rotate_keys_moves_every_row_to_the_new_key(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    old, new = generate_key(), generate_key()
    n = 12
    await _seed_and_close(make_settings(database_url=store_url, encryption_keys=[old]), n)
    before = await _rows(store_url)

    broker = await Broker.open(make_settings(database_url=store_url, encryption_keys=[new, old]))
    try:
        result = await broker.rotate_keys(batch_size=5)
        assert result.changed == n
        assert result.corrupt == []
        assert result.key_id == key_id(new.encode())
        assert await broker.database.stored_key_ids() == {key_id(new.encode()): n}
    finally:
        await broker.close()

    after = await _rows(store_url)
    assert [r[:3] for r in after] == [r[:3] for r in before]  # same ids, groups, integrations
    assert [r[5] for r in after] == [r[5] for r in before]  # versions: contents did not change
    assert all(a[3] != b[3] for a, b in zip(after, before, strict=True))  # every token re-sealed
    # The old key can go: the new key alone opens every row.
    await _open_all(make_settings(database_url=store_url, encryption_keys=[new]), n)
    with pytest.raises(EncryptionKeyError):
        await Broker.open(make_settings(database_url=store_url, encryption_keys=[old]))


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_interrupted_rotation_resumes_without_losing_or_redoing_rows(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    old, new = generate_key(), generate_key()
    old_id, new_id = key_id(old.encode()), key_id(new.encode())
    n, batch = 30, 10
    await _seed_and_close(make_settings(database_url=store_url, encryption_keys=[old]), n)

    broker = await Broker.open(make_settings(database_url=store_url, encryption_keys=[new, old]))
    try:
        progress: list[int] = []

        def crash_after_first_batch(changed: int) -> None:
            progress.append(changed)
            raise Interrupted

        with pytest.raises(Interrupted):
            await broker.rotate_keys(batch_size=batch, after_batch=crash_after_first_batch)
        assert progress == [batch]
        # The first batch was committed before the crash; the rest is untouched.
        assert await broker.database.stored_key_ids() == {new_id: batch, old_id: n - batch}
        rows = await _rows(store_url)
        assert [r[4] for r in rows] == [new_id] * batch + [old_id] * (n - batch)

        seen: list[int] = []
        resumed = await broker.rotate_keys(batch_size=batch, after_batch=seen.append)
        assert resumed.changed == n - batch
        assert seen == [10, 20]
        assert progress[0] + resumed.changed == n  # every row exactly once
        assert await broker.database.stored_key_ids() == {new_id: n}

        nothing_left = await broker.rotate_keys(batch_size=batch)
        assert nothing_left.changed == 0
    finally:
        await broker.close()
    assert len(await _rows(store_url)) == n
    await _open_all(make_settings(database_url=store_url, encryption_keys=[new]), n)


class RacingKeyring(Keyring):
    """A real keyring that lets a test act between rotation's read and its write.

    ``Repository.rotate_batch`` reads a batch, calls ``keyring.rotate`` per row, then writes
    the row back only if its version is unchanged. ``before_rotate`` runs in that window.
    """

    def __init__(self, keys: Sequence[bytes], before_rotate: Callable[[str], None]) -> None:
        super().__init__(keys)
        self.before_rotate = before_rotate

    def rotate(self, token: str) -> Sealed:
        self.before_rotate(token)
        return super().rotate(token)


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_rotation_does_not_overwrite_a_row_written_after_it_was_read(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    """A refresh committed by another replica mid-batch survives the rotation.

    Bumping a version inside ``after_batch`` would not test this: that callback runs after
    the batch has committed, so the next batch simply reads the new version. Here the write
    lands on another connection between rotation's SELECT and its UPDATE of that very row.
    """
    old, new = generate_key(), generate_key()
    old_id, new_id = key_id(old.encode()), key_id(new.encode())
    n = 5
    await _seed_and_close(make_settings(database_url=store_url, encryption_keys=[old]), n)
    refreshed = {"api_key": "refreshed-by-the-other-replica"}
    target = (await _rows(store_url))[0]

    async def replica_put() -> None:
        # A replica still configured with only the old key refreshes the first row.
        database = Database(store_url)
        try:
            async with database.session() as db, db.begin():
                await Repository(Keyring([old.encode()])).put(
                    db, _group(0), INTEGRATION, refreshed, auth_type="apikey"
                )
        finally:
            await database.dispose()

    raced: list[str] = []

    def race(token: str) -> None:
        if token == target[3] and not raced:
            raced.append(token)
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    asyncio.run(replica_put())
                except BaseException as exc:
                    failure.append(exc)

            worker = threading.Thread(target=run)
            worker.start()
            worker.join(timeout=60)
            assert not worker.is_alive() and not failure, failure

    broker = await Broker.open(make_settings(database_url=store_url, encryption_keys=[new, old]))
    try:
        broker.repository.keyring = RacingKeyring([new.encode(), old.encode()], race)
        result = await broker.rotate_keys(batch_size=n)
        assert raced
        assert result.changed == n - 1  # the raced row was not written back
        row = (await _rows(store_url))[0]
        assert row[0] == target[0]
        assert row[5] == 2 and row[4] == old_id  # the replica's write, as it left it
        async with broker.session() as db:
            found = await broker.repository.get(db, _group(0), INTEGRATION)
        assert found is not None and found.data == refreshed

        # A rerun picks the row up, keeping the refreshed credential.
        broker.repository.keyring = broker.keyring
        again = await broker.rotate_keys(batch_size=n)
        assert again.changed == 1
        assert await broker.database.stored_key_ids() == {new_id: n}
    finally:
        await broker.close()
    only_new = await Broker.open(make_settings(database_url=store_url, encryption_keys=[new]))
    try:
        async with only_new.session() as db:
            found = await only_new.repository.get(db, _group(0), INTEGRATION)
            assert found is not None and found.data == refreshed
            assert found.info.version == 2
            for i in range(1, n):
                other = await only_new.repository.get(db, _group(i), INTEGRATION)
                assert other is not None and other.data == _data(i)
    finally:
        await only_new.close()


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_rotation_counts_and_skips_a_row_that_does_not_decrypt(
    store_url: str, make_settings: Callable[..., Settings]
) -> None:
    old, new = generate_key(), generate_key()
    n = 4
    await _seed_and_close(make_settings(database_url=store_url, encryption_keys=[old]), n)
    broker = await Broker.open(make_settings(database_url=store_url, encryption_keys=[new, old]))
    try:
        async with broker.session() as db, db.begin():
            await db.execute(
                text("UPDATE connections SET credential = 'gAAAAAgarbage' WHERE group_id = :g"),
                {"g": _group(1)},
            )
        bad_id = (await _rows(store_url))[1][0]
        result = await broker.rotate_keys(batch_size=2)
        assert result.changed == n - 1
        assert result.corrupt == [bad_id]
        bad = (await _rows(store_url))[1]
        assert bad[3] == "gAAAAAgarbage" and bad[4] == key_id(old.encode())
    finally:
        await broker.close()


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_keys_generate_prints_a_new_valid_fernet_key(tmp_path: Path) -> None:
    first = _cli("keys", "generate", cwd=tmp_path)
    second = _cli("keys", "generate", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    key = first.stdout.strip()
    assert first.stdout == key + "\n"
    assert len(key) == 44
    assert parse_key(key, where="stdout") == key.encode()
    token = Fernet(key.encode()).encrypt(b"x")
    assert Fernet(key.encode()).decrypt(token) == b"x"
    assert second.stdout.strip() != key


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_cli_keys_rotate_reports_rows_changed_and_exits_0(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    old, new = generate_key(), generate_key()
    n = 5
    await _seed_and_close(make_settings(database_url=store_url, encryption_keys=[old]), n)
    make_settings(database_url=store_url, encryption_keys=[new, old])
    config = tmp_path / "config.yaml"

    done = await asyncio.to_thread(
        _cli, "keys", "rotate", "--config", config, "--batch-size", "2", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    new_id = key_id(new.encode())
    assert done.stdout.strip() == f"re-encrypted {n} row(s) under key {new_id}"
    # Not a terminal: plain progress lines on stderr, one per batch here (5 rows).
    assert [line for line in done.stderr.splitlines() if line.startswith("re-encrypting")] == [
        "re-encrypting: 2 of 5", "re-encrypting: 4 of 5", "re-encrypting: 5 of 5"]
    assert new not in done.stdout + done.stderr and old not in done.stdout + done.stderr

    await _open_all(make_settings(database_url=store_url, encryption_keys=[new]), n)

    make_settings(database_url=store_url, encryption_keys=[new, old])
    rerun = await asyncio.to_thread(_cli, "keys", "rotate", "--config", config, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip() == f"re-encrypted 0 row(s) under key {new_id}"


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_cli_refuses_to_start_on_rows_under_an_unknown_key(
    store_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    right, wrong = generate_key(), generate_key()
    await _seed_and_close(make_settings(database_url=store_url, encryption_keys=[right]), 2)
    settings = make_settings(database_url=store_url, encryption_keys=[wrong])
    rows = await _rows(store_url)

    done = await asyncio.to_thread(
        _cli, "db", "upgrade", "--config", tmp_path / "config.yaml", cwd=tmp_path
    )
    assert done.returncode == 1
    assert "database is up to date" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("broker: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("broker: 2 stored credential(s) are encrypted under key id(s) ")
    assert key_id(right.encode()) in done.stderr
    assert "Traceback" not in done.stderr
    assert right not in done.stderr and wrong not in done.stderr
    assert await _rows(store_url) == rows
    if settings.is_sqlite:
        assert not _db_path(settings).with_suffix(".key").exists()


async def test_cli_keys_rotate_exits_1_and_names_rows_that_do_not_decrypt(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    old, new = generate_key(), generate_key()
    settings = make_settings(encryption_keys=[old])
    await _seed_and_close(settings, 3)
    rows = await _rows(settings.database_url)
    database = Database(settings.database_url)
    try:
        async with database.session() as db, db.begin():
            await db.execute(
                text("UPDATE connections SET credential = 'gAAAAAgarbage' WHERE id = :i"),
                {"i": rows[2][0]},
            )
    finally:
        await database.dispose()
    make_settings(encryption_keys=[new, old])

    done = await asyncio.to_thread(
        _cli, "keys", "rotate", "--config", tmp_path / "config.yaml", cwd=tmp_path
    )
    assert done.returncode == 1
    assert f"re-encrypted 2 row(s) under key {key_id(new.encode())}" in done.stdout
    assert (
        f"1 row(s) did not decrypt and were left as they are (connection ids [{rows[2][0]}])"
        in (done.stderr)
    )
