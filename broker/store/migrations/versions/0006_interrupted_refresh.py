"""connections.lapsed_lease_owner: a refresh lease taken over from a holder that stopped

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: instant on PostgreSQL (no table rewrite), ALTER TABLE on SQLite.
    op.add_column("connections", sa.Column("lapsed_lease_owner", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("lapsed_lease_owner")
