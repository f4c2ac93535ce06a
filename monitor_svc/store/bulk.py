"""Narrow statements for the child-event path: many child rows and step counts per group.

A group of stream batches inserts and updates thousands of child rows. Through SQLAlchemy's
compiled statements each row is a dict that goes through per-row parameter processing, which
costs more than the database's own work. Here the statements are written once per dialect
as driver SQL (``Connection.exec_driver_sql``: same transaction, same error wrapping) and
fed plain tuples built straight from the records:

* SQLite: one ``executemany`` per table, datetimes written in SQLAlchemy's own text format
  (its bind processor, memoised per value: a group's stamps are mostly its one ``now``), so
  rows read back the same whichever path wrote them;
* PostgreSQL: child rows go by ``COPY … FROM STDIN`` (psycopg's ``Cursor.copy``: each row
  written as text by psycopg's C dumpers, parsed by the server without a plan): new rows
  straight into ``jobs``, changed rows into a session's temporary table that one joined
  UPDATE applies. Building arrays of Python values (``unnest``) cost the writer four times
  the CPU per row, and the server more too. Step counts (a row per step, few per group) are
  one ``unnest`` UPDATE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
from sqlalchemy import Column, Connection, Dialect, Table
from sqlalchemy.exc import DBAPIError

from monitor_svc.records import (
    JOB_FIELDS,
    PROGRESS_FIELDS,
    JobState,
    Progress,
    as_utc,
    column_of,
    stored,
    utcnow,
)
from monitor_svc.store.models import JobRow, StepProgressRow
from stepflow_common.status import Kind, Status

_T = cast(Table, JobRow.__table__)
_P = cast(Table, StepProgressRow.__table__)
_DATETIME_TYPES = ("datetime", "datetime | None")
_STAGE = "stepflow_child_updates"  # PostgreSQL: the session's staging table of child updates

# A child row: every field but the definition (managers only; its column defaults to NULL).
_INSERT_FIELDS = tuple(f for f in JOB_FIELDS if stored(f).selected)
_UPDATE_FIELDS = tuple(f for f in JOB_FIELDS if stored(f).by_child_event)
_PROGRESS_SET = PROGRESS_FIELDS[2:]  # step_id and manager_id never change


# Enum member -> its text by dict lookup (``member.value`` is a slower descriptor call).
_TEXT: dict[Status | Kind, str] = {**{s: s.value for s in Status}, **{k: k.value for k in Kind}}


def _dump_json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":")) if value else "{}"


def _quote(name: str) -> str:
    return f'"{name}"'


def _row_function(
    name: str, fields: Sequence[tuple[str, str]]
) -> Callable[[Any, Callable[[datetime], Any]], tuple[Any, ...]]:
    """A function ``(record, encode_datetime) -> tuple``, written out once from ``fields``
    (attribute, type): one tuple display per row, no per-value dispatch."""
    items = []
    for attr, kind in fields:
        if kind == "json":
            items.append(f"_dump_json(s.{attr})")
        elif kind == "text":
            items.append(f"_TEXT[s.{attr}]")
        elif kind == "datetime":
            items.append(f"(None if s.{attr} is None else d(s.{attr}))")
        else:
            items.append(f"s.{attr}")
    namespace: dict[str, Any] = {"_TEXT": _TEXT, "_dump_json": _dump_json}
    exec(f"def {name}(s, d):\n    return ({', '.join(items)},)\n", namespace)
    function: Callable[[Any, Callable[[datetime], Any]], tuple[Any, ...]] = namespace[name]
    return function


def _job_kind(f: Any) -> str:
    type_name = str(f.type)
    if type_name in ("Kind", "Status"):
        return "text"
    if type_name == "dict[str, Any]":
        return "json"
    if type_name in _DATETIME_TYPES:
        return "datetime"
    return "plain"


_insert_row = _row_function("child_insert_row", [(f.name, _job_kind(f)) for f in _INSERT_FIELDS])
# The UPDATE's parameters: the changed columns, then the id (the WHERE).
_update_row = _row_function(
    "child_update_row", [(f.name, _job_kind(f)) for f in (*_UPDATE_FIELDS, JOB_FIELDS[0])]
)
_progress_row = _row_function(
    "progress_update_row",
    [(n, "datetime" if n == "grace_deadline" else "plain") for n in (*_PROGRESS_SET, "step_id")],
)


def _text_decoder() -> Callable[[Any], datetime | None]:
    """SQLite's datetime text (SQLAlchemy's format, UTC) as an aware datetime, memoised per
    text: the rows of a group share a few stamps."""
    seen: dict[str, datetime] = {}

    def decode(text: str) -> datetime:
        found = seen.get(text)
        if found is None:
            found = seen[text] = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return found

    return decode


def _state_function() -> Callable[
    [Any, Callable[[Any], datetime | None], Callable[[], datetime]], JobState
]:
    """``(row, decode_datetime, now) -> JobState`` for a row of the columns of
    ``_INSERT_FIELDS``, written out once: the decodings of ``tx.row_to_state``, inline."""
    args = []
    for i, f in enumerate(_INSERT_FIELDS):
        type_name = str(f.type)
        if type_name == "Kind":
            args.append(f"_KIND[r[{i}]]")
        elif type_name == "Status":
            args.append(f"_STATUS[r[{i}]]")
        elif type_name == "dict[str, Any]":
            args.append(f"({{}} if r[{i}] == '{{}}' else _loads(r[{i}]))")
        elif type_name == "datetime":  # never empty; as statements.created_at_of reads it
            args.append(f"(now() if r[{i}] is None else d(r[{i}]))")
        elif type_name == "datetime | None":
            args.append(f"(None if r[{i}] is None else d(r[{i}]))")
        else:
            args.append(f"r[{i}]")
    namespace: dict[str, Any] = {
        "JobState": JobState,
        "_KIND": {k.value: k for k in Kind},
        "_STATUS": {s.value: s for s in Status},
        "_loads": json.loads,
    }
    exec(f"def state_from_row(r, d, now):\n    return JobState({', '.join(args)})\n", namespace)
    function: Callable[
        [Any, Callable[[Any], datetime | None], Callable[[], datetime]], JobState
    ] = namespace["state_from_row"]
    return function


_state_from_row = _state_function()


class _SameValue:
    """An encoder of datetimes memoised per value (a group writes a few distinct stamps)."""

    __slots__ = ("_encode", "_seen")

    def __init__(self, encode: Callable[[datetime], Any]) -> None:
        self._encode = encode
        self._seen: dict[datetime, Any] = {}

    def __call__(self, value: datetime) -> Any:
        found = self._seen.get(value)
        if found is None:
            found = self._seen[value] = self._encode(value)
        return found


def _same(value: datetime) -> datetime:
    return value


class BulkStatements:
    """The child-event path's statements for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self._postgres = dialect.name == "postgresql"
        column = _T.c.created_at
        processor = column.type.dialect_impl(dialect).bind_processor(dialect)
        self._datetime_encoder = processor
        insert_columns = [column_of(f) for f in _INSERT_FIELDS]
        self._select_sql = f"SELECT {', '.join(map(_quote, insert_columns))} FROM jobs"
        update_columns = [column_of(f) for f in _UPDATE_FIELDS]
        if self._postgres:
            self._copy_sql = f"COPY jobs ({', '.join(map(_quote, insert_columns))}) FROM STDIN"
            self._insert_sql = ""  # COPY instead
            names = [*update_columns, "id"]  # the rows end with the id
            # Child updates are staged by COPY in a temporary table (one per session, emptied
            # at commit) and applied by one joined UPDATE.
            staged = ", ".join(f"{_quote(n)} {_array_type(_T.c[n], dialect)}" for n in names)
            self._stage_create_sql = (
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} ({staged}) ON COMMIT DELETE ROWS"
            )
            self._stage_copy_sql = f"COPY {_STAGE} ({', '.join(map(_quote, names))}) FROM STDIN"
            self._update_sql = (
                "UPDATE jobs SET "
                + ", ".join(f"{_quote(c)} = u.{_quote(c)}" for c in update_columns)
                + f" FROM {_STAGE} AS u WHERE jobs.id = u.id"
            )
            progress_names = [*_PROGRESS_SET, "step_id"]
            self._progress_sql = (
                "UPDATE step_progress SET "
                + ", ".join(f"{_quote(c)} = u.{_quote(c)}" for c in _PROGRESS_SET)
                + f" FROM unnest({_arrays(_P, progress_names, dialect)})"
                f" AS u({', '.join(map(_quote, progress_names))})"
                " WHERE step_progress.step_id = u.step_id"
            )
        else:
            marks = ", ".join("?" for _ in insert_columns)
            self._insert_sql = (
                f"INSERT INTO jobs ({', '.join(map(_quote, insert_columns))}) VALUES ({marks})"
            )
            self._update_sql = (
                "UPDATE jobs SET "
                + ", ".join(f"{_quote(c)} = ?" for c in update_columns)
                + " WHERE id = ?"
            )
            self._progress_sql = (
                "UPDATE step_progress SET "
                + ", ".join(f"{_quote(c)} = ?" for c in _PROGRESS_SET)
                + " WHERE step_id = ?"
            )

    def select_jobs(self, conn: Connection, ids: list[str]) -> list[JobState]:
        """The jobs of ``ids`` that exist (read as ``tx.row_to_state`` reads them), unlocked:
        the caller's transaction holds the change_seq counter lock, which every writer takes
        before it reads a job."""
        if self._postgres:
            rows = conn.exec_driver_sql(self._select_sql + " WHERE id = ANY(%s)", (ids,))
            decode: Callable[[Any], datetime | None] = as_utc
        else:
            marks = ",".join("?" * len(ids))
            rows = conn.exec_driver_sql(f"{self._select_sql} WHERE id IN ({marks})", tuple(ids))
            decode = _text_decoder()
        return [_state_from_row(row, decode, utcnow) for row in rows]

    def _encoder(self) -> Callable[[datetime], Any]:
        encode = self._datetime_encoder
        return _same if encode is None else _SameValue(encode)

    def insert_children(self, conn: Connection, states: list[JobState]) -> None:
        if not self._postgres:
            self._run(conn, self._insert_sql, _insert_row, states)
            return
        # COPY costs about a sixth of the client CPU of the unnest INSERT (no per-column
        # lists, no array literal) and less server CPU (no function scan, no plan).
        self._copy(conn, self._copy_sql, _insert_row, states)

    def update_children(self, conn: Connection, states: list[JobState]) -> None:
        """Once per transaction: on PostgreSQL the staged rows stay until commit."""
        if not self._postgres:
            self._run(conn, self._update_sql, _update_row, states)
            return
        conn.exec_driver_sql(self._stage_create_sql)
        self._copy(conn, self._stage_copy_sql, _update_row, states)
        conn.exec_driver_sql(self._update_sql)

    def _copy(
        self,
        conn: Connection,
        sql: str,
        row: Callable[[Any, Callable[[datetime], Any]], tuple[Any, ...]],
        records: Sequence[Any],
    ) -> None:
        """``records`` by ``COPY … FROM STDIN`` on the connection's own transaction."""
        encode = self._encoder()
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        try:
            with driver.cursor() as cursor, cursor.copy(sql) as copy:
                write = copy.write_row
                for record in records:
                    write(row(record, encode))
        except psycopg.Error as exc:  # as exec_driver_sql would raise it: the writer's handling
            raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc

    def update_progress(self, conn: Connection, rows: list[Progress]) -> None:
        self._run(conn, self._progress_sql, _progress_row, rows)

    def _run(
        self,
        conn: Connection,
        sql: str,
        row: Callable[[Any, Callable[[datetime], Any]], tuple[Any, ...]],
        records: Sequence[Any],
    ) -> None:
        encode = self._encoder()
        rows = [row(r, encode) for r in records]
        if self._postgres:
            conn.exec_driver_sql(sql, tuple(list(column) for column in zip(*rows, strict=True)))
        else:
            conn.exec_driver_sql(sql, rows)


def _arrays(table: Table, names: list[str], dialect: Dialect) -> str:
    """``%s::type[]`` per column: the rows' values of each column as one typed array."""
    return ", ".join(f"%s::{_array_type(table.c[n], dialect)}[]" for n in names)


def _array_type(column: Column[Any], dialect: Dialect) -> str:
    return str(column.type.compile(dialect=dialect))


_BY_DIALECT: dict[str, BulkStatements] = {}


def statements(dialect: Dialect) -> BulkStatements:
    found = _BY_DIALECT.get(dialect.name)
    if found is None:
        found = _BY_DIALECT[dialect.name] = BulkStatements(dialect)
    return found
