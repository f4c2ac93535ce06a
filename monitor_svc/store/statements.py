"""The SQL a unit of work runs, built once at import from the field tables of
``monitor_svc.records`` (``JobState``, ``Progress``): the jobs, progress, lease and
keyed-write statements, and the codecs between rows and records (written out from the fields
once, as fast as hand-written ones); plus the cache of large metadata documents by their
text. ``tx.Tx``, the unit of work, is plain code on top of these."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import Field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import BindParameter, Connection, Table, bindparam, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite

from monitor_svc.records import (
    JOB_FIELDS,
    PROGRESS_FIELDS,
    PROGRESS_VALUES,
    JobState,
    Progress,
    as_utc,
    column_of,
    stored,
    utcnow,
)
from monitor_svc.store.models import (
    JobRow,
    LeaseInstanceRow,
    LeaseRow,
    MetadataWriteRow,
    StepProgressRow,
)
from stepflow_common.status import LIVE, Kind, Status

JOBS = cast(Table, JobRow.__table__)
# Every statement and mapping below is derived from the fields of ``JobState``, in their order.
COLUMNS = tuple(column_of(f) for f in JOB_FIELDS)
# Read with the row: every field but the few kept for the one call that asks (``selected``).
READ_FIELDS = tuple(f for f in JOB_FIELDS if stored(f).selected)
JOB_SELECT = select(*(JOBS.c[column_of(f)] for f in READ_FIELDS))
# Statements built once: building and cache-keying a statement per call costs more than
# running it on the hot paths.
SELECT_JOB = JOB_SELECT.where(JOBS.c.id == bindparam("job_id"))
SELECT_JOB_LOCKED = SELECT_JOB.with_for_update()
SELECT_BY_REQUEST = JOB_SELECT.where(JOBS.c.request_id == bindparam("request_id"))
UPDATED = tuple(f for f in JOB_FIELDS if stored(f).updated)


def update_of(changed: tuple[Field[Any], ...]) -> tuple[Any, tuple[str, ...]]:
    """An UPDATE of the ``changed`` fields by id, and its bind names."""
    binds = ("b_id", *(f"b_{column_of(f)}" for f in changed))
    stmt = (
        update(JOBS)
        .where(JOBS.c.id == bindparam("b_id"))
        .values({column_of(f): bindparam(f"b_{column_of(f)}") for f in changed})
    )
    return stmt, binds


UPDATE_JOB, UPDATE_BINDS = update_of(UPDATED)
PROGRESS = cast(Table, StepProgressRow.__table__)
PROGRESS_SELECT = select(*(PROGRESS.c[name] for name in PROGRESS_FIELDS))
SELECT_PROGRESS = PROGRESS_SELECT.where(PROGRESS.c.step_id == bindparam("step_id"))
SELECT_PROGRESS_LOCKED = SELECT_PROGRESS.with_for_update()
SELECT_MANAGER_PROGRESS = PROGRESS_SELECT.where(PROGRESS.c.manager_id == bindparam("manager_id"))


# Enum member -> its text, by dict lookup: ``member.value`` is a slow descriptor call and the
# event path converts a status per child.
STATUS = {s.value: s for s in Status}
KIND = {k.value: k for k in Kind}
TEXT: dict[Status | Kind, str] = {**{s: s.value for s in Status}, **{k: k.value for k in Kind}}
LIVE_VALUES = sorted(s.value for s in LIVE)
# Queries of live managers name the kind and the live statuses as literals in the SQL (not
# parameters), the terms of the partial index of live managers (``ix_jobs_live_managers``):
# SQLite uses a partial index only for a query that repeats its terms.
MANAGER_KIND = literal(Kind.MANAGER.value, literal_execute=True)
LIVE_STATUS: BindParameter[Any] = bindparam(
    "live_statuses", LIVE_VALUES, expanding=True, literal_execute=True
)


class Documents:
    """Large metadata documents by their JSON text, as last written or read.

    A hot manager's row is read and written again by every group transaction; its document
    is parsed only when its text changed (another process wrote it), and every read of it
    shares the same Python values, so the answers' serialized bytes (``wire.answers``) and the
    size bookkeeping (``metadata_rules``) carry over from one transaction to the next. The
    values are never changed in place (units replace a job's metadata, never mutate it).
    Shared by the writer and the read pool, hence the lock.
    """

    MIN_CHARS = 1024  # smaller documents parse faster than they are looked up
    MAX_CHARS = 32 * 1024 * 1024  # the texts kept, in all

    def __init__(self) -> None:
        self._by_text: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def load(self, text: str) -> Any:
        if text == "{}":
            return {}
        if len(text) < self.MIN_CHARS:
            return json.loads(text)
        with self._lock:
            found = self._by_text.get(text)
            if found is not None:
                self._by_text.move_to_end(text)
                return found
        value = json.loads(text)
        self._keep(text, value)
        return value

    def dump(self, value: dict[str, Any]) -> str:
        if not value:
            return "{}"
        text = json.dumps(value, separators=(",", ":"))
        if len(text) >= self.MIN_CHARS:
            self._keep(text, value)
        return text

    def _keep(self, text: str, value: dict[str, Any]) -> None:
        if len(text) > self.MAX_CHARS // 4:
            return
        with self._lock:
            if self._by_text.pop(text, None) is not None:
                self._chars -= len(text)
            self._by_text[text] = value
            self._chars += len(text)
            while self._chars > self.MAX_CHARS:
                old, _ = self._by_text.popitem(last=False)
                self._chars -= len(old)


DOCUMENTS = Documents()
load_json = DOCUMENTS.load
dump_json = DOCUMENTS.dump


def created_at_of(value: datetime) -> datetime:
    return as_utc(value) or utcnow()


# How a field's type is read back: enums from their text, the metadata from JSON, times as UTC
# (SQLite hands them back naive). Every other type is stored as it is.
DECODE_BY_TYPE: dict[str, Callable[[Any], Any]] = {
    "Kind": KIND.__getitem__,
    "Status": STATUS.__getitem__,
    "dict[str, Any]": load_json,
    "datetime": created_at_of,
    "datetime | None": as_utc,
}


DECODE = tuple(
    (i, DECODE_BY_TYPE[str(f.type)])
    for i, f in enumerate(READ_FIELDS)
    if str(f.type) in DECODE_BY_TYPE
)


def params_function(
    name: str, keys: tuple[str, ...], fields: tuple[Field[Any], ...]
) -> Callable[[JobState], dict[str, Any]]:
    """A statement's parameters from a ``JobState``, written out from the field table once at
    import: a plain dict literal, as fast as one written by hand (this runs per child event)."""
    encode = {"Kind": "TEXT[s.{}]", "Status": "TEXT[s.{}]", "dict[str, Any]": "dump_json(s.{})"}
    items = ", ".join(
        f"{key!r}: " + encode.get(str(f.type), "s.{}").format(f.name)
        for key, f in zip(keys, fields, strict=True)
    )
    namespace: dict[str, Any] = {"TEXT": TEXT, "dump_json": dump_json}
    exec(f"def {name}(s):\n    return {{{items}}}\n", namespace)
    function: Callable[[JobState], dict[str, Any]] = namespace[name]
    return function


def row_to_state(row: Any) -> JobState:
    """A row of ``JOB_SELECT`` (its columns are the fields, in order) as a ``JobState``."""
    values = list(row)
    for index, decode in DECODE:
        values[index] = decode(values[index])
    return JobState(*values)


ID_FIELD = JOB_FIELDS[0]
state_to_insert = params_function("state_to_insert", COLUMNS, JOB_FIELDS)
update_params = params_function("update_params", UPDATE_BINDS, (ID_FIELD, *UPDATED))


LEASES = cast(Table, LeaseRow.__table__)
SELECT_LEASE = select(
    LEASES.c.owner, LEASES.c.instance, LEASES.c.expires_at, LEASES.c.worker_types
).where(LEASES.c.owner == bindparam("owner"))
INSTANCES = cast(Table, LeaseInstanceRow.__table__)
SELECT_INSTANCE = select(INSTANCES.c.instance, INSTANCES.c.owner, INSTANCES.c.superseded_by).where(
    INSTANCES.c.owner == bindparam("owner"), INSTANCES.c.instance == bindparam("instance")
)
SELECT_LEASE_LOCKED = SELECT_LEASE.with_for_update()
METADATA_WRITES = cast(Table, MetadataWriteRow.__table__)
SELECT_WRITE = select(METADATA_WRITES.c.version).where(
    METADATA_WRITES.c.job_id == bindparam("job_id"),
    METADATA_WRITES.c.request_id == bindparam("request_id"),
)
SELECT_ALL_LEASES = select(
    LEASES.c.owner, LEASES.c.instance, LEASES.c.expires_at, LEASES.c.worker_types
)
INSTANCE_MEMORY = timedelta(days=7)


def worker_types_of(text: str | None) -> tuple[str, ...]:
    return tuple(t for t in (text or "").split(",") if t)


LIVE_MANAGERS = JOB_SELECT.where(
    JOBS.c.kind == MANAGER_KIND,
    JOBS.c.owner == bindparam("owner"),
    JOBS.c.status.in_(LIVE_STATUS),
).order_by(JOBS.c.created_at, JOBS.c.id)


def upsert_lease(sqlite_db: bool) -> Any:
    insert = (sqlite.insert if sqlite_db else postgresql.insert)(LEASES)
    return insert.on_conflict_do_update(
        index_elements=[LEASES.c.owner],
        set_={
            "instance": insert.excluded.instance,
            "expires_at": insert.excluded.expires_at,
            "worker_types": insert.excluded.worker_types,
        },
    )


UPSERT_LEASE = {True: upsert_lease(True), False: upsert_lease(False)}


def is_orphan(state: JobState) -> bool:
    return (
        state.kind is Kind.MANAGER
        and state.owner == ""
        and state.orphan_deadline is not None
        and not state.status.terminal
    )


def oldest_first(state: JobState) -> tuple[datetime, str]:
    return state.created_at, state.id


def read_definition(conn: Connection, manager_id: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = conn.execute(
        select(JOBS.c.definition).where(JOBS.c.id == manager_id)
    ).scalar()
    return found


def row_to_progress(row: Any) -> Progress:
    progress = Progress(*row)
    progress.handed = bool(progress.handed)
    progress.grace_deadline = as_utc(progress.grace_deadline)
    return progress


def progress_insert_params(p: Progress) -> dict[str, Any]:
    return dict(zip(PROGRESS_FIELDS, PROGRESS_VALUES(p), strict=True))
