"""The monitor's storage verbs. Each write verb runs one ``lifecycle`` unit of work in a
(group) transaction of the writer; reads run plain queries on the read pool."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, func, or_, select

from monitor_svc import lifecycle
from monitor_svc.lifecycle import StepStatResult, StepTimers, leases
from monitor_svc.lifecycle.leases import HeartbeatResult
from monitor_svc.log_lines import LogFilter, LogPage
from monitor_svc.records import (
    ChildEventIn,
    DocumentLimits,
    JobFilter,
    JobView,
    LogEntryIn,
    NewJob,
    as_utc,
    utcnow,
)
from monitor_svc.store.engine import SQLITE_SYNCHRONOUS_DEFAULT, is_sqlite, make_engine
from monitor_svc.store.log_reads import last_seq, read_page
from monitor_svc.store.models import JobRow, LeaseRow, StepProgressRow
from monitor_svc.store.statements import JOB_SELECT, SELECT_JOB, read_definition, row_to_state
from monitor_svc.store.tx import Tx
from monitor_svc.store.writer import Reader, Writer
from stepflow_common.errors import Fenced, InvalidArgument, NotFound, StatusConflict
from stepflow_common.status import LIVE, Kind, Status
from stepflow_common.step_outcome import ChildTally

_DEFAULT_TIMERS = StepTimers()
T = TypeVar("T")


class MonitorStore:
    """Owns the engines, the group-commit writer and the read pool."""

    def __init__(
        self,
        database_url: str,
        timers: StepTimers = _DEFAULT_TIMERS,
        on_commit: Callable[[set[str], datetime | None], None] | None = None,
        limits: DocumentLimits | None = None,
        sqlite_synchronous: str = SQLITE_SYNCHRONOUS_DEFAULT,
    ) -> None:
        self.database_url = database_url
        self.timers = timers
        self.limits = limits or DocumentLimits()
        self.sqlite = is_sqlite(database_url)
        self._write_engine = make_engine(
            database_url, writer=True, sqlite_synchronous=sqlite_synchronous
        )
        self._read_engine = make_engine(
            database_url, writer=False, sqlite_synchronous=sqlite_synchronous
        )
        self.writer = Writer(
            self._write_engine,
            lock_rows=not self.sqlite,
            on_commit=on_commit,
            log_limit_bytes=self.limits.max_log_bytes,
        )
        self.reader = Reader(self._read_engine)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()
        self._write_engine.dispose()
        self._read_engine.dispose()

    # -- reads -------------------------------------------------------------------------------
    async def get_job(self, job_id: str, *, include_definition: bool = False) -> JobView:
        view = await self.reader.run(lambda conn: read_view(conn, job_id, include_definition))
        if view is None:
            raise NotFound(f"job {job_id} not found")
        return view

    async def list_jobs(
        self, flt: JobFilter, page_size: int, page_token: str
    ) -> tuple[list[JobView], str]:
        after = _decode_token(page_token) if page_token else None
        return await self.reader.run(lambda conn: _list(conn, flt, page_size, after))

    def page_token_after(self, view: JobView) -> str:
        """A ListJobs token resuming after ``view`` (for a page cut short by its size)."""
        return _encode_token(view.job.created_at, view.job.id)

    async def next_wakeup(self) -> datetime | None:
        return await self.reader.run(_next_wakeup)

    # -- writes ------------------------------------------------------------------------------
    async def create_job(self, new: NewJob) -> JobView:
        return await self.writer.run(
            lambda tx: lifecycle.create_job(tx, new, self.timers, self.limits)
        )

    async def update_status(
        self,
        job_id: str,
        status: Status,
        error: str,
        end_reason: str,
        owner: str = "",
        instance: str = "",
    ) -> JobView:
        result = await self._fenced(
            job_id,
            "a status change",
            lambda tx: lifecycle.update_status(
                tx, job_id, status, error, end_reason, self.timers, owner, instance
            ),
        )
        if isinstance(result, StatusConflict):
            raise result  # after the commit of the timeout that made the request too late
        return result

    async def update_metadata(
        self,
        job_id: str,
        patch: dict[str, Any],
        expected_version: int | None,
        owner: str = "",
        instance: str = "",
        request_id: str = "",
    ) -> JobView:
        return await self._fenced(
            job_id,
            "a metadata write",
            lambda tx: lifecycle.update_metadata(
                tx, job_id, patch, expected_version, self.limits, owner, instance, request_id
            ),
        )

    async def update_step_stat(
        self, manager_id: str, step_id: str, status: Status, owner: str = "", instance: str = ""
    ) -> StepStatResult:
        return await self._fenced(
            step_id,
            "a step_stats write",
            lambda tx: lifecycle.update_step_stat(tx, manager_id, step_id, status, owner, instance),
        )

    async def _fenced(self, job_id: str, what: str, unit: Callable[[Tx], T]) -> T:
        """Run ``unit``; when a fence refuses it, say so in the job's log (a unit of its own:
        the refused unit left nothing behind) and raise as before."""
        try:
            return await self.writer.run(unit)
        except Fenced as fenced:
            reason = str(fenced)
            await self.writer.run(
                lambda tx: lifecycle.log_units.log_fenced_write(tx, job_id, what, reason)
            )
            raise

    async def apply_events(
        self,
        events: list[ChildEventIn],
        owner: str = "",
        instance: str = "",
        lines: Sequence[LogEntryIn] = (),
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """A stream batch in one unit: its log lines, then its events; the (id, reason) of
        the events refused and of the lines refused."""

        def unit(tx: Tx) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
            # Lines first: what a child printed comes before the step's end its last event
            # may bring about.
            refused_lines = lifecycle.log_units.stream_lines(tx, lines) if lines else []
            refused = lifecycle.apply_events(tx, events, self.timers, owner, instance)
            return refused, refused_lines

        return await self.writer.run(unit)

    # -- the job log ------------------------------------------------------------------------------
    async def append_log(self, job_id: str, entries: Sequence[LogEntryIn]) -> tuple[int, int]:
        """``AppendJobLog``: (lines stored now, the log's last seq after the commit)."""

        manager_id, appended = await self.writer.run(
            lambda tx: lifecycle.log_units.append_lines(tx, job_id, entries)
        )
        return appended, await self.reader.run(lambda conn: last_seq(conn, manager_id))

    async def log_scope(self, job_id: str) -> tuple[str, LogFilter]:
        """The manager whose log ``job_id`` reads, and the filter a step's or child's adds."""
        view = await self.get_job(job_id)
        job = view.job
        if job.kind is Kind.MANAGER:
            return job.id, LogFilter()
        if job.kind is Kind.STEP:
            return job.manager_id, LogFilter(step_id=job.id)
        return job.manager_id, LogFilter(step_id=job.parent_id or "", child_id=job.id)

    async def read_log(
        self, manager_id: str, after_seq: int, limit: int, where: LogFilter
    ) -> LogPage:
        return await self.reader.run(
            lambda conn: read_page(conn, manager_id, after_seq, limit, where)
        )

    async def fire_due(self) -> int:
        return await self.writer.run(lambda tx: lifecycle.fire_due(tx, self.timers))

    async def heartbeat(
        self,
        owner: str,
        instance: str,
        lease_s: float,
        max_adopt: int,
        worker_types: Sequence[str] = (),
        running_job_ids: Sequence[str] = (),
    ) -> HeartbeatResult:
        return await self.writer.run(
            lambda tx: leases.heartbeat(
                tx,
                owner,
                instance,
                lease_s,
                max_adopt,
                self.timers,
                worker_types,
                running_job_ids,
            )
        )

    async def release_lease(
        self, owner: str, instance: str = "", job_ids: Sequence[str] = (), reason: str = ""
    ) -> list[str]:
        return await self.writer.run(
            lambda tx: leases.release_lease(tx, owner, self.timers, instance, job_ids, reason)
        )


# -- reads ---------------------------------------------------------------------------------
def read_view(conn: Connection, job_id: str, include_definition: bool = False) -> JobView | None:
    row = conn.execute(SELECT_JOB, {"job_id": job_id}).first()
    if row is None:
        return None
    job = row_to_state(row)
    if include_definition and job.kind is Kind.MANAGER:
        job.definition = read_definition(conn, job_id)
    tallies: dict[str, ChildTally] = {}
    if job.kind is Kind.MANAGER:
        tallies = _tallies_for_manager(conn, job.id)
    return JobView(job, tallies)


def _tallies_for_manager(conn: Connection, manager_id: str) -> dict[str, ChildTally]:
    p = StepProgressRow
    rows = conn.execute(
        select(p.step_id, p.pending, p.running, p.completed, p.failed, p.cancelled).where(
            p.manager_id == manager_id
        )
    )
    return {
        r.step_id: ChildTally(r.pending, r.running, r.completed, r.failed, r.cancelled)
        for r in rows
    }


def _list(
    conn: Connection, flt: JobFilter, page_size: int, after: tuple[datetime, str] | None
) -> tuple[list[JobView], str]:
    stmt = JOB_SELECT
    if flt.parent_id:
        stmt = stmt.where(JobRow.parent_id == flt.parent_id)
    if flt.manager_id:
        stmt = stmt.where(JobRow.manager_id == flt.manager_id)
    if flt.kind:
        stmt = stmt.where(JobRow.kind == flt.kind.value)
    if flt.status:
        stmt = stmt.where(JobRow.status == flt.status.value)
    if flt.owner:
        stmt = stmt.where(JobRow.owner == flt.owner)
    if flt.created_after:
        stmt = stmt.where(JobRow.created_at >= flt.created_after)
    if flt.created_before:
        stmt = stmt.where(JobRow.created_at < flt.created_before)
    if after is not None:
        created, job_id = after
        stmt = stmt.where(
            or_(JobRow.created_at < created, (JobRow.created_at == created) & (JobRow.id < job_id))
        )
    stmt = stmt.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(page_size + 1)
    rows = list(conn.execute(stmt))
    views = []
    for row in rows[:page_size]:
        job = row_to_state(row)
        tallies = _tallies_for_manager(conn, job.id) if job.kind is Kind.MANAGER else {}
        views.append(JobView(job, tallies))
    token = ""
    if len(rows) > page_size:
        last = views[-1].job
        token = _encode_token(last.created_at, last.id)
    return views, token


def _encode_token(created: datetime, job_id: str) -> str:
    raw = json.dumps([created.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        stamp = as_utc(datetime.fromisoformat(created))
        assert stamp is not None and isinstance(job_id, str)
        return stamp, job_id
    except Exception:
        raise InvalidArgument("page_token is not one this server issued") from None


def _next_wakeup(conn: Connection) -> datetime | None:
    job_deadline = conn.execute(
        select(func.min(JobRow.deadline)).where(
            JobRow.deadline.is_not(None), JobRow.status.in_(sorted(s.value for s in LIVE))
        )
    ).scalar()
    grace = conn.execute(
        select(func.min(StepProgressRow.grace_deadline)).where(
            StepProgressRow.grace_deadline.is_not(None)
        )
    ).scalar()
    lease = conn.execute(select(func.min(LeaseRow.expires_at))).scalar()
    orphan = conn.execute(
        select(func.min(JobRow.orphan_deadline)).where(
            JobRow.orphan_deadline.is_not(None), JobRow.status.in_(sorted(s.value for s in LIVE))
        )
    ).scalar()
    found = [as_utc(d) for d in (job_deadline, grace, lease, orphan) if d is not None]
    target = min(d for d in found if d is not None) if found else None
    if target is None or conn.dialect.name == "sqlite":
        return target
    # PostgreSQL stamps deadlines with its own clock (see Tx.serialise_with_database_clock):
    # the timer sleeps on this process's clock, so the target is moved by the difference.
    database_now = as_utc(conn.execute(select(func.statement_timestamp())).scalar())
    return target if database_now is None else target - database_now + utcnow()
