"""Group commit: one writer thread runs queued units of work together in one transaction.

Concurrent calls that wait on the same rows (a hot manager) would otherwise serialise on its
row lock and pay a commit each. Here they share one transaction: each unit sees the effects of
the units before it, raises its own domain error without disturbing the others, and every
caller is answered only after the commit, so a returned call is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError

from monitor_svc import metrics
from monitor_svc.store.tx import Tx
from stepflow_common import tracing
from stepflow_common.errors import AlreadyExists, InvalidArgument, StepflowError, Unavailable
from stepflow_common.limits import MAX_LOG_BYTES

log = structlog.get_logger(__name__)

T = TypeVar("T")
MAX_UNITS_PER_COMMIT = 512
READ_THREADS = 4
Unit = Callable[[Tx], Any]


@dataclass(slots=True)
class _Job:
    unit: Unit
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    trace: Any = None  # the caller's span(s), linked from the commit's span (tracing on)


class Writer:
    """Runs units of work on one thread, many per transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        lock_rows: bool,
        on_commit: Callable[[set[str], datetime | None], None] | None = None,
        log_limit_bytes: int = MAX_LOG_BYTES,
    ) -> None:
        self._engine = engine
        self._log_limit_bytes = log_limit_bytes
        self._lock_rows = lock_rows
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="stepflow-writer", daemon=True)
        self._thread.start()

    async def run(self, unit: Callable[[Tx], T]) -> T:
        """Run ``unit`` in the next group transaction; return once that is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(unit, future, loop, tracing.link_here()))
        return await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                if self._conn is not None:
                    self._conn.close()
                return
            batch = [first]
            while len(batch) < MAX_UNITS_PER_COMMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            live = [job for job in batch if not job.future.done()]
            if not live:
                continue
            try:
                self._commit_group(live)
            except Exception as exc:  # never let the one writer thread die: answer and go on
                log.exception("writer group failed")
                _resolve_all([(job, None, exc) for job in live])

    def _commit_group(self, batch: list[_Job], *, again: bool = False) -> None:
        started = time.perf_counter()
        try:
            with tracing.commit(batch):
                outcomes, changed, earliest = self._transact(batch)
        except Exception as exc:  # the whole transaction failed: retry units one by one
            if len(batch) > 1 and not isinstance(exc, OperationalError):
                log.warning("group commit failed; retrying units alone", error=str(exc))
                for job in batch:
                    self._commit_group([job])
                return
            if not again and _is_request_id_clash(exc):
                # Another monitor committed a job with this request_id meanwhile: run the unit
                # once more, and it finds that job (the idempotent answer).
                self._commit_group(batch, again=True)
                return
            error = _as_domain_error(exc)
            _resolve_all([(job, None, error) for job in batch])
            return
        metrics.observe_commit(time.perf_counter() - started, len(batch))
        _resolve_all(
            [(job, result, error) for job, (result, error) in zip(batch, outcomes, strict=True)]
        )
        if (changed or earliest) and self._on_commit is not None:
            self._on_commit(changed, earliest)

    def _transact(
        self, batch: list[_Job]
    ) -> tuple[list[tuple[Any, BaseException | None]], set[str], datetime | None]:
        outcomes: list[tuple[Any, BaseException | None]] = []
        conn = self._connection()
        try:
            with conn.begin():
                tx = Tx(conn, lock_rows=self._lock_rows, log_limit_bytes=self._log_limit_bytes)
                if self._lock_rows:
                    tx.serialise_with_database_clock()
                for job in batch:
                    mark = tx.begin_unit()
                    try:
                        outcomes.append((job.unit(tx), None))
                    except StepflowError as exc:
                        tx.rollback_unit(mark)
                        outcomes.append((None, exc))
                tx.flush()
                changed = tx.changed_ids()
        except DBAPIError:
            self._drop_connection()  # reconnect for the next group (database restarted?)
            raise
        return outcomes, changed, tx.earliest_deadline

    def read_now(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a transaction of its own on the writer's connection. Only on the
        writer thread (from ``on_commit``): a read right after a commit, without a hop to
        the read pool. On PostgreSQL it reads one snapshot, like the read pool."""
        conn = self._connection()
        try:
            with conn.begin():
                if self._lock_rows:
                    conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                return fn(conn)
        except DBAPIError:
            self._drop_connection()
            raise

    def _connection(self) -> Connection:
        """The writer's own connection, kept between groups: no pool checkout (and no
        pre-ping round trip) per transaction."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                pass
            self._conn = None


def _resolve_all(settled: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """Answer a whole group with one wake-up per event loop, not one per call."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any, BaseException | None]]] = {}
    for item in settled:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():

        def settle(items: list[tuple[_Job, Any, BaseException | None]] = items) -> None:
            for job, result, error in items:
                if job.future.done():
                    continue
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone (shutdown)
            loop.call_soon_threadsafe(settle)


def _as_domain_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StepflowError):
        return exc
    if isinstance(exc, DataError):  # a value the database refuses: retrying cannot help
        return InvalidArgument(f"the database refused a value: {exc.orig}")
    if isinstance(exc, IntegrityError):
        if _is_request_id_clash(exc):
            return AlreadyExists(f"a job with this request_id was created meanwhile: {exc.orig}")
        log.error("a write broke a database constraint", error=str(exc.orig))
        return exc  # a bug, not a condition to retry: INTERNAL
    if isinstance(exc, DBAPIError):
        return Unavailable(f"database unavailable: {exc.orig}")
    log.error("unexpected error in a write transaction", error=repr(exc))
    return exc


# The unique constraint on jobs.request_id, as PostgreSQL names it and as SQLite reports it.
REQUEST_ID_CONSTRAINTS = ("jobs_request_id_key", "jobs.request_id")


def _is_request_id_clash(exc: BaseException) -> bool:
    if not isinstance(exc, IntegrityError):
        return False
    diag = getattr(exc.orig, "diag", None)
    name = getattr(diag, "constraint_name", None) or str(exc.orig)
    return any(c in name for c in REQUEST_ID_CONSTRAINTS)


class Reader:
    """Read-only snapshots on a small thread pool, so reads never block the event loop."""

    def __init__(self, engine: Engine, threads: int = READ_THREADS) -> None:
        self._engine = engine
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stepflow-read")

    async def run(self, fn: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._read, fn)

    def _read(self, fn: Callable[[Connection], T]) -> T:
        try:
            with self._engine.begin() as conn:
                return fn(conn)
        except DBAPIError as exc:
            raise Unavailable(f"database unavailable: {exc.orig}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
