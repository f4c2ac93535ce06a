"""deadline index without the live children; an owner's live managers indexed apart

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 23:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_LIVE_ONLY = sa.text("status NOT IN ('completed','failed','cancelled','skipped')")
_WITH_DEADLINE = sa.text("deadline IS NOT NULL")
_LIVE_MANAGERS = sa.text("kind = 'manager' AND status IN ('pending', 'running', 'spawned')")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # Held every live child (no deadline) and matched no query on SQLite, whose planner
        # cannot prove the timer's `status IN (...)` implies it: the timer scanned the table.
        batch_op.drop_index(
            "ix_jobs_live_deadline", postgresql_where=_LIVE_ONLY, sqlite_where=_LIVE_ONLY
        )
        batch_op.create_index(
            "ix_jobs_deadline",
            ["deadline"],
            unique=False,
            postgresql_where=_WITH_DEADLINE,
            sqlite_where=_WITH_DEADLINE,
        )
        batch_op.create_index(
            "ix_jobs_live_managers",
            ["owner", "created_at"],
            unique=False,
            postgresql_where=_LIVE_MANAGERS,
            sqlite_where=_LIVE_MANAGERS,
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_jobs_live_managers", postgresql_where=_LIVE_MANAGERS, sqlite_where=_LIVE_MANAGERS
        )
        batch_op.drop_index(
            "ix_jobs_deadline", postgresql_where=_WITH_DEADLINE, sqlite_where=_WITH_DEADLINE
        )
        batch_op.create_index(
            "ix_jobs_live_deadline",
            ["deadline"],
            unique=False,
            postgresql_where=_LIVE_ONLY,
            sqlite_where=_LIVE_ONLY,
        )
