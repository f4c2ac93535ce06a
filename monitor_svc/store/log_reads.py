"""Reads of a job's log (``ReadJobLog``, ``FollowJobLog``, and the head a writer answers with):
one page at a time, in one snapshot, under 4 MiB."""

from __future__ import annotations

from sqlalchemy import Connection, select

from monitor_svc.log_lines import MAX_PAGE_BYTES, LogFilter, LogPage, StoredLine
from monitor_svc.records import as_utc
from monitor_svc.store.statements import JOBS
from monitor_svc.store.tx_log import HEADS, LOG, message_bytes
from stepflow_common.status import Status


def read_page(
    conn: Connection, manager_id: str, after_seq: int, limit: int, where: LogFilter
) -> LogPage:
    """One page of a log, in one snapshot: up to ``limit`` lines after ``after_seq`` that
    ``where`` selects (at most ``MAX_PAGE_BYTES`` of them), where to read on from, and
    whether the job is terminal with its last line read."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    status = conn.execute(select(JOBS.c.status).where(JOBS.c.id == manager_id)).scalar()
    terminal = status is not None and Status(status).terminal
    head = last_seq(conn, manager_id)
    stmt = (
        select(
            LOG.c.seq,
            LOG.c.time,
            LOG.c.step_id,
            LOG.c.child_id,
            LOG.c.attempt,
            LOG.c.source,
            LOG.c.level,
            LOG.c.message,
            LOG.c.truncated,
        )
        .where(LOG.c.manager_id == manager_id, LOG.c.seq > after_seq, LOG.c.seq <= head)
        .order_by(LOG.c.seq)
        .limit(limit)
    )
    if where.step_id:
        stmt = stmt.where(LOG.c.step_id == where.step_id)
    if where.child_id:
        stmt = stmt.where(LOG.c.child_id == where.child_id)
    if where.sources:
        stmt = stmt.where(LOG.c.source.in_(where.sources))
    lines: list[StoredLine] = []
    size = 0
    for row in conn.execute(stmt):
        size += message_bytes(row.message) + 200  # the line's other fields, generously
        if lines and size > MAX_PAGE_BYTES:
            break
        lines.append(
            StoredLine(
                row.seq,
                as_utc(row.time) or row.time,
                row.step_id,
                row.child_id,
                row.attempt,
                row.source,
                row.level,
                row.message,
                row.truncated,
            )
        )
    full = len(lines) == limit or size > MAX_PAGE_BYTES
    # Past the last line read; with nothing more up to the head, past what the filters skip.
    next_seq = lines[-1].seq if full else max(head, after_seq)
    complete = terminal and next_seq >= head
    return LogPage(lines, next_seq, complete, more=next_seq < head, last_seq=head)


def last_seq(conn: Connection, manager_id: str) -> int:
    found = conn.execute(
        select(HEADS.c.last_seq).where(HEADS.c.manager_id == manager_id, HEADS.c.step_id == "")
    ).scalar()
    return int(found or 0)
