"""the job log: one log per manager, its lines and its running totals

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_log",
        sa.Column("manager_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("step_id", sa.String(length=128), nullable=False),
        sa.Column("child_id", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("line_key", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("manager_id", "seq"),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ux_job_log_line_key",
        "job_log",
        ["manager_id", "line_key"],
        unique=True,
        postgresql_where=sa.text("line_key IS NOT NULL"),
        sqlite_where=sa.text("line_key IS NOT NULL"),
    )
    op.create_table(
        "job_log_heads",
        sa.Column("manager_id", sa.String(length=128), nullable=False),
        sa.Column("step_id", sa.String(length=128), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.BigInteger(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.Column("tail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("manager_id", "step_id"),
    )


def downgrade() -> None:
    op.drop_table("job_log_heads")
    op.drop_index("ux_job_log_line_key", table_name="job_log")
    op.drop_table("job_log")
