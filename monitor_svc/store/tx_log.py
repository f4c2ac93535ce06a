"""The job log's half of the unit of work (``tx.Tx``): lines collected by the units of a group
transaction, written at its flush with their ``seq``, once per key, within the job's budget.

``seq`` is gap-free and in commit order because one transaction at a time holds a manager's
log head: SQLite's writer holds the database, and on PostgreSQL every monitor's write
transaction takes the change_seq counter lock first (see ``Tx.serialise_with_database_clock``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.exc import DBAPIError

from monitor_svc.log_lines import (
    EVENT,
    Keep,
    LogLine,
    dropped_line,
)
from monitor_svc.store.models import JobLogHeadRow, JobLogRow

LOG = cast(Table, JobLogRow.__table__)
HEADS = cast(Table, JobLogHeadRow.__table__)
IN_CHUNK = 500
_COLUMNS = (
    "manager_id",
    "seq",
    "time",
    "step_id",
    "child_id",
    "attempt",
    "source",
    "level",
    "message",
    "truncated",
    "line_key",
)
_INSERT_SQLITE = f"INSERT INTO job_log ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 11)})"
_COPY_PG = f"COPY job_log ({', '.join(_COLUMNS)}) FROM STDIN"
_UPDATE_HEAD = (
    update(HEADS)
    .where(HEADS.c.manager_id == bindparam("m_id"), HEADS.c.step_id == bindparam("s_id"))
    .values(
        last_seq=bindparam("last_seq"),
        bytes=bindparam("bytes"),
        lines=bindparam("lines"),
        dropped=bindparam("dropped"),
        tail=bindparam("tail"),
    )
)


_SELECT_HEADS = select(HEADS).where(HEADS.c.manager_id == bindparam("manager_id"))
_SELECT_KEYS_SQLITE = "SELECT line_key FROM job_log WHERE manager_id = ? AND line_key IN ({marks})"
_SELECT_KEYS_PG = "SELECT line_key FROM job_log WHERE manager_id = %s AND line_key = ANY(%s)"


def message_bytes(message: str) -> int:
    return len(message) if message.isascii() else len(message.encode("utf-8", "replace"))


@dataclass(slots=True)
class _Head:
    """A log's totals (step_id "") or one step's, as this transaction changes them."""

    manager_id: str
    step_id: str
    last_seq: int = 0
    bytes: int = 0
    lines: int = 0
    dropped: int = 0
    tail: str | None = None  # the held last line as stored (JSON)
    new: bool = True
    dirty: bool = False
    held: LogLine | None = None  # the held last line, dropped in this transaction
    loaded_seq: int = 0


class LogRows:
    """Job-log lines as ``Tx`` collects and writes them."""

    conn: Connection
    now: datetime
    sqlite: bool
    _undo: list[tuple[str, Any, Any]]
    log_limit_bytes: int
    _log: list[LogLine]
    log_grew: dict[str, int]  # manager -> its last seq, for the log's followers

    _unit_log_start: int

    def log(self, line: LogLine) -> None:
        """Add a line to its manager's log, written with this transaction (a unit that is
        rolled back takes its lines with it: ``Tx.rollback_unit``)."""
        self._log.append(line)

    def stored_log_keys(self, manager_id: str, keys: list[str]) -> set[str]:
        wanted = set(keys)
        found = {
            line.key for line in self._log if line.manager_id == manager_id and line.key in wanted
        }
        pairs = [(manager_id, key) for key in wanted]
        found.update(k for _, k in self._keys_in_log(pairs))
        return {k for k in found if k is not None}

    def _rollback_log(self, length: int) -> None:
        del self._log[length:]

    def _flush_log(self) -> None:
        lines = self._log
        if not lines:
            return
        self._log = []
        managers = sorted({line.manager_id for line in lines})
        heads = self._load_heads(managers)
        seen = self._stored_keys(lines)
        rows: list[tuple[Any, ...]] = []
        limit = self.log_limit_bytes
        now = self.now
        always = Keep.ALWAYS
        # The head of the line before, reused while lines name the same manager and step
        # (the common case: a batch of one step's output).
        place: tuple[str, str] | None = None
        total = step = _Head("", "")
        for line in lines:
            manager_id = line.manager_id
            key = line.key
            if key is not None:
                if (manager_id, key) in seen:
                    continue  # sent before (a resent batch): stored once
                seen.add((manager_id, key))
            if place != (manager_id, line.step_id):
                place = (manager_id, line.step_id)
                total = _head(heads, manager_id, "")
                step = _head(heads, manager_id, line.step_id) if line.step_id else total
            if line.ends_step and step.dropped:
                self._write_held(rows, total, step, limit, now)
            message = line.message
            size = len(message) if message.isascii() else len(message.encode("utf-8", "replace"))
            if line.keep is not always and (
                # Once a step has dropped a line, its later ones are held too (the last one
                # is written when it ends): what is stored stays in the order printed.
                step.dropped
                or (total.bytes + size > limit and (step.lines > 0 or line.source == EVENT))
            ):
                step.dropped += 1  # (the total's own count: the manager's own lines)
                if line.source != EVENT:
                    step.held = line
                step.dirty = True
                continue
            _append(rows, total, step, line, now, size)
        if rows:
            self._insert_lines(rows, now)
        self._write_heads([h for h in heads.values() if h.dirty])
        for manager_id in managers:
            head = heads.get((manager_id, ""))
            if head is not None and head.last_seq > head.loaded_seq:
                self.log_grew[manager_id] = head.last_seq

    def _write_held(
        self, rows: list[tuple[Any, ...]], total: _Head, step: _Head, limit: int, now: datetime
    ) -> None:
        """A step ends: the count of its dropped lines, then its last line (held back)."""
        tail = step.held
        if tail is None and step.tail is not None:
            tail = _decode_tail(step.tail, total.manager_id)
        dropped = step.dropped - (1 if tail is not None else 0)
        if dropped:
            summary = dropped_line(total.manager_id, step.step_id, dropped, limit)
            _append(rows, total, step, summary, now)
        if tail is not None:
            _append(rows, total, step, tail, now)
        step.dropped, step.tail, step.held = 0, None, None
        step.dirty = True

    def _load_heads(self, managers: list[str]) -> dict[tuple[str, str], _Head]:
        heads: dict[tuple[str, str], _Head] = {}
        for manager_id in managers:  # a batch's lines are mostly of one manager
            for row in self.conn.execute(_SELECT_HEADS, {"manager_id": manager_id}):
                heads[(row.manager_id, row.step_id)] = _Head(
                    row.manager_id,
                    row.step_id,
                    row.last_seq,
                    row.bytes,
                    row.lines,
                    row.dropped,
                    row.tail,
                    new=False,
                    loaded_seq=row.last_seq,
                )
        return heads

    def _stored_keys(self, lines: list[LogLine]) -> set[tuple[str, str]]:
        """The (manager, key) pairs of ``lines`` already in the log."""
        return self._keys_in_log(
            list({(line.manager_id, line.key) for line in lines if line.key is not None})
        )

    def _keys_in_log(self, keyed: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Those of the (manager, key) pairs stored already: per manager, one probe of the
        ``(manager_id, line_key)`` index per key (plain driver SQL: this runs per batch)."""
        by_manager: dict[str, list[str]] = {}
        for manager_id, key in keyed:
            by_manager.setdefault(manager_id, []).append(key)
        found: set[tuple[str, str]] = set()
        for manager_id, keys in by_manager.items():
            for start in range(0, len(keys), IN_CHUNK):
                chunk = keys[start : start + IN_CHUNK]
                if self.sqlite:
                    sql = _SELECT_KEYS_SQLITE.format(marks=",".join("?" * len(chunk)))
                    rows = self.conn.exec_driver_sql(sql, (manager_id, *chunk))
                else:
                    rows = self.conn.exec_driver_sql(_SELECT_KEYS_PG, (manager_id, chunk))
                found.update((manager_id, row[0]) for row in rows)
        return found

    def _insert_lines(self, rows: list[tuple[Any, ...]], now: datetime) -> None:
        if self.sqlite:
            encode = LOG.c.time.type.dialect_impl(self.conn.dialect).bind_processor(
                self.conn.dialect
            )
            if encode is not None:  # most lines have the transaction's time: encoded once
                stamp = encode(now)
                rows = [(*r[:2], stamp if r[2] is now else encode(r[2]), *r[3:]) for r in rows]
            self.conn.exec_driver_sql(_INSERT_SQLITE, rows)
            return
        driver = self.conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        try:
            with driver.cursor() as cursor, cursor.copy(_COPY_PG) as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.Error as exc:  # as exec_driver_sql would raise it: the writer's handling
            raise DBAPIError.instance(_COPY_PG, None, exc, psycopg.Error) from exc

    def _write_heads(self, heads: list[_Head]) -> None:
        new = [_head_values(h, "manager_id", "step_id") for h in heads if h.new]
        old = [_head_values(h, "m_id", "s_id") for h in heads if not h.new]
        if new:
            self.conn.execute(HEADS.insert(), new)
        if old:
            self.conn.execute(_UPDATE_HEAD, old)


