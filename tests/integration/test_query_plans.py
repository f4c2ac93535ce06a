"""The queries the monitor runs every few seconds (the deadline timer, heartbeats, adoption)
are index lookups that never visit the ended history: SQLite's plan for each of them, on a
migrated database, searches a partial index of live rows (no timing involved)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, event

from monitor_svc.store.engine import make_engine
from monitor_svc.store.migrate import upgrade
from monitor_svc.store.store import _next_wakeup as next_wakeup
from monitor_svc.store.tx import Tx


@pytest.fixture
def sqlite_plans(tmp_path: Any) -> Iterator[tuple[Connection, list[tuple[str, str]]]]:
    url = f"sqlite:///{tmp_path / 'plans.db'}"
    upgrade(url)
    engine = make_engine(url, writer=True)
    plans: list[tuple[str, str]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def explain(_conn: Any, cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM jobs" in statement:
            rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, params)
            plans.append((statement, " / ".join(str(r[3]) for r in rows)))

    try:
        with engine.begin() as conn:
            yield conn, plans
    finally:
        engine.dispose()


def test_timer_and_lease_queries_search_partial_indexes(
    sqlite_plans: tuple[Connection, list[tuple[str, str]]],
) -> None:
    conn, plans = sqlite_plans
    tx = Tx(conn, lock_rows=False)
    tx.due_jobs()
    tx.live_managers("orch-1")
    tx.live_manager_ids("orch-1", 10)
    tx.orphans(10)
    next_wakeup(conn)  # the timer's sleep: the earliest deadline of each kind
    expected = ["ix_jobs_deadline", "ix_jobs_live_managers", "ix_jobs_live_managers"]
    expected += ["ix_jobs_live_managers", "ix_jobs_deadline", "ix_jobs_orphan_deadline"]
    for (statement, plan), index in zip(plans, expected, strict=True):
        assert f"USING INDEX {index}" in plan, (statement, plan)
        assert "SCAN jobs" not in plan, (statement, plan)
