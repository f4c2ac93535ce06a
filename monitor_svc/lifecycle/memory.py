"""The lifecycle's unit of work over plain dicts: the rules run in microseconds, with no
database, so each rule can be tested on its own. The same tests run against the SQL unit of
work (``store.tx.Tx``), which keeps the two in step.

``MemoryDatabase.run`` is one transaction holding one unit: its writes are kept in the unit
until it returns, and dropped if it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

from monitor_svc.log_lines import LogLine, describe_change
from monitor_svc.records import InstanceRecord, JobState, Lease, Progress, utcnow
from stepflow_common.status import Kind
from stepflow_common.step_outcome import ChildTally

T = TypeVar("T")


class MemoryDatabase:
    """Committed jobs and step progress, a change_seq counter and a clock the caller moves."""

    def __init__(self, now: datetime | None = None) -> None:
        self.jobs: dict[str, JobState] = {}
        self.progress: dict[str, Progress] = {}
        self.change_seq = 0
        self.now = now or utcnow()
        self.leases: dict[str, Lease] = {}
        self.instances: dict[tuple[str, str], InstanceRecord] = {}
        self.metadata_writes: dict[tuple[str, str], int] = {}
        self.log: list[LogLine] = []  # committed lines, in order (no seq, bounds or keys here)

    def run(self, unit: Callable[[MemoryUnitOfWork], T]) -> T:
        uow = MemoryUnitOfWork(self)
        result = unit(uow)
        uow.commit()
        return result


class MemoryUnitOfWork:
    def __init__(self, db: MemoryDatabase) -> None:
        self._db = db
        self.now = db.now
        self._seq = db.change_seq + 1
        self._jobs: dict[str, JobState] = {}
        self._progress: dict[str, Progress] = {}
        self._touched: set[str] = set()
        self._leases: dict[str, Lease | None] = {}  # None: deleted in this unit
        self._metadata_writes: dict[tuple[str, str], int] = {}
        self._log: list[LogLine] = []

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: str) -> JobState | None:
        found = self._jobs.get(job_id)
        return found if found is not None else self._db.jobs.get(job_id)

    def cached_job(self, job_id: str) -> JobState | None:
        return self.job(job_id)

    def job_by_request_id(self, request_id: str) -> JobState | None:
        return next((j for j in self._all_jobs() if j.request_id == request_id), None)

    def child_states(self, child_ids: Iterable[str]) -> dict[str, JobState]:
        return {c: s for c in child_ids if (s := self.job(c)) is not None}

    def children_of(self, step_id: str, *, live_only: bool) -> list[JobState]:
        return [
            j
            for j in self._all_jobs()
            if j.parent_id == step_id and not (live_only and j.status.terminal)
        ]

    def live_children_of_manager(self, manager_id: str) -> list[JobState]:
        return [
            j
            for j in self._all_jobs()
            if j.manager_id == manager_id and j.kind is Kind.CHILD and not j.status.terminal
        ]

    def put(self, state: JobState, *, status_only: bool = False) -> None:
        for line in describe_change(self.job(state.id), state):
            self.log(line)
        state.change_seq = self._seq
        self._jobs[state.id] = state

    def insert(self, state: JobState) -> None:
        if self.job(state.id) is not None:
            raise KeyError(f"job {state.id} exists")  # a primary-key violation in SQL
        self.put(state)

    def touch(self, job_id: str) -> None:
        self._touched.add(job_id)

    def log(self, line: LogLine) -> None:
        self._log.append(line)

    def stored_log_keys(self, manager_id: str, keys: list[str]) -> set[str]:
        wanted = set(keys)
        return {
            line.key
            for line in [*self._db.log, *self._log]
            if line.manager_id == manager_id and line.key in wanted and line.key is not None
        }

    def metadata_write(self, job_id: str, request_id: str) -> int | None:
        key = (job_id, request_id)
        found = self._metadata_writes.get(key)
        return found if found is not None else self._db.metadata_writes.get(key)

    def record_metadata_write(self, job_id: str, request_id: str, version: int) -> None:
        self._metadata_writes[(job_id, request_id)] = version

    def _all_jobs(self) -> list[JobState]:
        merged = {**self._db.jobs, **self._jobs}
        return list(merged.values())

    # -- progress ----------------------------------------------------------------------------
    def progress(self, step_id: str) -> Progress | None:
        found = self._progress.get(step_id)
        return found if found is not None else self._db.progress.get(step_id)

    def working_progress(self, step_id: str, manager_id: str) -> Progress:
        found = self._progress.get(step_id)
        if found is None:
            committed = self._db.progress.get(step_id)
            found = committed.copy() if committed is not None else Progress(step_id, manager_id)
            self._progress[step_id] = found
        return found

    def put_progress(self, progress: Progress, *, new: bool = False) -> None:
        self._progress[progress.step_id] = progress

    def load_manager_progress(self, manager_id: str) -> None:
        pass

    def tallies_for_manager(self, manager_id: str) -> dict[str, ChildTally]:
        merged = {**self._db.progress, **self._progress}
        return {s: p.tally() for s, p in merged.items() if p.manager_id == manager_id}

    # -- the clock's work ----------------------------------------------------------------------
    def due_jobs(self) -> list[str]:
        return [
            j.id
            for j in self._all_jobs()
            if j.deadline is not None and j.deadline <= self.now and not j.status.terminal
        ]

    def due_graces(self) -> list[str]:
        merged = {**self._db.progress, **self._progress}
        return [
            s
            for s, p in merged.items()
            if p.grace_deadline is not None and p.grace_deadline <= self.now
        ]

    # -- leases ------------------------------------------------------------------------------
    def lease(self, owner: str) -> Lease | None:
        if owner in self._leases:
            return self._leases[owner]
        return self._db.leases.get(owner)

    def put_lease(self, lease: Lease) -> None:
        self._leases[lease.owner] = lease

    def delete_lease(self, owner: str) -> None:
        self._leases[owner] = None

    def live_leases(self) -> list[Lease]:
        merged: dict[str, Lease | None] = {**self._db.leases, **self._leases}
        return [lease for lease in merged.values() if lease and lease.expires_at > self.now]

    def instance_record(self, owner: str, instance: str) -> InstanceRecord | None:
        return self._db.instances.get((owner, instance))

    def add_instance(self, record: InstanceRecord) -> None:
        self._db.instances[(record.owner, record.instance)] = record

    def supersede_instances(self, owner: str, by_instance: str) -> None:
        for key, record in list(self._db.instances.items()):
            if record.owner == owner and key[1] != by_instance and not record.superseded_by:
                self._db.instances[key] = InstanceRecord(key[1], owner, by_instance)

    def _live_managers(self, owner: str) -> list[JobState]:
        found = [
            j
            for j in self._all_jobs()
            if j.kind is Kind.MANAGER and j.owner == owner and not j.status.terminal
        ]
        return sorted(found, key=lambda j: (j.created_at, j.id))

    def live_managers(self, owner: str) -> list[JobState]:
        return self._live_managers(owner)

    def live_manager_ids(self, owner: str, limit: int) -> list[str]:
        return [j.id for j in self._live_managers(owner)[:limit]]

    def orphans(self, limit: int) -> list[JobState]:
        return [j for j in self._live_managers("") if j.orphan_deadline is not None][:limit]

    def due_leases(self) -> list[str]:
        merged: dict[str, Lease | None] = {**self._db.leases, **self._leases}
        return [o for o, lease in merged.items() if lease and lease.expires_at <= self.now]

    def due_orphans(self) -> list[str]:
        return [
            j.id
            for j in self._live_managers("")
            if j.orphan_deadline is not None and j.orphan_deadline <= self.now
        ]

    def definition_of(self, manager_id: str) -> dict[str, Any] | None:
        job = self.job(manager_id)
        return job.definition if job is not None else None

    # -- commit --------------------------------------------------------------------------------
    def commit(self) -> None:
        for owner, lease in self._leases.items():
            if lease is None:
                self._db.leases.pop(owner, None)
            else:
                self._db.leases[owner] = lease
        self._db.metadata_writes.update(self._metadata_writes)
        self._db.log.extend(self._log)
        if not (self._jobs or self._progress or self._touched):
            return
        self._db.change_seq = self._seq
        self._db.jobs.update(self._jobs)
        self._db.progress.update(self._progress)
        for job_id in self._touched:
            job = self._db.jobs.get(job_id)
            if job is not None and job_id not in self._jobs:
                touched = job.clone()
                touched.change_seq = self._seq
                self._db.jobs[job_id] = touched
