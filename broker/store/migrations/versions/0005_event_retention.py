"""event retention: the indexes pruning walks; connections parked by older versions

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

``ix_events_kind_created_at`` lets the sweep delete the oldest events of a kind as an index
range; ``ix_webhook_deliveries_event_id`` finds an event's deliveries. Both are created
``IF NOT EXISTS``: on a large PostgreSQL ``events`` table, create them beforehand with
``CREATE INDEX CONCURRENTLY`` (same names and columns) so this migration does not hold
writes to the table while it builds them.

Connections of a provider that was disabled when they fell due were left with
``next_refresh_at`` NULL, and nothing rescheduled them when the provider came back. Those
rows (connected OAuth2 tokens with an expiry but no next refresh: no other state leaves
that) are marked parked now, so the broker that has the provider resumes them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.models import PARKED, UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_connections = sa.table(
    "connections",
    sa.column("status", sa.String()),
    sa.column("auth_type", sa.String()),
    sa.column("expires_at", UTCDateTime()),
    sa.column("next_refresh_at", UTCDateTime()),
)


def upgrade() -> None:
    op.create_index(
        "ix_events_kind_created_at", "events", ["kind", "created_at"], if_not_exists=True
    )
    op.create_index(
        "ix_webhook_deliveries_event_id", "webhook_deliveries", ["event_id"], if_not_exists=True
    )
    c = _connections.c
    op.execute(
        _connections.update()
        .where(
            c.next_refresh_at.is_(None),
            c.status == "connected",
            c.auth_type.in_(["oauth2", "oauth2_cc"]),
            c.expires_at.is_not(None),
        )
        .values(next_refresh_at=PARKED)
    )


def downgrade() -> None:
    c = _connections.c
    op.execute(
        _connections.update().where(c.next_refresh_at >= PARKED).values(next_refresh_at=None)
    )
    op.drop_index("ix_webhook_deliveries_event_id", "webhook_deliveries")
    op.drop_index("ix_events_kind_created_at", "events")
