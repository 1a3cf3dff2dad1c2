"""The tables. Only ``repository`` reads or writes credentials; they are Fernet tokens here."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = ["PARKED", "Base", "Connection"]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime}


# ``next_refresh_at`` of a connection whose provider was not enabled when it fell due: far
# past any real time (never due), and in a range of the index of its own, so a broker that
# has the provider again finds exactly these rows (``Repository.resume_parked``).
PARKED = datetime(9999, 1, 1, tzinfo=UTC)


class Connection(Base):
    """One group's credential for one integration."""

    __tablename__ = "connections"
    __table_args__ = (
        UniqueConstraint("group_id", "integration"),
        Index("ix_connections_next_refresh_at", "next_refresh_at"),
        Index("ix_connections_key_id", "key_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(String(128))
    integration: Mapped[str] = mapped_column(String(64))
    auth_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(32), default="connected")
    # Fernet token over {"g": group_id, "i": integration, "d": credential}.
    credential: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(32))
    # Bumped on every change of the credential; caches and conditional writes key on it.
    version: Mapped[int] = mapped_column(Integer, default=1)
    # What may be shown of the credential (non-secret fields, last 4 of a secret).
    hint: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Refresh engine: when the access token expires, when to refresh it, who holds it.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_refresh_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set by the claim that took the current lease: the holder whose lease it took over,
    # which had run out unreleased (that holder stopped mid-refresh); NULL otherwise.
    lapsed_lease_owner: Mapped[str | None] = mapped_column(String(64))
    failure_count: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class ConnectSession(Base):
    """A short-lived browser grant over one group's integrations (stored hashed)."""

    __tablename__ = "connect_sessions"
    __table_args__ = (Index("ix_connect_sessions_expires_at", "expires_at"),)

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[str] = mapped_column(String(128))
    # None: every enabled integration; else the allow-list.
    integrations: Mapped[list[str] | None] = mapped_column(JSON)
    # The workspace's name as the host platform gave it: the connect page shows it, so a
    # person who opened someone else's link sees whose workspace it would connect to.
    display_name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AdminGrant(Base):
    """An operator's way into ``/admin`` (stored hashed): a one-time ``link`` from
    ``broker admin-link`` (5 minutes), redeemed once for a ``session`` (1 hour)."""

    __tablename__ = "admin_grants"
    __table_args__ = (Index("ix_admin_grants_expires_at", "expires_at"),)

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class OAuthFlow(Base):
    """One authorization-code flow in progress, keyed by the hash of its ``state``.

    Begins as a ticket (``ticket_hash`` set, no browser yet); started once, when a broker
    page redeems the ticket (``ticket_hash`` cleared, ``browser_hash`` set); consumed
    (deleted) exactly once by the callback, whatever the outcome.
    """

    __tablename__ = "oauth_flows"
    __table_args__ = (
        Index("ix_oauth_flows_expires_at", "expires_at"),
        Index("ix_oauth_flows_ticket_hash", "ticket_hash", unique=True),
        Index("ix_oauth_flows_session_hash", "session_hash"),
        Index("ix_oauth_flows_group_id", "group_id"),
    )

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[str] = mapped_column(String(128))
    integration: Mapped[str] = mapped_column(String(64))
    session_hash: Mapped[str | None] = mapped_column(String(64))
    # SHA-256 of the single-use ticket, until it is redeemed.
    ticket_hash: Mapped[str | None] = mapped_column(String(64))
    # SHA-256 of the nonce in the HttpOnly cookie of the browser that started the flow.
    browser_hash: Mapped[str | None] = mapped_column(String(64))
    # Fernet token over the state, the PKCE verifier and the per-connection settings.
    sealed: Mapped[str] = mapped_column(Text)
    issuer: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Event(Base):
    """Something that happened to a connection. Never holds a secret."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_group_id_id", "group_id", "id"),
        # Retention: the oldest events of a kind, as an index range (``retention``).
        Index("ix_events_kind_created_at", "kind", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(String(128))
    integration: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """One event to deliver to one configured webhook URL (an outbox row)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_next_attempt_at", "next_attempt_at"),
        # Retention: an event's deliveries, checked and deleted with it.
        Index("ix_webhook_deliveries_event_id", "event_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(BigId)
    url: Mapped[str] = mapped_column(String(2048))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # NULL once delivered or given up.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default="pending")
    last_error: Mapped[str | None] = mapped_column(Text)


# The tables, for Core statements on hot paths (no ORM bookkeeping).
connections_table = cast(Table, Connection.__table__)
events_table = cast(Table, Event.__table__)
webhook_deliveries_table = cast(Table, WebhookDelivery.__table__)
