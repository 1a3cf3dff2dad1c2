"""The one place that encrypts and decrypts credentials.

Everything above this module sees plaintext dicts; everything below sees Fernet tokens.
Methods take the caller's ``AsyncSession`` and never commit: the caller owns the
transaction, so a route that fails halfway leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..crypto import Keyring
from ..errors import CredentialCorrupt
from ..events import Recorded, record, record_many
from .models import PARKED, Connection, connections_table

if TYPE_CHECKING:
    from ..config import WebhookSettings

__all__ = [
    "ConnectionInfo",
    "Credential",
    "Refreshed",
    "Repository",
    "RotationBatch",
    "utcnow",
]


_c = connections_table.c
# Built once: a refresh stores its token through this statement (Core, bound parameters),
# so no statement is built, no cache key computed and no ORM bookkeeping done per row.
_STORE_REFRESHED = (
    update(connections_table)
    .where(
        _c.group_id == bindparam("b_group_id"),
        _c.integration == bindparam("b_integration"),
        _c.version == bindparam("b_version"),
        _c.lease_owner == bindparam("b_lease_owner"),
    )
    .values(
        credential=bindparam("b_credential"),
        key_id=bindparam("b_key_id"),
        version=_c.version + 1,
        status="connected",
        updated_at=bindparam("b_now"),
        expires_at=bindparam("b_expires_at"),
        next_refresh_at=bindparam("b_next_refresh_at"),
        lease_owner=None,
        lease_expires_at=None,
        lapsed_lease_owner=None,
        failure_count=0,
        last_error=None,
    )
    .returning(_c.id)
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _taking(owner: str, until: datetime) -> dict[str, Any]:
    """The values of a claim: ``owner`` leases the row until ``until``. A claim only takes
    a free lease or one that ran out, and releasing a lease clears its owner: an owner
    still set is a holder that never released it (``lapsed_lease_owner`` keeps it; SQL
    reads the row's values before the update on the right of SET)."""
    return {
        "lease_owner": owner,
        "lease_expires_at": until,
        "lapsed_lease_owner": Connection.lease_owner,
    }


@dataclass(frozen=True)
class ConnectionInfo:
    """A connection without its secret: safe to show and to log."""

    group_id: str
    integration: str
    auth_type: str
    status: str
    version: int
    hint: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    last_error: str | None = None

    @classmethod
    def of(cls, row: Connection) -> ConnectionInfo:
        return cls(
            group_id=row.group_id,
            integration=row.integration,
            auth_type=row.auth_type,
            status=row.status,
            version=row.version,
            hint=dict(row.hint or {}),
            created_at=row.created_at,
            updated_at=row.updated_at,
            expires_at=row.expires_at,
            last_error=row.last_error,
        )


@dataclass(frozen=True)
class Credential:
    """A decrypted credential and the row version it came from."""

    info: ConnectionInfo
    data: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Refreshed:
    """A refreshed credential to store (``Repository.store_refreshed``)."""

    row_id: int
    group_id: str
    integration: str
    version: int
    """The row version it was refreshed from."""
    data: dict[str, Any] = field(repr=False)
    expires_at: datetime | None
    next_refresh_at: datetime | None
    lease_owner: str
    kind: str = "refreshed"
    """The event to record: ``refreshed``, or ``recovered`` after failures."""


class Repository:
    def __init__(
        self,
        keyring: Keyring,
        clock: Callable[[], datetime] = utcnow,
        webhooks: Sequence[WebhookSettings] = (),
    ) -> None:
        self.keyring = keyring
        self.clock = clock
        self.webhooks = webhooks

    async def put(
        self,
        db: AsyncSession,
        group_id: str,
        integration: str,
        data: dict[str, Any],
        *,
        auth_type: str,
        hint: dict[str, Any] | None = None,
        expires_at: datetime | None = None,
        next_refresh_at: datetime | None = None,
    ) -> ConnectionInfo:
        """Store (or replace, atomically) the credential of one connection."""
        sealed = self.keyring.seal(group_id, integration, data)
        now = self.clock()
        values: dict[str, Any] = {
            "auth_type": auth_type,
            "status": "connected",
            "credential": sealed.token,
            "key_id": sealed.key_id,
            "hint": hint or {},
            "updated_at": now,
            "expires_at": expires_at,
            "next_refresh_at": next_refresh_at,
            "lease_owner": None,
            "lease_expires_at": None,
            "lapsed_lease_owner": None,
            "failure_count": 0,
            "last_error": None,
        }
        previous = await db.scalar(
            select(Connection.status).where(
                Connection.group_id == group_id, Connection.integration == integration
            )
        )
        dialect = db.bind.dialect.name if db.bind is not None else "sqlite"
        # The dialect's own INSERT (for ON CONFLICT), imported here: the other dialect's
        # module is never needed, and importing PostgreSQL's costs a SQLite start ~30 ms.
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(Connection)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(Connection)
        stmt = stmt.values(
            group_id=group_id, integration=integration, created_at=now, version=1, **values
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[Connection.group_id, Connection.integration],
            set_={**values, "version": Connection.version + 1},
        ).returning(Connection)
        row = (await db.execute(upsert)).scalar_one()
        kind = "recovered" if previous == "reauth_required" else "connected"
        await record(
            db, group_id=group_id, integration=integration, kind=kind, now=now,
            webhooks=self.webhooks, auth_type=auth_type,
        )
        return ConnectionInfo.of(row)

    async def get(self, db: AsyncSession, group_id: str, integration: str) -> Credential | None:
        """The decrypted credential, or None when there is no such connection.

        Raises CredentialCorrupt when the stored ciphertext does not open for this row.
        """
        row = await self._row(db, group_id, integration)
        if row is None:
            return None
        data = self.keyring.open(group_id, integration, row.credential)
        return Credential(info=ConnectionInfo.of(row), data=data)

    async def info(
        self, db: AsyncSession, group_id: str, integration: str
    ) -> ConnectionInfo | None:
        row = await self._row(db, group_id, integration)
        return None if row is None else ConnectionInfo.of(row)

    async def exists(self, db: AsyncSession, group_id: str, integration: str) -> bool:
        found = await db.scalar(
            select(Connection.id).where(
                Connection.group_id == group_id, Connection.integration == integration
            )
        )
        return found is not None

    async def list(self, db: AsyncSession, group_id: str) -> list[ConnectionInfo]:
        rows = await db.scalars(
            select(Connection).where(Connection.group_id == group_id).order_by(
                Connection.integration
            )
        )
        return [ConnectionInfo.of(r) for r in rows]

    async def delete(self, db: AsyncSession, group_id: str, integration: str) -> bool:
        """Remove a connection; True when there was one."""
        result = await db.execute(
            delete(Connection)
            .where(Connection.group_id == group_id, Connection.integration == integration)
            .returning(Connection.id)
        )
        removed = result.first() is not None
        if removed:
            await record(
                db, group_id=group_id, integration=integration, kind="disconnected",
                now=self.clock(), webhooks=self.webhooks,
            )
        return removed

    async def store_refreshed(
        self, db: AsyncSession, items: Sequence[Refreshed]
    ) -> Sequence[bool]:
        """Store refreshed credentials, each only if its row is still at the version it was
        refreshed from and ``lease_owner`` still holds the lease (which is released), with
        an event for each one stored. True for each stored, False where someone else
        changed the row meanwhile.
        """
        stored = {}
        now = self.clock()
        # In id order, as every statement locking several rows takes them (key rotation):
        # two transactions never wait for each other's rows in a cycle (PostgreSQL would
        # abort one as a deadlock).
        for item in sorted(items, key=lambda i: i.row_id):
            sealed = self.keyring.seal(item.group_id, item.integration, item.data)
            result = await db.execute(
                _STORE_REFRESHED,
                {
                    "b_group_id": item.group_id, "b_integration": item.integration,
                    "b_version": item.version, "b_lease_owner": item.lease_owner,
                    "b_credential": sealed.token, "b_key_id": sealed.key_id, "b_now": now,
                    "b_expires_at": item.expires_at, "b_next_refresh_at": item.next_refresh_at,
                },
            )
            stored[item.row_id] = result.first() is not None
        await record_many(
            db,
            [
                Recorded(
                    item.group_id, item.integration, item.kind, now,
                    {"expires_at": item.expires_at.isoformat() if item.expires_at else None},
                )
                for item in items if stored[item.row_id]
            ],
            webhooks=self.webhooks,
        )
        return [stored[item.row_id] for item in items]

    async def claim(
        self,
        db: AsyncSession,
        group_id: str,
        integration: str,
        *,
        owner: str,
        until: datetime,
    ) -> Connection | None:
        """Take the refresh lease on one connection if it is free (or its holder's lease
        ran out). Returns the row (with its current version) or None. The row's
        ``lapsed_lease_owner`` names the holder whose lease ran out unreleased, if it was
        taken over from one (see ``refresh.interrupted_by``)."""
        now = self.clock()
        row: Connection | None = (
            await db.execute(
                update(Connection)
                .where(
                    Connection.group_id == group_id,
                    Connection.integration == integration,
                    or_(Connection.lease_expires_at.is_(None), Connection.lease_expires_at < now),
                )
                .values(**_taking(owner, until))
                .returning(Connection)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        return row

    async def renew_lease(
        self, db: AsyncSession, group_id: str, integration: str, *, owner: str, until: datetime
    ) -> Connection | None:
        """Push ``owner``'s still-running lease out to ``until``. Returns the row, or None
        when ``owner`` no longer holds a live lease on it."""
        row: Connection | None = (
            await db.execute(
                update(Connection)
                .where(
                    Connection.group_id == group_id,
                    Connection.integration == integration,
                    Connection.lease_owner == owner,
                    Connection.lease_expires_at > self.clock(),
                )
                .values(lease_expires_at=until)
                .returning(Connection)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        return row

    async def claim_due(
        self, db: AsyncSession, *, owner: str, until: datetime, limit: int, skip_locked: bool
    ) -> Sequence[Connection]:
        """Lease up to ``limit`` connections whose ``next_refresh_at`` has come; returns
        their rows (as leased: the refresher needs no second read; ``lapsed_lease_owner`` as
        in ``claim``).

        The due-query walks ``ix_connections_next_refresh_at`` from the oldest due entry,
        so its cost depends on how many are due, not on how many connections exist.
        On PostgreSQL, ``FOR UPDATE SKIP LOCKED`` lets replicas claim disjoint batches.
        """
        now = self.clock()
        due = (
            select(Connection.id)
            .where(
                Connection.next_refresh_at <= now,
                Connection.status == "connected",
                or_(Connection.lease_expires_at.is_(None), Connection.lease_expires_at < now),
            )
            .order_by(Connection.next_refresh_at)
            .limit(limit)
        )
        if skip_locked:
            due = due.with_for_update(skip_locked=True)
        rows = await db.execute(
            update(Connection)
            .where(Connection.id.in_(due.scalar_subquery()))
            .values(**_taking(owner, until))
            .returning(Connection)
            .execution_options(synchronize_session=False)
        )
        return list(rows.scalars().all())

    async def next_lapse(
        self, db: AsyncSession, *, owner: str, after: datetime
    ) -> datetime | None:
        """When the first lease held by another holder than ``owner`` on a connection due
        for refresh runs out, among those running out after ``after`` (it may have run out
        already); None when there is none.

        A lease on a due row is a refresh in progress; if its holder stopped, the row waits
        for that lease to run out (``scheduler.Refresher`` sweeps again then). Like
        ``claim_due``, it walks the due range of ``ix_connections_next_refresh_at``: its
        cost depends on how many connections are due, not on how many exist.
        """
        lapse: datetime | None = await db.scalar(
            select(func.min(Connection.lease_expires_at)).where(
                Connection.next_refresh_at <= self.clock(),
                Connection.status == "connected",
                Connection.lease_expires_at > after,
                Connection.lease_owner != owner,
            )
        )
        return lapse

    async def release(
        self,
        db: AsyncSession,
        group_id: str,
        integration: str,
        *,
        owner: str,
        values: dict[str, Any] | None = None,
    ) -> bool:
        """Give the lease back (recording ``values``) if ``owner`` still holds it."""
        result = await db.execute(
            update(Connection)
            .where(
                Connection.group_id == group_id,
                Connection.integration == integration,
                Connection.lease_owner == owner,
            )
            .values(
                lease_owner=None, lease_expires_at=None, lapsed_lease_owner=None,
                **(values or {}),
            )
            .returning(Connection.id)
            .execution_options(synchronize_session=False)
        )
        return result.first() is not None

    async def park(self, db: AsyncSession, group_id: str, integration: str, *, owner: str) -> bool:
        """Give the lease back and stop scheduling the connection (its provider is not
        enabled here) until a broker that has the provider resumes it."""
        return await self.release(
            db, group_id, integration, owner=owner, values={"next_refresh_at": PARKED}
        )

    async def resume_parked(self, db: AsyncSession, integrations: Collection[str]) -> int:
        """Make the parked connections of ``integrations`` due now; how many there were.

        Walks only the parked range of ``ix_connections_next_refresh_at`` (and takes no
        write lock when none of those rows is for ``integrations``). They were parked when
        they fell due, so they are due still.
        """
        if not integrations:
            return 0
        parked = (
            Connection.next_refresh_at >= PARKED, Connection.integration.in_(list(integrations))
        )
        if await db.scalar(select(Connection.id).where(*parked).limit(1)) is None:
            return 0
        result = await db.execute(
            update(Connection)
            .where(*parked)
            .values(next_refresh_at=self.clock())
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def _row(self, db: AsyncSession, group_id: str, integration: str) -> Connection | None:
        row: Connection | None = await db.scalar(
            select(Connection)
            .where(Connection.group_id == group_id, Connection.integration == integration)
            .execution_options(populate_existing=True)
        )
        return row

    # --- key rotation -------------------------------------------------------------------

    async def rotate_batch(
        self, db: AsyncSession, *, after_id: int, batch_size: int
    ) -> RotationBatch:
        """Re-encrypt up to ``batch_size`` rows past ``after_id`` not yet under the primary key.

        Rows already under the primary key are skipped by the query, so a rotation that was
        interrupted resumes where it stopped. A row is written back only if its version is
        unchanged since it was read: a refresh landing meanwhile is never overwritten (it
        was sealed under the primary key anyway). Rows that do not decrypt are counted and
        left as they are.
        """
        primary = self.keyring.primary_key_id
        rows: Sequence[Any] = (
            await db.execute(
                select(Connection.id, Connection.credential, Connection.version)
                .where(Connection.key_id != primary, Connection.id > after_id)
                .order_by(Connection.id)
                .limit(batch_size)
            )
        ).all()
        batch = RotationBatch(last_id=after_id)
        for row_id, token, version in rows:
            batch.last_id = row_id
            batch.examined += 1
            try:
                sealed = self.keyring.rotate(token)
            except CredentialCorrupt:
                batch.corrupt.append(row_id)
                continue
            result = await db.execute(
                update(Connection)
                .where(Connection.id == row_id, Connection.version == version)
                .values(credential=sealed.token, key_id=sealed.key_id)
                .returning(Connection.id)
            )
            batch.changed += result.first() is not None
        return batch


@dataclass
class RotationBatch:
    last_id: int
    examined: int = 0
    changed: int = 0
    corrupt: list[int] = field(default_factory=list)
