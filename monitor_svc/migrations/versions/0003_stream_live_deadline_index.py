"""the live-deadline index holds only jobs that have a deadline

Children of the event stream never have one, and every status change of a live row in a
partial index on status is an index write: each child event paid one for nothing.

Revision ID: 0003_stream
Revises: 0002
Create Date: 2026-11-29 23:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_stream"
down_revision = "0002"
branch_labels = None
depends_on = None

_LIVE = "status NOT IN ('completed','failed','cancelled','skipped')"
_OLD = sa.text(_LIVE)
_NEW = sa.text(f"deadline IS NOT NULL AND {_LIVE}")


def _replace(old: sa.TextClause, new: sa.TextClause) -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_live_deadline", postgresql_where=old, sqlite_where=old)
        batch_op.create_index(
            "ix_jobs_live_deadline",
            ["deadline"],
            unique=False,
            postgresql_where=new,
            sqlite_where=new,
        )


def upgrade() -> None:
    _replace(_OLD, _NEW)


def downgrade() -> None:
    _replace(_NEW, _OLD)
