"""The lifecycle rules run on either unit of work: over dicts (``lifecycle.memory``) or over a
real database through the store's SQL unit of work (``store.tx.Tx``), on a clock the test
moves. The same test body runs on each, so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from sqlalchemy import Engine

from monitor_svc import lifecycle
from monitor_svc.lifecycle import StepTimers, UnitOfWork
from monitor_svc.lifecycle.memory import MemoryDatabase
from monitor_svc.log_lines import LogFilter
from monitor_svc.records import ChildEventIn, DocumentLimits, JobState, NewJob, utcnow
from monitor_svc.store.engine import is_sqlite, make_engine
from monitor_svc.store.log_reads import read_page
from monitor_svc.store.migrate import upgrade
from monitor_svc.store.tx import Tx
from stepflow_common.errors import StatusConflict
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally
from tests.conftest import fresh_database

T = TypeVar("T")
TIMERS = StepTimers(default_wait_timeout_s=600.0, grace_period_s=30.0)


class Backend(Protocol):
    now: datetime

    def run(self, unit: Callable[[Any], T]) -> T: ...

    def log(self, manager_id: str) -> list[tuple[str, str, str]]: ...

    def close(self) -> None: ...


class MemoryBackend:
    def __init__(self) -> None:
        self._db = MemoryDatabase()

    @property
    def now(self) -> datetime:
        return self._db.now

    @now.setter
    def now(self, value: datetime) -> None:
        self._db.now = value

    def run(self, unit: Callable[[Any], T]) -> T:
        return self._db.run(unit)

    def log(self, manager_id: str) -> list[tuple[str, str, str]]:
        return [
            (x.step_id, x.source, x.message) for x in self._db.log if x.manager_id == manager_id
        ]

    def close(self) -> None:
        pass


class SqlBackend:
    """One transaction per ``run``, as the writer runs a group of one unit."""

    def __init__(self, database_url: str) -> None:
        self._engine: Engine = make_engine(database_url, writer=True)
        self._lock_rows = not is_sqlite(database_url)
        self.now = utcnow()

    def run(self, unit: Callable[[Any], T]) -> T:
        with self._engine.connect() as conn, conn.begin():
            tx = Tx(conn, lock_rows=self._lock_rows, now=self.now)
            tx.begin_unit()
            result = unit(tx)  # a domain error leaves the block: the transaction rolls back
            tx.flush()
        return result

    def log(self, manager_id: str) -> list[tuple[str, str, str]]:
        with self._engine.connect() as conn:
            page = read_page(conn, manager_id, 0, 100_000, LogFilter())
        return [(x.step_id, x.source, x.message) for x in page.lines]

    def close(self) -> None:
        self._engine.dispose()


class Life:
    """Calls into the lifecycle, one unit of work each, and reads of what was committed."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.limits = DocumentLimits()
        self._events = 0

    def later(self, seconds: float) -> None:
        self.backend.now = self.backend.now + timedelta(seconds=seconds)

    def job(self, job_id: str) -> JobState:
        found = self.backend.run(lambda tx: tx.job(job_id))
        assert found is not None, job_id
        return found

    def tally(self, step_id: str) -> ChildTally:
        progress = self.backend.run(lambda tx: tx.progress(step_id))
        return progress.tally() if progress is not None else ChildTally()

    def entry(self, manager_id: str, step_id: str) -> dict[str, Any]:
        stats = self.job(manager_id).metadata.get("step_stats", [])
        return next(e for e in stats if e["step_id"] == step_id)

    def create(
        self,
        kind: Kind,
        parent_id: str | None = None,
        *,
        timeout_s: float | None = None,
        **metadata: Any,
    ) -> JobState:
        new = NewJob(kind, parent_id, f"{kind}-job", "simulate", metadata, timeout_s, None, "")
        return self.backend.run(lambda tx: lifecycle.create_job(tx, new, TIMERS, self.limits)).job

    def manager_with_step(
        self, *, timeout_s: float | None = None, step_timeout_s: float | None = None
    ) -> tuple[JobState, JobState]:
        manager = self.create(Kind.MANAGER, timeout_s=timeout_s)
        step = self.create(Kind.STEP, manager.id, timeout_s=step_timeout_s, step_index=0)
        self.update(
            manager.id,
            metadata={"current_step_id": step.id, "current_step_status": "pending"},
        )
        self.status(step.id, Status.RUNNING)
        return manager, step

    def status(
        self, job_id: str, status: Status, error: str = "", end_reason: str = ""
    ) -> JobState:
        result = self.backend.run(
            lambda tx: lifecycle.update_status(tx, job_id, status, error, end_reason, TIMERS)
        )
        if isinstance(result, StatusConflict):
            raise result  # as the store does, after the unit committed
        return result.job

    def update(self, job_id: str, *, metadata: dict[str, Any]) -> JobState:
        return self.backend.run(
            lambda tx: lifecycle.update_metadata(tx, job_id, metadata, None, self.limits)
        ).job

    def events(self, *events: tuple[str, str, str] | tuple[str, str, str, str]) -> list[str]:
        """(step_id, child_id, kind[, error]) per event; returns the rejection reasons."""
        batch = []
        for event in events:
            step_id, child_id, kind = event[:3]
            error = event[3] if len(event) > 3 else ""
            self._events += 1
            batch.append(
                ChildEventIn(f"e{self._events}", step_id, child_id, kind, error, 0, False, child_id)
            )
        return [reason for _, reason in self._apply(batch)]

    def seal(self, step_id: str, child_count: int, *, handed: bool = True) -> list[str]:
        self._events += 1
        event = ChildEventIn(f"e{self._events}", step_id, "", "sealed", "", child_count, handed)
        return [reason for _, reason in self._apply([event])]

    def _apply(self, batch: list[ChildEventIn]) -> list[tuple[str, str]]:
        return self.backend.run(lambda tx: lifecycle.apply_events(tx, batch, TIMERS))

    def fire_due(self) -> int:
        return self.backend.run(lambda tx: lifecycle.fire_due(tx, TIMERS))

    def run(self, unit: Callable[[UnitOfWork], T]) -> T:
        return self.backend.run(unit)

    def log(self, manager_id: str) -> list[tuple[str, str, str]]:
        """(step_id, source, message) of every line of the manager's log, in order."""
        return self.backend.log(manager_id)


BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def life(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_template: str | None
) -> Iterator[Life]:
    """The lifecycle over each unit of work: in memory, SQLite and PostgreSQL."""
    if request.param == "memory":
        yield Life(MemoryBackend())
        return
    with fresh_database(request.param, tmp_path, postgres_template) as url:
        if request.param == "sqlite":
            upgrade(url)
        backend = SqlBackend(url)
        try:
            yield Life(backend)
        finally:
            backend.close()
