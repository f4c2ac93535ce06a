"""One write transaction shared by a group of units of work (group commit).

Units read jobs through the cache (locked ``FOR UPDATE`` on PostgreSQL; SQLite's writer holds
the database lock from ``BEGIN IMMEDIATE``), replace them with new states, and the whole group
is written at ``flush``. Several calls on one hot manager therefore cost one read, one write
and one commit between them, and each still raises its version by one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, select, update

from monitor_svc.records import JobState, Progress, as_utc, utcnow
from monitor_svc.store import notify
from monitor_svc.store.models import CounterRow, JobRow, StepProgressRow
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally

CHANGE_SEQ = "change_seq"
IN_CHUNK = 500
_MISSING = object()

_JOB_COLUMNS = (
    JobRow.id,
    JobRow.kind,
    JobRow.parent_id,
    JobRow.manager_id,
    JobRow.name,
    JobRow.type,
    JobRow.status,
    JobRow.error,
    JobRow.end_reason,
    JobRow.metadata_json,
    JobRow.version,
    JobRow.change_seq,
    JobRow.step_index,
    JobRow.timeout_s,
    JobRow.deadline,
    JobRow.created_at,
    JobRow.started_at,
    JobRow.finished_at,
    JobRow.request_id,
    JobRow.owner,
)
JOB_SELECT = select(*_JOB_COLUMNS)
_T = cast(Table, JobRow.__table__)
# Statements built once: building and cache-keying a statement per call costs more than
# running it on the hot paths.
SELECT_JOB = JOB_SELECT.where(_T.c.id == bindparam("job_id"))
_SELECT_JOB_LOCKED = SELECT_JOB.with_for_update()
_SELECT_BY_REQUEST = JOB_SELECT.where(_T.c.request_id == bindparam("request_id"))
_SELECT_MANY = JOB_SELECT.where(_T.c.id.in_(bindparam("ids", expanding=True)))
_SELECT_MANY_LOCKED = _SELECT_MANY.with_for_update()
_UPDATE_JOB = (
    update(_T)
    .where(_T.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        end_reason=bindparam("b_end_reason"),
        metadata_json=bindparam("b_metadata_json"),
        version=bindparam("b_version"),
        change_seq=bindparam("b_change_seq"),
        deadline=bindparam("b_deadline"),
        started_at=bindparam("b_started_at"),
        finished_at=bindparam("b_finished_at"),
        owner=bindparam("b_owner"),
    )
)
_P = cast(Table, StepProgressRow.__table__)
_SELECT_PROGRESS = select(*_P.c).where(_P.c.step_id == bindparam("step_id"))
_SELECT_PROGRESS_LOCKED = _SELECT_PROGRESS.with_for_update()
_SELECT_MANAGER_PROGRESS = select(*_P.c).where(_P.c.manager_id == bindparam("manager_id"))
# Children change only these columns: no metadata to re-serialise per child event.
_UPDATE_CHILD = (
    update(_T)
    .where(_T.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        error=bindparam("b_error"),
        end_reason=bindparam("b_end_reason"),
        version=bindparam("b_version"),
        change_seq=bindparam("b_change_seq"),
        started_at=bindparam("b_started_at"),
        finished_at=bindparam("b_finished_at"),
    )
)
_UPDATE_PROGRESS = (
    update(_P)
    .where(_P.c.step_id == bindparam("b_step_id"))
    .values(
        pending=bindparam("b_pending"),
        running=bindparam("b_running"),
        completed=bindparam("b_completed"),
        failed=bindparam("b_failed"),
        cancelled=bindparam("b_cancelled"),
        sealed_count=bindparam("b_sealed_count"),
        handed=bindparam("b_handed"),
        grace_deadline=bindparam("b_grace_deadline"),
    )
)


def row_to_state(row: Any) -> JobState:
    return JobState(
        id=row.id,
        kind=_KIND[row.kind],
        parent_id=row.parent_id,
        manager_id=row.manager_id,
        name=row.name,
        type=row.type,
        status=_STATUS[row.status],
        error=row.error,
        end_reason=row.end_reason,
        metadata={} if row.metadata_json == "{}" else json.loads(row.metadata_json),
        version=row.version,
        change_seq=row.change_seq,
        step_index=row.step_index,
        timeout_s=row.timeout_s,
        deadline=as_utc(row.deadline),
        created_at=as_utc(row.created_at) or utcnow(),
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
        request_id=row.request_id,
        owner=row.owner,
    )


# Enum member -> its text, by dict lookup: ``member.value`` is a slow descriptor call and the
# event path converts a status per child.
_STATUS = {s.value: s for s in Status}
_KIND = {k.value: k for k in Kind}
_TEXT: dict[Status | Kind, str] = {**{s: s.value for s in Status}, **{k: k.value for k in Kind}}


def row_to_progress(row: Any) -> Progress:
    return Progress(
        row.step_id,
        row.manager_id,
        row.pending,
        row.running,
        row.completed,
        row.failed,
        row.cancelled,
        row.sealed_count,
        bool(row.handed),
        as_utc(row.grace_deadline),
    )


def state_to_insert(state: JobState) -> dict[str, Any]:
    return {
        "id": state.id,
        "kind": _TEXT[state.kind],
        "parent_id": state.parent_id,
        "manager_id": state.manager_id,
        "name": state.name,
        "type": state.type,
        "status": _TEXT[state.status],
        "error": state.error,
        "end_reason": state.end_reason,
        "metadata_json": json.dumps(state.metadata, separators=(",", ":"))
        if state.metadata
        else "{}",
        "version": state.version,
        "change_seq": state.change_seq,
        "step_index": state.step_index,
        "timeout_s": state.timeout_s,
        "deadline": state.deadline,
        "created_at": state.created_at,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "request_id": state.request_id,
        "owner": state.owner,
    }


class Tx:
    """The state of one group transaction: a cache of locked jobs and step progress rows."""

    def __init__(self, conn: Connection, *, lock_rows: bool) -> None:
        self.conn = conn
        self.now = utcnow()
        self._lock_rows = lock_rows
        self._jobs: dict[str, JobState | None] = {}
        self._dirty: set[str] = set()
        self._new: set[str] = set()
        self._progress: dict[str, Progress | None] = {}
        self._progress_dirty: set[str] = set()
        self._progress_new: set[str] = set()
        self._touched: set[str] = set()  # change_seq only (a manager whose counts moved)
        self._undo: list[tuple[str, str, Any]] = []
        self._seq: int | None = None
        self._manager_steps: dict[str, set[str]] = {}  # managers whose progress rows are loaded
        self._unit_progress: set[str] = set()  # progress rows this unit already copied
        self._full_rows: set[str] = set()  # jobs whose whole row (metadata too) is written
        self.sqlite = not lock_rows
        self.earliest_deadline: datetime | None = None  # wakes the deadline timer after commit
        self.after_commit: list[Callable[[], None]] = []

    # -- units -------------------------------------------------------------------------------
    def begin_unit(self) -> int:
        self._unit_progress.clear()
        return len(self._undo)

    def rollback_unit(self, mark: int) -> None:
        """Undo the cache changes of a unit that raised a domain error (it wrote no SQL)."""
        while len(self._undo) > mark:
            table, key, old = self._undo.pop()
            cache: dict[str, Any] = self._jobs if table == "job" else self._progress
            if old is _MISSING:
                cache.pop(key, None)
            else:
                cache[key] = old

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: str) -> JobState | None:
        if job_id in self._jobs:
            return self._jobs[job_id]
        stmt = _SELECT_JOB_LOCKED if self._lock_rows else SELECT_JOB
        row = self.conn.execute(stmt, {"job_id": job_id}).first()
        state = row_to_state(row) if row is not None else None
        self._jobs[job_id] = state
        return state

    def cached_job(self, job_id: str) -> JobState | None:
        return self._jobs.get(job_id)

    def job_by_request_id(self, request_id: str) -> JobState | None:
        for state in self._jobs.values():
            if state is not None and state.request_id == request_id:
                return state
        row = self.conn.execute(_SELECT_BY_REQUEST, {"request_id": request_id}).first()
        if row is None:
            return None
        return self.job(row.id)

    def put(self, state: JobState, *, status_only: bool = False) -> None:
        """Store a unit's new state; it is written (with a fresh change_seq) at flush.

        ``status_only`` (the child-event path) lets a child row be written without its
        metadata; any other put of the job in this transaction writes the whole row.
        """
        self._undo.append(("job", state.id, self._jobs.get(state.id, _MISSING)))
        if not status_only:
            self._full_rows.add(state.id)
        state.change_seq = self.seq
        if state.deadline is not None and not state.status.terminal:
            self._note_deadline(state.deadline)
        self._jobs[state.id] = state
        self._dirty.add(state.id)

    def insert(self, state: JobState) -> None:
        self.put(state)
        self._new.add(state.id)

    def touch(self, job_id: str) -> None:
        """Move a job's change_seq without changing its row (its steps' counts moved)."""
        self._touched.add(job_id)

    def children_of(self, step_id: str, *, live_only: bool) -> list[JobState]:
        """A step's children, loaded into the cache (locked) so a unit can change them."""
        return self._load_jobs(
            JobRow.parent_id == step_id, lambda s: s.parent_id == step_id, live_only=live_only
        )

    def live_children_of_manager(self, manager_id: str) -> list[JobState]:
        """Every live child under a manager, whichever step it belongs to (locked)."""
        return self._load_jobs(
            (JobRow.manager_id == manager_id) & (JobRow.kind == Kind.CHILD.value),
            lambda s: s.manager_id == manager_id and s.kind is Kind.CHILD,
            live_only=True,
        )

    def _load_jobs(
        self, where: Any, matches: Callable[[JobState], bool], *, live_only: bool
    ) -> list[JobState]:
        stmt = JOB_SELECT.where(where)
        if live_only:
            stmt = stmt.where(JobRow.status.in_(["pending", "running", "spawned"]))
        if self._lock_rows:
            stmt = stmt.with_for_update()
        found = []
        for row in self.conn.execute(stmt):
            cached = self._jobs.get(row.id)
            state = cached if cached is not None else row_to_state(row)
            self._jobs.setdefault(row.id, state)
            if not live_only or not state.status.terminal:
                found.append(state)
        # Jobs created earlier in this transaction are cached, not yet stored.
        seen = {s.id for s in found}
        for job_id in self._new:
            new = self._jobs.get(job_id)
            if (
                new is not None
                and matches(new)
                and job_id not in seen
                and (not live_only or not new.status.terminal)
            ):
                found.append(new)
        return found

    def child_states(self, child_ids: Iterable[str]) -> dict[str, JobState]:
        """Bulk-load children for the event path (cached ones win)."""
        wanted = [c for c in child_ids if c not in self._jobs]
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start : start + IN_CHUNK]
            stmt = _SELECT_MANY_LOCKED if self._lock_rows else _SELECT_MANY
            for row in self.conn.execute(stmt, {"ids": chunk}):
                self._jobs[row.id] = row_to_state(row)
            for child_id in chunk:
                self._jobs.setdefault(child_id, None)
        return {c: s for c in child_ids if (s := self._jobs.get(c)) is not None}

    # -- progress ----------------------------------------------------------------------------
    def progress(self, step_id: str) -> Progress | None:
        if step_id in self._progress:
            return self._progress[step_id]
        stmt = _SELECT_PROGRESS_LOCKED if self._lock_rows else _SELECT_PROGRESS
        row = self.conn.execute(stmt, {"step_id": step_id}).first()
        progress = row_to_progress(row) if row is not None else None
        self._progress[step_id] = progress
        return progress

    def load_manager_progress(self, manager_id: str) -> None:
        """All of a manager's step progress rows into the cache, in one query per transaction."""
        if manager_id in self._manager_steps:
            return
        steps = self._manager_steps[manager_id] = set()
        for row in self.conn.execute(_SELECT_MANAGER_PROGRESS, {"manager_id": manager_id}):
            steps.add(row.step_id)
            if row.step_id not in self._progress:
                self._progress[row.step_id] = row_to_progress(row)

    def tallies_for_manager(self, manager_id: str) -> dict[str, ChildTally]:
        """Live counts of a manager's steps as this transaction sees them."""
        self.load_manager_progress(manager_id)
        tallies = {}
        for step_id in self._manager_steps[manager_id]:
            progress = self._progress.get(step_id)
            if progress is not None:
                tallies[step_id] = progress.tally()
        return tallies

    def working_progress(self, step_id: str, manager_id: str) -> Progress:
        """A step's progress that the current unit may change in place: copied on the unit's
        first write (so a unit that fails can be undone), the same object after that."""
        current = self.progress(step_id)
        if current is not None and step_id in self._unit_progress:
            return current
        fresh = current.copy() if current is not None else Progress(step_id, manager_id)
        self.put_progress(fresh, new=current is None and step_id not in self._progress_new)
        self._unit_progress.add(step_id)
        return fresh

    def put_progress(self, progress: Progress, *, new: bool = False) -> None:
        self._undo.append(
            ("progress", progress.step_id, self._progress.get(progress.step_id, _MISSING))
        )
        self._progress[progress.step_id] = progress
        self._progress_dirty.add(progress.step_id)
        steps = self._manager_steps.get(progress.manager_id)
        if steps is not None:
            steps.add(progress.step_id)
        if progress.grace_deadline is not None:
            self._note_deadline(progress.grace_deadline)
        if new:
            self._progress_new.add(progress.step_id)

    def _note_deadline(self, when: datetime) -> None:
        if self.earliest_deadline is None or when < self.earliest_deadline:
            self.earliest_deadline = when

    # -- commit --------------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        """This transaction's change_seq. The counter row stays locked until commit, so
        change_seq order is commit order, across processes too."""
        if self._seq is None:
            counters = cast(Table, CounterRow.__table__)
            self._seq = self.conn.execute(
                update(counters)
                .where(counters.c.name == CHANGE_SEQ)
                .values(value=counters.c.value + 1)
                .returning(counters.c.value)
            ).scalar_one()
        return self._seq

    def changed_ids(self) -> set[str]:
        return self._dirty | self._touched

    def flush(self) -> None:
        if not (self._dirty or self._touched or self._progress_dirty):
            return
        seq = self.seq
        inserts, updates, child_updates = [], [], []
        for job_id in self._dirty:
            state = self._jobs.get(job_id)
            if state is None:  # put by a unit that was rolled back
                continue
            state.change_seq = seq
            if job_id in self._new:
                inserts.append(state_to_insert(state))
            elif state.kind is Kind.CHILD and job_id not in self._full_rows:
                child_updates.append(_child_update_params(state))
            else:
                updates.append(_update_params(state))
        if inserts:
            self.conn.execute(_T.insert(), inserts)
        if updates:
            self.conn.execute(_UPDATE_JOB, updates)
        if child_updates:
            self.conn.execute(_UPDATE_CHILD, child_updates)
        only_touched = sorted(self._touched - self._dirty)
        for start in range(0, len(only_touched), IN_CHUNK):
            chunk = only_touched[start : start + IN_CHUNK]
            self.conn.execute(update(_T).where(_T.c.id.in_(chunk)).values(change_seq=seq))
        new_rows, changed_rows = [], []
        for step_id in self._progress_dirty:
            progress = self._progress.get(step_id)
            if progress is None:
                continue
            if progress.grace_deadline is not None:
                self._note_deadline(progress.grace_deadline)
            if step_id in self._progress_new:
                new_rows.append(_progress_insert(progress))
            else:
                changed_rows.append(_progress_update(progress))
        if new_rows:
            self.conn.execute(_P.insert(), new_rows)
        if changed_rows:
            self.conn.execute(_UPDATE_PROGRESS, changed_rows)
        if not self.sqlite:
            notify.send(self.conn, self.changed_ids())


def _update_params(state: JobState) -> dict[str, Any]:
    return {
        "b_id": state.id,
        "b_status": _TEXT[state.status],
        "b_error": state.error,
        "b_end_reason": state.end_reason,
        "b_metadata_json": json.dumps(state.metadata, separators=(",", ":")),
        "b_version": state.version,
        "b_change_seq": state.change_seq,
        "b_deadline": state.deadline,
        "b_started_at": state.started_at,
        "b_finished_at": state.finished_at,
        "b_owner": state.owner,
    }


def _child_update_params(state: JobState) -> dict[str, Any]:
    return {
        "b_id": state.id,
        "b_status": _TEXT[state.status],
        "b_error": state.error,
        "b_end_reason": state.end_reason,
        "b_version": state.version,
        "b_change_seq": state.change_seq,
        "b_started_at": state.started_at,
        "b_finished_at": state.finished_at,
    }


def _progress_insert(p: Progress) -> dict[str, Any]:
    return {
        "step_id": p.step_id,
        "manager_id": p.manager_id,
        "pending": p.pending,
        "running": p.running,
        "completed": p.completed,
        "failed": p.failed,
        "cancelled": p.cancelled,
        "sealed_count": p.sealed_count,
        "handed": p.handed,
        "grace_deadline": p.grace_deadline,
    }


def _progress_update(p: Progress) -> dict[str, Any]:
    return {
        "b_step_id": p.step_id,
        "b_pending": p.pending,
        "b_running": p.running,
        "b_completed": p.completed,
        "b_failed": p.failed,
        "b_cancelled": p.cancelled,
        "b_sealed_count": p.sealed_count,
        "b_handed": p.handed,
        "b_grace_deadline": p.grace_deadline,
    }


def deadline_after(now: datetime, seconds: float | None) -> datetime | None:
    from datetime import timedelta

    return None if seconds is None else now + timedelta(seconds=seconds)
