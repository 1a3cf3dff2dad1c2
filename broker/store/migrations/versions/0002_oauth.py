"""connect sessions and OAuth2 flows in progress

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from broker.store.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "connect_sessions",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("group_id", sa.String(128), nullable=False),
        sa.Column("integrations", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="pk_connect_sessions"),
    )
    op.create_index("ix_connect_sessions_expires_at", "connect_sessions", ["expires_at"])
    op.create_table(
        "oauth_flows",
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("group_id", sa.String(128), nullable=False),
        sa.Column("integration", sa.String(64), nullable=False),
        sa.Column("session_hash", sa.String(64), nullable=True),
        sa.Column("sealed", sa.Text(), nullable=False),
        sa.Column("issuer", sa.String(512), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("state_hash", name="pk_oauth_flows"),
    )
    op.create_index("ix_oauth_flows_expires_at", "oauth_flows", ["expires_at"])


def downgrade() -> None:
    op.drop_table("oauth_flows")
    op.drop_table("connect_sessions")
