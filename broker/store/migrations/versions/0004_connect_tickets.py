"""flow tickets, browser binding as a column, workspace names on connect sessions

A flow now begins as a ticket (``POST .../authorize``) and starts when a broker page
redeems the ticket (``POST /oauth/start``). Flows in progress from before this migration
were started the old way; they are dropped (a user in the middle of one starts again).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM oauth_flows")
    with op.batch_alter_table("oauth_flows") as batch:
        batch.add_column(sa.Column("ticket_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("browser_hash", sa.String(64), nullable=True))
        batch.create_index("ix_oauth_flows_ticket_hash", ["ticket_hash"], unique=True)
        batch.create_index("ix_oauth_flows_session_hash", ["session_hash"])
        batch.create_index("ix_oauth_flows_group_id", ["group_id"])
    with op.batch_alter_table("connect_sessions") as batch:
        batch.add_column(sa.Column("display_name", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("connect_sessions") as batch:
        batch.drop_column("display_name")
    op.execute("DELETE FROM oauth_flows")
    with op.batch_alter_table("oauth_flows") as batch:
        batch.drop_index("ix_oauth_flows_group_id")
        batch.drop_index("ix_oauth_flows_session_hash")
        batch.drop_index("ix_oauth_flows_ticket_hash")
        batch.drop_column("browser_hash")
        batch.drop_column("ticket_hash")
