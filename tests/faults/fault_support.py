"""Shared pieces of the fault tests: a database that fails on purpose, a second broker
(replica) on the same database, and what the authorization server and the store hold.

``DatabaseFaults`` hooks SQLAlchemy's ``before_cursor_execute`` on a broker's engine and
raises ``OperationalError`` (what a dropped connection or a failing server gives) for a
share of the statements, or for the next N statements matching a pattern, before they
reach the database. Nothing in the broker knows it is there.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from broker.config import Settings
from broker.runtime import Broker
from broker.store.models import Connection
from tests import oauth_support
from tests.oauth_support import Live

__all__ = [
    "DatabaseFaults",
    "advance",
    "connect",
    "injected_faults",
    "replica",
    "stored_rows",
]


class InjectedFault(Exception):
    """The DB-API error a lost connection would give (never reaches the database)."""


class DatabaseFaults:
    """Fail statements on ``broker``'s engine: a ``rate`` of all of them (seeded), and/or
    the next ``fail_next`` statements whose SQL matches ``pattern``."""

    def __init__(self, broker: Broker, *, rate: float = 0.0, seed: int = 0) -> None:
        self.engine = broker.database.engine.sync_engine
        self.rate = rate
        self.rng = random.Random(seed)
        self.injected = 0
        self.statements = 0
        self.failed_sql: list[str] = []
        self._targeted: list[tuple[re.Pattern[str], int]] = []
        self._kills: list[tuple[re.Pattern[str], int]] = []
        self.killed: list[int] = []
        event.listen(self.engine, "before_cursor_execute", self._before)

    def fail_next(self, pattern: str, n: int = 1) -> None:
        self._targeted.append((re.compile(pattern, re.I | re.S), n))

    def kill_next(self, pattern: str, n: int = 1) -> None:
        """PostgreSQL: terminate (``pg_terminate_backend``) the server process of the
        connection about to run the next ``n`` statements matching ``pattern``; the
        statement then meets a really dead connection."""
        self._kills.append((re.compile(pattern, re.I | re.S), n))

    def stop(self) -> None:
        """The database is healthy again (the hook stays, failing nothing)."""
        self.rate = 0.0
        self._targeted.clear()
        self._kills.clear()

    def remove(self) -> None:
        self.stop()
        if event.contains(self.engine, "before_cursor_execute", self._before):
            event.remove(self.engine, "before_cursor_execute", self._before)

    def _before(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
        executemany: bool,
    ) -> None:
        self.statements += 1
        if _take(self._kills, statement):
            self._kill(conn)
        if _take(self._targeted, statement):
            self._fail(statement, parameters)
        if self.rate and self.rng.random() < self.rate:
            self._fail(statement, parameters)

    def _kill(self, conn: Any) -> None:
        pid = conn.connection.dbapi_connection._connection.get_server_pid()
        url = self.engine.url.set(drivername="postgresql")
        sql = f"SELECT pg_terminate_backend({int(pid)}, 5000)"
        subprocess.run(  # blocking on purpose: the statement must meet a dead connection
            ["psql", url.render_as_string(hide_password=False), "-qAtc", sql],
            check=True, capture_output=True, timeout=10,
        )
        self.killed.append(pid)

    def _fail(self, statement: str, parameters: Any) -> None:
        self.injected += 1
        self.failed_sql.append(statement.split(None, 3)[0].upper())
        raise OperationalError(
            statement, parameters, InjectedFault("server closed the connection unexpectedly")
        )


def _take(rules: list[tuple[re.Pattern[str], int]], statement: str) -> bool:
    """Whether ``statement`` uses up one of ``rules`` (the first that matches)."""
    for i, (pattern, left) in enumerate(rules):
        if pattern.search(statement):
            if left <= 1:
                del rules[i]
            else:
                rules[i] = (pattern, left - 1)
            return True
    return False


@contextmanager
def injected_faults(broker: Broker, **kwargs: Any) -> Iterator[DatabaseFaults]:
    faults = DatabaseFaults(broker, **kwargs)
    try:
        yield faults
    finally:
        faults.remove()


def advance(broker: Broker, seconds: float) -> None:
    """Move one broker's clock (not the provider's) forward."""
    base = broker.clock
    broker.clock = lambda: base() + timedelta(seconds=seconds)


async def connect(live: Live, group_id: str) -> None:
    """The real popup flow for ``group_id`` (consent filled in as alice)."""
    async with live.browser() as browser:
        page = await live.popup(browser, group_id=group_id)
    message = oauth_support.page_data(page)["message"]
    assert message["status"] == "connected", page.text


async def stored_rows(broker: Broker) -> list[Connection]:
    async with broker.session() as db:
        return list(
            (await db.scalars(select(Connection).order_by(Connection.id))).all()
        )


@asynccontextmanager
async def replica(
    settings: Settings, *, before_open: Callable[[], Any] | None = None
) -> AsyncIterator[Broker]:
    """Another broker on the same database (another replica), closed afterwards."""
    if before_open is not None:
        before_open()
    other = await Broker.open(settings)
    try:
        yield other
    finally:
        await other.close()
