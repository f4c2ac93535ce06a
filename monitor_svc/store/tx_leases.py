"""The lease half of the unit of work (``tx.Tx``): orchestrators' leases and instances, and
the managers they hold, read and written through the same transaction and caches."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    delete,
    select,
    update,
)

from monitor_svc.records import (
    InstanceRecord,
    JobState,
    Lease,
    as_utc,
)
from monitor_svc.store.statements import (
    INSTANCE_MEMORY,
    INSTANCES,
    JOB_SELECT,
    JOBS,
    LEASES,
    LIVE_MANAGERS,
    LIVE_STATUS,
    MANAGER_KIND,
    SELECT_ALL_LEASES,
    SELECT_INSTANCE,
    SELECT_LEASE,
    SELECT_LEASE_LOCKED,
    UPSERT_LEASE,
    created_at_of,
    is_orphan,
    oldest_first,
    read_definition,
    row_to_state,
    worker_types_of,
)
from stepflow_common.status import Kind

MISSING = object()
"""A cache slot never filled (``None`` means known absent)."""


class LeaseRows:
    """Leases, instances and the managers they hold, as ``Tx`` reads and writes them (its
    caches and connection are declared here; ``Tx`` sets them up)."""

    conn: Connection
    now: datetime
    sqlite: bool
    earliest_deadline: datetime | None
    _lock_rows: bool
    _jobs: dict[str, JobState | None]
    _dirty: set[str]
    _new: set[str]
    _undo: list[tuple[str, Any, Any]]
    _leases: dict[str, Lease | None]
    _lease_dirty: set[str]

    def _note_deadline(self, when: datetime) -> None:
        if self.earliest_deadline is None or when < self.earliest_deadline:
            self.earliest_deadline = when

    def lease(self, owner: str) -> Lease | None:
        if owner in self._leases:
            return self._leases[owner]
        stmt = SELECT_LEASE_LOCKED if self._lock_rows else SELECT_LEASE
        row = self.conn.execute(stmt, {"owner": owner}).first()
        found = None
        if row is not None:
            expires_at = as_utc(row.expires_at)
            assert expires_at is not None
            found = Lease(row.owner, row.instance, expires_at, worker_types_of(row.worker_types))
        self._leases[owner] = found
        return found

    def put_lease(self, lease: Lease) -> None:
        self._undo.append(("lease", lease.owner, self._leases.get(lease.owner, MISSING)))
        self._leases[lease.owner] = lease
        self._lease_dirty.add(lease.owner)
        self._note_deadline(lease.expires_at)

    def delete_lease(self, owner: str) -> None:
        self._undo.append(("lease", owner, self._leases.get(owner, MISSING)))
        self._leases[owner] = None
        self._lease_dirty.add(owner)

    def live_leases(self) -> list[Lease]:
        found = {
            row.owner: Lease(
                row.owner,
                row.instance,
                as_utc(row.expires_at) or self.now,
                worker_types_of(row.worker_types),
            )
            for row in self.conn.execute(SELECT_ALL_LEASES)
        }
        for owner in self._lease_dirty:
            lease = self._leases.get(owner)
            if lease is None:
                found.pop(owner, None)
            else:
                found[owner] = lease
        return [lease for lease in found.values() if lease.expires_at > self.now]

    def instance_record(self, owner: str, instance: str) -> InstanceRecord | None:
        row = self.conn.execute(SELECT_INSTANCE, {"owner": owner, "instance": instance}).first()
        return None if row is None else InstanceRecord(row.instance, row.owner, row.superseded_by)

    def add_instance(self, record: InstanceRecord) -> None:
        self.conn.execute(
            INSTANCES.insert(),
            {
                "instance": record.instance,
                "owner": record.owner,
                "superseded_by": record.superseded_by,
                "created_at": self.now,
            },
        )
        # Superseded instances are remembered for a week: a process frozen longer than that
        # is treated as new (and supersedes, as a restart does).
        self.conn.execute(
            delete(INSTANCES).where(
                INSTANCES.c.superseded_by != "", INSTANCES.c.created_at < self.now - INSTANCE_MEMORY
            )
        )

    def supersede_instances(self, owner: str, by_instance: str) -> None:
        self.conn.execute(
            update(INSTANCES)
            .where(
                INSTANCES.c.owner == owner,
                INSTANCES.c.instance != by_instance,
                INSTANCES.c.superseded_by == "",
            )
            .values(superseded_by=by_instance)
        )

    def _cache_rows(self, rows: Iterable[Any]) -> list[JobState]:
        """Rows as this transaction sees them: a job it already holds wins over its row."""
        found = []
        for row in rows:
            cached = self._jobs.get(row.id)
            state = cached if cached is not None else row_to_state(row)
            self._jobs.setdefault(row.id, state)
            found.append(state)
        return found

    def _changed_here(self) -> list[JobState]:
        return [s for job_id in self._dirty if (s := self._jobs.get(job_id)) is not None]

    def live_managers(self, owner: str) -> list[JobState]:
        stmt = LIVE_MANAGERS.with_for_update() if self._lock_rows else LIVE_MANAGERS
        found = {s.id: s for s in self._cache_rows(self.conn.execute(stmt, {"owner": owner}))}
        for state in self._changed_here():
            if state.kind is Kind.MANAGER and state.owner == owner:
                found[state.id] = state
        live = [s for s in found.values() if s.owner == owner and not s.status.terminal]
        return sorted(live, key=oldest_first)

    def live_manager_ids(self, owner: str, limit: int) -> list[str]:
        stmt = (
            select(JOBS.c.id, JOBS.c.created_at)
            .where(
                JOBS.c.kind == MANAGER_KIND,
                JOBS.c.owner == owner,
                JOBS.c.status.in_(LIVE_STATUS),
            )
            .order_by(JOBS.c.created_at, JOBS.c.id)
            .limit(limit)
        )
        found: dict[str, tuple[datetime, str]] = {}
        for row in self.conn.execute(stmt):
            cached = self._jobs.get(row.id)
            if cached is None or (cached.owner == owner and not cached.status.terminal):
                found[row.id] = (created_at_of(row.created_at), row.id)
        for state in self._changed_here():
            if state.kind is Kind.MANAGER and state.owner == owner and not state.status.terminal:
                found[state.id] = oldest_first(state)
        return [job_id for _, job_id in sorted(found.values())[:limit]]

    def orphans(self, limit: int) -> list[JobState]:
        stmt = (
            JOB_SELECT.where(
                JOBS.c.orphan_deadline.is_not(None),
                JOBS.c.kind == MANAGER_KIND,
                JOBS.c.owner == "",
                JOBS.c.status.in_(LIVE_STATUS),
            )
            .order_by(JOBS.c.created_at, JOBS.c.id)
            .limit(limit)
        )
        if self._lock_rows:
            stmt = stmt.with_for_update(skip_locked=True)
        found = {s.id: s for s in self._cache_rows(self.conn.execute(stmt))}
        for state in self._changed_here():
            if is_orphan(state):
                found[state.id] = state
        return sorted((s for s in found.values() if is_orphan(s)), key=oldest_first)[:limit]

    def due_leases(self) -> list[str]:
        stmt = select(LEASES.c.owner).where(LEASES.c.expires_at <= self.now)
        if self._lock_rows:
            stmt = stmt.with_for_update(skip_locked=True)
        return list(self.conn.execute(stmt).scalars())

    def due_orphans(self) -> list[str]:
        stmt = select(JOBS.c.id).where(
            JOBS.c.orphan_deadline.is_not(None),
            JOBS.c.orphan_deadline <= self.now,
            JOBS.c.kind == MANAGER_KIND,
            JOBS.c.owner == "",
            JOBS.c.status.in_(LIVE_STATUS),
        )
        if self._lock_rows:
            stmt = stmt.with_for_update(skip_locked=True)
        return list(self.conn.execute(stmt).scalars())

    def definition_of(self, manager_id: str) -> dict[str, Any] | None:
        if manager_id in self._new:  # created in this transaction: not stored yet
            state = self._jobs.get(manager_id)
            return state.definition if state is not None else None
        return read_definition(self.conn, manager_id)

    def _flush_leases(self) -> None:
        gone, kept = [], []
        for owner in self._lease_dirty:
            lease = self._leases.get(owner, MISSING)
            if lease is None:
                gone.append(owner)
            elif isinstance(lease, Lease):
                kept.append(
                    {
                        "owner": owner,
                        "instance": lease.instance,
                        "expires_at": lease.expires_at,
                        "worker_types": ",".join(lease.worker_types),
                    }
                )
        if gone:
            self.conn.execute(delete(LEASES).where(LEASES.c.owner.in_(gone)))
        if kept:
            self.conn.execute(UPSERT_LEASE[self.sqlite], kept)
