"""children run by runners: the runner of a child's current attempt and the message it
claimed it from

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 04:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("runner", sa.String(length=128), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("claim_id", sa.String(length=128), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("claim_id")
        batch.drop_column("runner")
