"""Engine, sessions and migrations.

SQLite is the embedded default (WAL, a busy timeout, one writer at a time); PostgreSQL
(asyncpg) is for production and for several replicas. Migrations are Alembic's, run on the
broker's own connection; on PostgreSQL an advisory lock makes replicas that start together
take turns.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from .models import Connection

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

__all__ = ["HEAD", "Database"]

_MIGRATION_LOCK = 0x62726F6B  # "brok"

HEAD = "0007"
"""The newest migration (``migrations/versions``; a test checks it is Alembic's head). A
database already there needs no Alembic at all: a start reads one row and goes on, where
importing Alembic (and the SQL dialects it loads) costs ~150 ms (bench 9)."""


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return cfg


class Database:
    """The engine and the session factory. ``info`` is attached to every session."""

    def __init__(self, url: str, *, info: dict[str, Any] | None = None, echo: bool = False):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # A pooled connection to a server can die with the server (restart, failover):
        # check before use. A SQLite file cannot, and the check would double each read.
        # hide_parameters: a statement's parameters (ciphertext, hashes) are in no log line
        # and no error message, even with SQLAlchemy's loggers turned up (broker/logs.py).
        kwargs: dict[str, Any] = {
            "echo": echo, "pool_pre_ping": not self.is_sqlite, "hide_parameters": True,
        }
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            # Before each connection SQLite would open (and maybe create) the file: so it is
            # created 0600 at the first connection, and a start refused before that (a
            # malformed key) leaves no file behind.
            event.listen(
                self.engine.sync_engine, "do_connect", lambda *_: create_private_sqlite_file(url)
            )
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        # Copied into every session: how the integration API finds its broker from ``db``.
        self.info: dict[str, Any] = dict(info or {})
        self._writer = asyncio.Lock() if self.is_sqlite else None
        self.sessions = async_sessionmaker(
            self.engine, expire_on_commit=False, info=self.info, sync_session_class=BrokerSession
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction, for the refresh path's writes (the sweep's claims,
        stores of refreshed tokens). SQLite has one writer at a time: these writes take
        turns here, in asyncio, instead of in SQLite's busy handler (which sleeps 1 to
        100 ms per try while the writer holding the lock goes on)."""
        async with self._writer or nullcontext(), self.session() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()

    async def upgrade(self) -> list[str]:
        """Apply pending migrations; return the revisions applied."""
        if await self.at_head():
            return []
        async with self.engine.begin() as conn:
            if not self.is_sqlite:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            return await conn.run_sync(_upgrade)

    async def pending_migrations(self) -> list[str]:
        if await self.at_head():
            return []
        async with self.engine.connect() as conn:
            return await conn.run_sync(_pending)

    async def at_head(self) -> bool:
        """Whether the database's recorded revision is ``HEAD`` (one read, no Alembic)."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(_recorded) == {HEAD}

    async def count_not_under(self, key_id: str) -> int:
        """How many rows are sealed under a key other than ``key_id``."""
        async with self.session() as db:
            return int(
                await db.scalar(
                    select(func.count()).select_from(Connection).where(Connection.key_id != key_id)
                )
                or 0
            )

    async def server_time(self) -> datetime:
        """The database server's current time (UTC)."""
        async with self.engine.connect() as conn:
            value = (await conn.execute(text("SELECT clock_timestamp()"))).scalar_one()
        assert isinstance(value, datetime)
        return value.astimezone(UTC)

    async def has_tables(self) -> bool:
        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda c: inspect(c).has_table("connections"))

    async def stored_key_ids(self) -> dict[str, int]:
        """How many rows are sealed under each key id (empty when no table yet)."""
        if not await self.has_tables():
            return {}
        async with self.session() as db:
            rows = await db.execute(
                select(Connection.key_id, func.count()).group_by(Connection.key_id)
            )
            return {key: count for key, count in rows.all()}


def create_private_sqlite_file(url: str) -> None:
    """Create the SQLite database file of ``url`` empty with mode 0600, unless it exists.

    SQLite creates a missing database file 0644 (less the umask), and its ``-wal``,
    ``-shm`` and ``-journal`` files with the database file's mode. Created here first, the
    database and every file SQLite adds beside it are readable by the broker's user only,
    like the key file; that covers the first start, where the migrations (Alembic, on the
    broker's own engine) create the tables. A file that exists keeps its mode. Nothing
    happens for an in-memory database or a ``file:`` URI; a directory that does not exist
    is left for SQLite to report. Returns None: it runs as the engine's ``do_connect``
    listener, where a value returned would be taken for the connection.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # it exists, or SQLite will say why it cannot be opened
        return
    os.close(fd)


class BrokerSession(Session):
    """The broker's sessions: after a commit, tell the credential cache what changed, and
    run what was deferred to it (``after_commit``)."""


AFTER_COMMIT = "broker.after_commit"


def after_commit(db: AsyncSession, action: Callable[[], None]) -> None:
    """Run ``action()`` once ``db``'s transaction has committed (dropped on rollback). It
    runs inside the commit: it must only schedule work, and never raise."""
    db.info.setdefault(AFTER_COMMIT, []).append(action)


@event.listens_for(BrokerSession, "after_commit")
def _after_commit(session: Session) -> None:
    changed = session.info.pop("broker.changed", None)
    broker = session.info.get("broker")
    if changed and broker is not None:
        broker.tokens.cache.invalidate(changed)
    for action in session.info.pop(AFTER_COMMIT, ()):
        action()


@event.listens_for(BrokerSession, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("broker.changed", None)
    session.info.pop(AFTER_COMMIT, None)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _recorded(conn: SyncConnection) -> set[str]:
    """The revisions in Alembic's ``alembic_version`` table (none when it is missing)."""
    if not inspect(conn).has_table("alembic_version"):
        return set()
    return {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}


def _current(conn: SyncConnection) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    return set(MigrationContext.configure(conn).get_current_heads())


def _pending(conn: SyncConnection) -> list[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    current = _current(conn)
    lower = next(iter(current)) if current else "base"
    pending = [r.revision for r in script.iterate_revisions("heads", lower)]
    return [r for r in reversed(pending) if r not in current]


def _upgrade(conn: SyncConnection) -> list[str]:
    from alembic import command

    before = _pending(conn)
    cfg = _alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")
    return before