def _head(heads: dict[tuple[str, str], _Head], manager_id: str, step_id: str) -> _Head:
    head = heads.get((manager_id, step_id))
    if head is None:
        head = heads[(manager_id, step_id)] = _Head(manager_id, step_id)
    return head


def _append(
    rows: list[tuple[Any, ...]],
    total: _Head,
    step: _Head,
    line: LogLine,
    now: datetime,
    size: int | None = None,
) -> None:
    """The line's row, with the log's next seq; its bytes and line counted."""
    total.last_seq += 1
    total.bytes += message_bytes(line.message) if size is None else size
    step.lines += 1
    total.dirty = step.dirty = True
    rows.append(
        (
            line.manager_id,
            total.last_seq,
            line.time or now,
            line.step_id,
            line.child_id,
            line.attempt,
            line.source,
            line.level,
            line.message,
            line.truncated,
            line.key,
        )
    )


def _head_values(head: _Head, manager_key: str, step_key: str) -> dict[str, Any]:
    if head.held is not None:
        head.tail, head.held = _encode_tail(head.held), None
    return {
        manager_key: head.manager_id,
        step_key: head.step_id,
        "last_seq": head.last_seq,
        "bytes": head.bytes,
        "lines": head.lines,
        "dropped": head.dropped,
        "tail": head.tail,
    }


def _encode_tail(line: LogLine) -> str:
    return json.dumps(
        {
            "step_id": line.step_id,
            "child_id": line.child_id,
            "attempt": line.attempt,
            "source": line.source,
            "level": line.level,
            "message": line.message,
            "time": line.time.isoformat() if line.time else None,
            "truncated": line.truncated,
        }
    )


def _decode_tail(tail: str, manager_id: str) -> LogLine:
    data = json.loads(tail)
    return LogLine(
        manager_id,
        data["step_id"],
        data["child_id"],
        data["attempt"],
        data["source"],
        data["level"],
        data["message"],
        datetime.fromisoformat(data["time"]) if data["time"] else None,
        truncated=data["truncated"],
        keep=Keep.ALWAYS,
    )
