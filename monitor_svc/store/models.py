"""The monitor's tables (SQLAlchemy 2.0 typed models). Alembic migrations mirror these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID_LENGTH = 128
_LIVE_MANAGER = "kind = 'manager' AND status IN ('pending', 'running', 'spawned')"


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """A manager, step or child job. ``metadata_json`` is the JSON object clients merge into."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    manager_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    name: Mapped[str] = mapped_column(String(512), default="")
    type: Mapped[str] = mapped_column(String(128), default="")
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text, default="")
    end_reason: Mapped[str] = mapped_column(String(32), default="")
    metadata_json: Mapped[str] = mapped_column(Text, default="{}")
    version: Mapped[int] = mapped_column(BigInteger, default=1)
    change_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    step_index: Mapped[int | None] = mapped_column(Integer)
    timeout_s: Mapped[float | None]
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    request_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), unique=True)
    owner: Mapped[str] = mapped_column(String(ID_LENGTH), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    interruptions: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    runner: Mapped[str] = mapped_column(String(ID_LENGTH), default="", server_default=text("''"))
    claim_id: Mapped[str] = mapped_column(String(ID_LENGTH), default="", server_default=text("''"))
    orphan_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    definition: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))

    __table_args__ = (
        Index("ix_jobs_parent_id", "parent_id"),
        Index("ix_jobs_manager_id_kind", "manager_id", "kind"),
        Index("ix_jobs_created_at", "created_at"),
        Index("ix_jobs_owner_status", "owner", "status"),
        # Only live jobs carry a deadline the monitor must fire (an ended job's is cleared):
        # a few rows, whatever the history, and children (no deadline) never touch it. The
        # timer's queries name ``deadline`` so both databases use it.
        Index(
            "ix_jobs_deadline",
            "deadline",
            postgresql_where=text("deadline IS NOT NULL"),
            sqlite_where=text("deadline IS NOT NULL"),
        ),
        # An owner's live managers, oldest first (heartbeats, adoption, orphans): neither
        # the steps and children nor the ended managers of the history. The queries repeat
        # these terms as literals, so SQLite uses it.
        Index(
            "ix_jobs_live_managers",
            "owner",
            "created_at",
            postgresql_where=text(_LIVE_MANAGER),
            sqlite_where=text(_LIVE_MANAGER),
        ),
        # Only orphaned managers carry an orphan deadline (adoption and the orphan timeout).
        Index(
            "ix_jobs_orphan_deadline",
            "orphan_deadline",
            postgresql_where=text("orphan_deadline IS NOT NULL"),
            sqlite_where=text("orphan_deadline IS NOT NULL"),
        ),
    )


class StepProgressRow(Base):
    """Live child counts and seal state of one step, kept apart from the job row so a child
    event costs one small row update whatever the size of the manager's metadata."""

    __tablename__ = "step_progress"

    step_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    manager_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    pending: Mapped[int] = mapped_column(BigInteger, default=0)
    running: Mapped[int] = mapped_column(BigInteger, default=0)
    completed: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    cancelled: Mapped[int] = mapped_column(BigInteger, default=0)
    sealed_count: Mapped[int | None] = mapped_column(BigInteger)
    handed: Mapped[bool] = mapped_column(Boolean, default=False)
    # A handed-off step with no seal and no child by then ends `completed` (grace period).
    grace_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class CounterRow(Base):
    """Named monotonic counters; ``change_seq`` orders every committed change."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class LeaseRow(Base):
    """An orchestrator's lease (one per owner): its managers stay its own until
    ``expires_at``; the deadline timer orphans them after that."""

    __tablename__ = "leases"

    owner: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    instance: Mapped[str] = mapped_column(String(ID_LENGTH), default="")
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # The worker types its holder runs, comma-separated ("" = it did not say: any).
    worker_types: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))


class MetadataWriteRow(Base):
    """A keyed ``UpdateJobMetadata`` already applied (its ``request_id``), so a client's retry
    after a lost answer is recognised instead of applied again. Pruned with its job, and by
    age: a retry comes within seconds."""

    __tablename__ = "metadata_writes"

    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class LeaseInstanceRow(Base):
    """Every orchestrator instance (one process) that has held an owner's lease. The newest
    one supersedes the others for good (``superseded_by``), so an older process that wakes
    up can never take the owner's jobs back."""

    __tablename__ = "lease_instances"

    owner: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    instance: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    superseded_by: Mapped[str] = mapped_column(
        String(ID_LENGTH), default="", server_default=text("''")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobLogRow(Base):
    """One line of a manager's log. ``seq`` rises by one per manager in commit order (the
    writer that gives it holds the manager's log head until commit)."""

    __tablename__ = "job_log"

    manager_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    step_id: Mapped[str] = mapped_column(String(ID_LENGTH), default="")
    child_id: Mapped[str] = mapped_column(String(ID_LENGTH), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str] = mapped_column(String(8))
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    # A writer's key for the line: a resent line is recognised and stored once.
    line_key: Mapped[str | None] = mapped_column(String(ID_LENGTH))

    __table_args__ = (
        Index(
            "ux_job_log_line_key",
            "manager_id",
            "line_key",
            unique=True,
            postgresql_where=text("line_key IS NOT NULL"),
            sqlite_where=text("line_key IS NOT NULL"),
        ),
        # SQLite: the rows live in the primary key's b-tree (no rowid table beside it).
        {"sqlite_with_rowid": False},
    )


class JobLogHeadRow(Base):
    """A log's running totals: per manager (``step_id`` "") its last seq and bytes, and per
    step its line count; past the byte budget, a step's dropped lines are counted and its
    latest one held in ``tail`` (written, with the count, when the step ends)."""

    __tablename__ = "job_log_heads"

    manager_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    step_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    lines: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    tail: Mapped[str | None] = mapped_column(Text)
