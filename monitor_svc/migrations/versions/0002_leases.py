"""leases, attempts, interruptions, stored definitions, orphan deadlines

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 20:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ORPHANED = sa.text("orphan_deadline IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # Existing rows: no run counted yet, never interrupted, no definition, not orphaned.
        batch_op.add_column(
            sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(
            sa.Column("interruptions", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("orphan_deadline", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("definition", sa.JSON(none_as_null=True), nullable=True))
        batch_op.create_index(
            "ix_jobs_orphan_deadline",
            ["orphan_deadline"],
            unique=False,
            postgresql_where=_ORPHANED,
            sqlite_where=_ORPHANED,
        )
    op.create_table(
        "leases",
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("instance", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner"),
    )
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_leases_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_leases_expires_at"))
    op.drop_table("leases")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_jobs_orphan_deadline", postgresql_where=_ORPHANED, sqlite_where=_ORPHANED
        )
        batch_op.drop_column("definition")
        batch_op.drop_column("orphan_deadline")
        batch_op.drop_column("interruptions")
        batch_op.drop_column("attempt")
