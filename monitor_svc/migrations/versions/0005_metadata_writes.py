"""keyed metadata writes (UpdateJobMetadata's request_id), so a retried write is applied once

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metadata_writes",
        sa.Column("job_id", sa.String(length=128), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "request_id"),
    )
    op.create_index("ix_metadata_writes_created_at", "metadata_writes", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_metadata_writes_created_at", table_name="metadata_writes")
    op.drop_table("metadata_writes")
