"""Leases on batches (one hub replica sends an input or copies an output at a time) and
expiry of files (`expires_after`).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as table:  # SQLite alters by copying the table
        table.add_column(sa.Column("lease_owner", sa.String(64), nullable=True))
        table.add_column(sa.Column("lease_until", sa.Float, nullable=True))
        table.add_column(sa.Column("output_expires_after", sa.Float, nullable=True))
    with op.batch_alter_table("files") as table:
        table.add_column(sa.Column("expires_at", sa.Float, nullable=True))
    op.create_index("ix_files_expires_at", "files", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_files_expires_at", "files")
    with op.batch_alter_table("files") as table:
        table.drop_column("expires_at")
    with op.batch_alter_table("batches") as table:
        table.drop_column("output_expires_after")
        table.drop_column("lease_until")
        table.drop_column("lease_owner")
