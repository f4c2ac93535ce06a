"""One write transaction shared by a group of units of work (group commit).

Units read jobs through the cache (on PostgreSQL under the change_seq counter lock, taken
first, and ``FOR UPDATE`` but for the stream's child rows; SQLite's writer holds
the database lock from ``BEGIN IMMEDIATE``), replace them with new states, and the whole group
is written at ``flush``. Several calls on one hot manager therefore cost one read, one write
and one commit between them, and each still raises its version by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Table,
    func,
    select,
    update,
)

from monitor_svc.log_lines import LogLine, describe_change
from monitor_svc.records import (
    JobState,
    Lease,
    Progress,
    as_utc,
    utcnow,
)
from monitor_svc.store import notify
from monitor_svc.store.bulk import statements
from monitor_svc.store.models import (
    CounterRow,
    JobRow,
)
from monitor_svc.store.statements import (
    JOB_SELECT,
    JOBS,
    LIVE_VALUES,
    METADATA_WRITES,
    PROGRESS,
    SELECT_BY_REQUEST,
    SELECT_JOB,
    SELECT_JOB_LOCKED,
    SELECT_WRITE,
    UPDATE_JOB,
    progress_insert_params,
    row_to_state,
    state_to_insert,
    update_params,
)
from monitor_svc.store.tx_leases import MISSING as _MISSING
from monitor_svc.store.tx_leases import LeaseRows
from monitor_svc.store.tx_log import LogRows
from monitor_svc.store.tx_progress import ProgressRows
from stepflow_common.limits import MAX_LOG_BYTES
from stepflow_common.status import Kind
from stepflow_common.step_outcome import ChildTally

CHANGE_SEQ = "change_seq"
IN_CHUNK = 500


LOG_CHANGE_PREFIX = "log:"
"""Changed ids naming a manager whose log grew (for the log's followers, on every replica)."""


class Tx(LeaseRows, LogRows, ProgressRows):
    """The state of one group transaction: a cache of locked jobs and step progress rows."""

    def __init__(
        self,
        conn: Connection,
        *,
        lock_rows: bool,
        now: datetime | None = None,
        log_limit_bytes: int = MAX_LOG_BYTES,
    ) -> None:
        self.conn = conn
        self.now = now or utcnow()
        self._lock_rows = lock_rows
        self._jobs: dict[str, JobState | None] = {}
        self._dirty: set[str] = set()
        self._new: set[str] = set()
        self._progress: dict[str, Progress | None] = {}
        self._progress_dirty: set[str] = set()
        self._progress_new: set[str] = set()
        self._touched: set[str] = set()  # change_seq only (a manager whose counts moved)
        self._undo: list[tuple[str, Any, Any]] = []
        self._seq: int | None = None
        self._manager_steps: dict[str, set[str]] = {}  # managers whose progress rows are loaded
        self._unit_progress: set[str] = set()  # progress rows this unit already copied
        self._full_rows: set[str] = set()  # jobs whose whole row (metadata too) is written
        self.sqlite = not lock_rows
        self.earliest_deadline: datetime | None = None  # wakes the deadline timer after commit
        self._leases: dict[str, Lease | None] = {}  # None: absent (or deleted here)
        self._lease_dirty: set[str] = set()
        self._metadata_writes: dict[tuple[str, str], int] = {}  # recorded here, to insert
        # A manager's tallies as last built, shared by the answers of the units after it
        # while no progress row changed (``_progress_epoch``) and the unit writes none.
        self._tallies: dict[str, tuple[int, dict[str, ChildTally]]] = {}
        self._progress_epoch = 0
        self._unit_writes_progress = False
        self._log: list[LogLine] = []
        self._unit_log_start = 0
        self.log_limit_bytes = log_limit_bytes
        self.log_grew: dict[str, int] = {}

    # -- units -------------------------------------------------------------------------------
    def begin_unit(self) -> int:
        self._unit_log_start = len(self._log)
        self._unit_progress.clear()
        self._unit_writes_progress = False
        return len(self._undo)

    def rollback_unit(self, mark: int) -> None:
        """Undo the cache changes of a unit that raised a domain error (it wrote no SQL)."""
        self._progress_epoch += 1
        self._rollback_log(self._unit_log_start)
        while len(self._undo) > mark:
            table, key, old = self._undo.pop()
            cache: dict[Any, Any]
            if table == "job":
                cache = self._jobs
            elif table == "progress":
                cache = self._progress
            elif table == "write":
                cache = self._metadata_writes
            else:
                cache = self._leases
            if old is _MISSING:
                cache.pop(key, None)
            else:
                cache[key] = old

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: str) -> JobState | None:
        if job_id in self._jobs:
            return self._jobs[job_id]
        stmt = SELECT_JOB_LOCKED if self._lock_rows else SELECT_JOB
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
        row = self.conn.execute(SELECT_BY_REQUEST, {"request_id": request_id}).first()
        if row is None:
            return None
        return self.job(row.id)

    def put(self, state: JobState, *, status_only: bool = False) -> None:
        """Store a unit's new state; it is written (with a fresh change_seq) at flush.

        ``status_only`` (the child-event path) lets a child row be written without its
        metadata; any other put of the job in this transaction writes the whole row.
        """
        old = self._jobs.get(state.id, _MISSING)
        self._undo.append(("job", state.id, old))
        for line in describe_change(None if old is _MISSING else old, state):  # type: ignore[arg-type]
            self.log(line)
        if not status_only:
            self._full_rows.add(state.id)
        state.change_seq = self.seq
        if state.deadline is not None and not state.status.terminal:
            self._note_deadline(state.deadline)
        if state.orphan_deadline is not None and not state.status.terminal:
            self._note_deadline(state.orphan_deadline)
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
            stmt = stmt.where(JobRow.status.in_(LIVE_VALUES))
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
        if wanted and self._lock_rows:
            _ = self.seq  # the counter lock before the unlocked read (taken already by Writer)
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start : start + IN_CHUNK]
            bulk = statements(self.conn.dialect)
            # No row lock: the counter lock this transaction took first already keeps every
            # other writer off these rows until commit (docs/design.md §6, "Locking").
            for state in bulk.select_jobs(self.conn, chunk):
                self._jobs[state.id] = state
            for child_id in chunk:
                self._jobs.setdefault(child_id, None)
        return {c: s for c in child_ids if (s := self._jobs.get(c)) is not None}

    # -- keyed metadata writes ------------------------------------------------------------------
    def metadata_write(self, job_id: str, request_id: str) -> int | None:
        found = self._metadata_writes.get((job_id, request_id))
        if found is not None:
            return found
        version = self.conn.execute(
            SELECT_WRITE, {"job_id": job_id, "request_id": request_id}
        ).scalar()
        return None if version is None else int(version)

    def record_metadata_write(self, job_id: str, request_id: str, version: int) -> None:
        key = (job_id, request_id)
        self._undo.append(("write", key, self._metadata_writes.get(key, _MISSING)))
        self._metadata_writes[key] = version

    def _flush_metadata_writes(self) -> None:
        if self._metadata_writes:
            rows = [
                {"job_id": j, "request_id": r, "version": v, "created_at": self.now}
                for (j, r), v in self._metadata_writes.items()
            ]
            self.conn.execute(METADATA_WRITES.insert(), rows)
            self._metadata_writes.clear()

    # -- the clock's work ----------------------------------------------------------------------
    def due_jobs(self) -> list[str]:
        stmt = select(JOBS.c.id).where(
            JOBS.c.deadline.is_not(None),
            JOBS.c.deadline <= self.now,
            JOBS.c.status.in_(LIVE_VALUES),
        )
        if self._lock_rows:
            # Two monitors on one database: each due deadline is claimed by exactly one of them.
            stmt = stmt.with_for_update(skip_locked=True)
        return list(self.conn.execute(stmt).scalars())

    def due_graces(self) -> list[str]:
        stmt = select(PROGRESS.c.step_id).where(
            PROGRESS.c.grace_deadline.is_not(None), PROGRESS.c.grace_deadline <= self.now
        )
        if self._lock_rows:
            stmt = stmt.with_for_update(skip_locked=True)
        return list(self.conn.execute(stmt).scalars())

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

    def serialise_with_database_clock(self) -> None:
        """PostgreSQL: take the change_seq counter lock first (so the transactions of several
        monitors serialise in one order and cannot deadlock) and take ``now`` from the
        database's clock, so every monitor replica stamps leases and deadlines alike."""
        counters = cast(Table, CounterRow.__table__)
        row = self.conn.execute(
            update(counters)
            .where(counters.c.name == CHANGE_SEQ)
            .values(value=counters.c.value + 1)
            .returning(counters.c.value, func.statement_timestamp())
        ).one()
        self._seq = row[0]
        self.now = as_utc(row[1]) or self.now

    def changed_ids(self) -> set[str]:
        changed = self._dirty | self._touched
        if self.log_grew:
            changed.update(LOG_CHANGE_PREFIX + m for m in self.log_grew)
        return changed

    def flush(self) -> None:
        self._flush_metadata_writes()
        self._flush_log()
        if not (self._dirty or self._touched or self._progress_dirty or self._lease_dirty):
            if self.log_grew and not self.sqlite:
                notify.send(self.conn, self.changed_ids())
            return
        seq = self.seq
        bulk = statements(self.conn.dialect)
        inserts, updates = [], []
        child_inserts: list[JobState] = []
        child_updates: list[JobState] = []
        child = Kind.CHILD
        new, full_rows = self._new, self._full_rows
        for job_id in self._dirty:
            state = self._jobs.get(job_id)
            if state is None:  # put by a unit that was rolled back
                continue
            state.change_seq = seq
            if job_id in new:
                if state.kind is child:
                    child_inserts.append(state)
                else:
                    inserts.append(state_to_insert(state))
            elif state.kind is child and job_id not in full_rows:
                child_updates.append(state)
            else:
                updates.append(update_params(state))
        if inserts:
            self.conn.execute(JOBS.insert(), inserts)
        if child_inserts:
            bulk.insert_children(self.conn, child_inserts)
        if updates:
            self.conn.execute(UPDATE_JOB, updates)
        if child_updates:
            bulk.update_children(self.conn, child_updates)
        only_touched = sorted(self._touched - self._dirty)
        for start in range(0, len(only_touched), IN_CHUNK):
            chunk = only_touched[start : start + IN_CHUNK]
            self.conn.execute(update(JOBS).where(JOBS.c.id.in_(chunk)).values(change_seq=seq))
        new_rows: list[dict[str, Any]] = []
        changed_rows: list[Progress] = []
        for step_id in self._progress_dirty:
            progress = self._progress.get(step_id)
            if progress is None:
                continue
            if progress.grace_deadline is not None:
                self._note_deadline(progress.grace_deadline)
            if step_id in self._progress_new:
                new_rows.append(progress_insert_params(progress))
            else:
                changed_rows.append(progress)
        if new_rows:
            self.conn.execute(PROGRESS.insert(), new_rows)
        if changed_rows:
            bulk.update_progress(self.conn, changed_rows)
        self._flush_leases()
        if not self.sqlite:
            notify.send(self.conn, self.changed_ids())
