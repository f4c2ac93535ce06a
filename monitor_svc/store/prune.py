"""``monitor-svc prune``: delete finished jobs older than a cutoff, whole trees at a time.

A manager's tree (its steps, children, step progress rows and job log) goes in one short transaction
per batch of managers, so live traffic is never blocked for long and a prune interrupted half
way leaves only whole trees behind. Live jobs, and finished jobs whose manager is still live,
are never touched. The keys of metadata writes older than the cutoff go too, whatever their
job: they only serve a client's retry, which comes within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, exists, select
from sqlalchemy.orm import aliased

from monitor_svc.store.models import (
    CounterRow,
    JobLogHeadRow,
    JobLogRow,
    JobRow,
    MetadataWriteRow,
    StepProgressRow,
)
from monitor_svc.store.tx import CHANGE_SEQ
from stepflow_common.status import LIVE, TERMINAL

DEFAULT_BATCH_MANAGERS = 100
_member = aliased(JobRow)


@dataclass(frozen=True, slots=True)
class PruneResult:
    managers: int
    jobs: int
    progress_rows: int
    log_lines: int = 0


def prune_finished(
    engine: Engine, older_than: datetime, batch_managers: int = DEFAULT_BATCH_MANAGERS
) -> PruneResult:
    managers = jobs = progress = log_lines = 0
    with engine.begin() as conn:
        conn.execute(delete(MetadataWriteRow).where(MetadataWriteRow.created_at < older_than))
    while True:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Like every monitor's write transaction, take the change_seq counter lock
                # first: the writers read child rows unlocked, and rely on no other writer
                # changing (here: deleting) a row between their read and their commit.
                conn.execute(
                    select(CounterRow.value).where(CounterRow.name == CHANGE_SEQ).with_for_update()
                )
            ids = list(
                conn.execute(
                    select(JobRow.id)
                    .where(
                        JobRow.kind == "manager",
                        JobRow.status.in_(sorted(s.value for s in TERMINAL)),
                        JobRow.finished_at.is_not(None),
                        JobRow.finished_at < older_than,
                        # A finished manager may still have a live descendant (a step handed
                        # to the monitor): such a tree waits for a later prune.
                        ~exists().where(
                            _member.manager_id == JobRow.id,
                            _member.status.in_(sorted(s.value for s in LIVE)),
                        ),
                    )
                    .order_by(JobRow.finished_at)
                    .limit(batch_managers)
                ).scalars()
            )
            if not ids:
                return PruneResult(managers, jobs, progress, log_lines)
            conn.execute(
                delete(MetadataWriteRow).where(
                    MetadataWriteRow.job_id.in_(
                        select(JobRow.id).where(JobRow.manager_id.in_(ids)).scalar_subquery()
                    )
                )
            )
            progress += conn.execute(
                delete(StepProgressRow).where(StepProgressRow.manager_id.in_(ids))
            ).rowcount
            log_lines += conn.execute(
                delete(JobLogRow).where(JobLogRow.manager_id.in_(ids))
            ).rowcount
            conn.execute(delete(JobLogHeadRow).where(JobLogHeadRow.manager_id.in_(ids)))
            jobs += conn.execute(delete(JobRow).where(JobRow.manager_id.in_(ids))).rowcount
            managers += len(ids)
