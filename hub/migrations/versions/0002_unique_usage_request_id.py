"""Usage rows are unique per request id (a batch written again is not stored twice).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Duplicates can only be batches written twice before this revision: keep the first.
    op.execute(
        sa.text(
            "DELETE FROM usage WHERE id NOT IN "
            "(SELECT keep FROM (SELECT MIN(id) AS keep FROM usage GROUP BY request_id) AS firsts)"
        )
    )
    op.create_index("ux_usage_request_id", "usage", ["request_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_usage_request_id", table_name="usage")
