"""orchestrator instances (a newer one under an owner supersedes the older for good); the
worker types a lease's holder runs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lease_instances",
        sa.Column("instance", sa.String(length=128), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column(
            "superseded_by", sa.String(length=128), nullable=False, server_default=sa.text("''")
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", "instance"),
    )
    with op.batch_alter_table("leases", schema=None) as batch_op:
        # Existing leases: their holders did not say (they adopt any orphan, as before).
        batch_op.add_column(
            sa.Column("worker_types", sa.Text(), server_default=sa.text("''"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_column("worker_types")
    op.drop_table("lease_instances")
