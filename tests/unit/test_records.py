"""The job record is declared once: its fields and the jobs table agree, and the copy and the
row mapping carry every field."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table

from monitor_svc.records import JOB_FIELDS, JobState, Progress, column_of
from monitor_svc.store.models import JobRow, StepProgressRow
from monitor_svc.store.statements import JOB_SELECT, row_to_state, state_to_insert
from stepflow_common.status import LIVE, TERMINAL, Kind, Status


def _job(**changes: Any) -> JobState:
    values: dict[str, Any] = {
        "id": "j",
        "kind": Kind.STEP,
        "parent_id": "m",
        "manager_id": "m",
        "name": "n",
        "type": "t",
        "status": Status.RUNNING,
        "error": "e",
        "end_reason": "r",
        "metadata": {"a": [1, 2]},
        "version": 3,
        "change_seq": 4,
        "step_index": 5,
        "timeout_s": 6.5,
        "deadline": datetime(2030, 1, 1, tzinfo=UTC),
        "created_at": datetime(2029, 1, 1, tzinfo=UTC),
        "started_at": datetime(2029, 1, 2, tzinfo=UTC),
        "finished_at": None,
        "request_id": "q",
        "owner": "o",
    }
    values.update(changes)
    return JobState(**values)


def test_every_field_has_a_column_and_every_column_a_field() -> None:
    table = cast(Table, JobRow.__table__)
    assert {column_of(f) for f in JOB_FIELDS} == set(table.c.keys())
    progress = cast(Table, StepProgressRow.__table__)
    assert {f.name for f in fields(Progress)} == set(progress.c.keys())


def test_clone_copies_every_field_into_a_new_object() -> None:
    job = _job()
    copy = job.clone()
    assert copy == job and copy is not job


def test_a_stored_row_reads_back_as_the_same_state() -> None:
    job = _job()
    stored = state_to_insert(job)
    assert stored["kind"] == "step" and stored["status"] == "running"
    assert stored["metadata_json"] == '{"a":[1,2]}'
    naive = {k: v.replace(tzinfo=None) if isinstance(v, datetime) else v for k, v in stored.items()}
    row = tuple(naive[c.key] for c in JOB_SELECT.selected_columns)
    assert row_to_state(row) == job


def test_live_and_terminal_split_the_statuses() -> None:
    assert set(Status) == LIVE | TERMINAL and not LIVE & TERMINAL
