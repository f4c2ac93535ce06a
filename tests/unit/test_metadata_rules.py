"""The pure rules for a manager's metadata document (design §2), with no I/O."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from monitor_svc.metadata_rules import (
    StepFacts,
    merge_metadata,
    record_child_count,
    record_step_status,
    set_step_stat_status,
    sort_entries,
)
from stepflow_common.errors import FailedPrecondition, InvalidArgument, NotFound, StatusConflict
from stepflow_common.status import Status
from stepflow_common.step_outcome import ChildTally


def stat(index: int, status: str = "pending", **extra: Any) -> dict[str, Any]:
    return {
        "step_index": index,
        "step_id": f"s{index}",
        "step_name": f"step-{index}",
        "step_type": "simulate",
        "child_count": 0,
        "document_count": 0,
        "status": status,
        "error": "",
        **extra,
    }


def doc(*statuses: str, current: int = 0, **extra: Any) -> dict[str, Any]:
    entries = [stat(i, s) for i, s in enumerate(statuses)]
    return {
        "step_stats": entries,
        "current_step": current + 1,
        "current_step_id": f"s{current}",
        "current_step_name": f"step-{current}",
        "current_step_type": "simulate",
        "current_step_status": statuses[current],
        "completed_steps": sum(
            s in ("completed", "failed", "cancelled", "skipped") for s in statuses
        ),
        "total_steps": len(statuses),
        **extra,
    }


def by_id(metadata: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(e for e in metadata["step_stats"] if e["step_id"] == step_id)


# -- shallow merge ---------------------------------------------------------------------------
def test_each_top_level_key_replaces_that_key_and_others_are_kept() -> None:
    current = {"a": 1, "b": {"x": 1, "y": 2}, "c": [1, 2]}
    result = merge_metadata(current, {"b": {"z": 3}, "d": "new"})
    assert result.metadata == {"a": 1, "b": {"z": 3}, "c": [1, 2], "d": "new"}
    assert result.changed


def test_null_deletes_a_key_and_deleting_a_missing_key_is_a_noop() -> None:
    result = merge_metadata({"a": 1, "b": 2}, {"a": None})
    assert result.metadata == {"b": 2}
    assert result.changed
    again = merge_metadata(result.metadata, {"a": None})
    assert again.metadata == {"b": 2}
    assert not again.changed


def test_same_values_are_not_a_change() -> None:
    current = {"a": 1, "b": {"x": [1, 2]}}
    assert not merge_metadata(current, {"a": 1, "b": {"x": [1, 2]}}).changed
    assert not merge_metadata(current, {}).changed


def test_merge_does_not_mutate_its_inputs() -> None:
    current = doc("running", "pending", extra={"k": [1]})
    patch = {"extra": {"k": [2]}, "step_stats": [{"step_id": "s0", "status": "completed"}]}
    current_before, patch_before = copy.deepcopy(current), copy.deepcopy(patch)
    result = merge_metadata(current, patch)
    assert current == current_before and patch == patch_before
    result.metadata["extra"]["k"].append(3)
    assert patch == patch_before  # the stored value is a copy, not the request's object


# -- step_stats merge ------------------------------------------------------------------------
def test_step_stats_entries_are_merged_by_step_id_and_unnamed_entries_are_kept() -> None:
    current = doc("running", "pending", "pending")
    result = merge_metadata(current, {"step_stats": [{"step_id": "s1", "document_count": 7}]})
    entries = result.metadata["step_stats"]
    assert [e["step_id"] for e in entries] == ["s0", "s1", "s2"]
    assert by_id(result.metadata, "s1") == {**stat(1), "document_count": 7}
    assert by_id(result.metadata, "s0") == stat(0, "running")
    assert result.changed


def test_a_new_entry_is_added_and_the_array_stays_in_step_index_order() -> None:
    current = {"step_stats": [stat(0), stat(2)]}
    result = merge_metadata(current, {"step_stats": [stat(3), stat(1)]})
    assert [e["step_index"] for e in result.metadata["step_stats"]] == [0, 1, 2, 3]


def test_an_empty_step_stats_patch_keeps_every_entry() -> None:
    current = doc("running", "pending")
    result = merge_metadata(current, {"step_stats": []})
    assert result.metadata["step_stats"] == current["step_stats"]
    assert not result.changed


def test_entries_without_an_index_go_last_in_arrival_order() -> None:
    entries = [{"step_id": "x"}, stat(1), {"step_id": "y"}, stat(0)]
    assert [e["step_id"] for e in sort_entries(entries)] == ["s0", "s1", "x", "y"]


@pytest.mark.parametrize(
    "old, new",
    [
        ("running", "pending"),
        ("spawned", "running"),
        ("completed", "spawned"),  # bug 2 of design §1: spawned after completed
        ("completed", "failed"),  # terminal is final, to another terminal too
        ("skipped", "completed"),
        ("cancelled", "running"),
    ],
)
def test_an_entry_status_never_moves_backwards(old: str, new: str) -> None:
    current = doc(old, "pending")
    result = merge_metadata(
        current, {"step_stats": [{"step_id": "s0", "status": new, "document_count": 9}]}
    )
    entry = by_id(result.metadata, "s0")
    assert entry["status"] == old
    assert entry["document_count"] == 9  # the other fields of the same entry still merge
    assert result.ignored


@pytest.mark.parametrize(
    "old, new", [("pending", "running"), ("running", "spawned"), ("spawned", "completed")]
)
def test_an_entry_status_moves_forwards(old: str, new: str) -> None:
    result = merge_metadata(doc(old), {"step_stats": [{"step_id": "s0", "status": new}]})
    assert by_id(result.metadata, "s0")["status"] == new
    assert not result.ignored


def test_a_write_that_only_moves_a_status_backwards_changes_nothing() -> None:
    current = doc("completed", "pending")
    result = merge_metadata(current, {"step_stats": [{"step_id": "s0", "status": "spawned"}]})
    assert result.metadata == current
    assert not result.changed


def test_completed_steps_is_recounted_from_the_merged_entries() -> None:
    current = doc("completed", "running", "pending")
    result = merge_metadata(
        current,
        {
            "step_stats": [
                {"step_id": "s1", "status": "failed"},
                {"step_id": "s2", "status": "skipped"},
            ]
        },
    )
    assert result.metadata["completed_steps"] == 3


@pytest.mark.parametrize(
    "patch",
    [
        {"step_stats": None},  # deleting step_stats
        {"step_stats": "not a list"},
        {"step_stats": {"step_id": "s0"}},
        {"step_stats": [None]},  # deleting an entry
        {"step_stats": ["s0"]},
        {"step_stats": [{"status": "running"}]},  # no step_id
        {"step_stats": [{"step_id": ""}]},
        {"step_stats": [{"step_id": 3}]},
        {"step_stats": [{"step_id": "s0", "status": None}]},
        {"step_stats": [{"step_id": "s0", "status": "done"}]},
        {"step_stats": [{"step_id": "s0", "status": "COMPLETED"}]},
        {"step_stats": [{"step_id": "s0", "step_index": -1}]},
        {"step_stats": [{"step_id": "s0", "step_index": 1.5}]},
        {"step_stats": [{"step_id": "s0", "child_count": "many"}]},
        {"step_stats": [{"step_id": "s0", "document_count": 2.5}]},
        {"current_step_status": "done"},
    ],
)
def test_invalid_step_stats_writes_are_invalid_argument(patch: dict[str, Any]) -> None:
    current = doc("running", "pending")
    before = copy.deepcopy(current)
    with pytest.raises(InvalidArgument):
        merge_metadata(current, patch)
    assert current == before


# -- current_step_status guard ---------------------------------------------------------------
@pytest.mark.parametrize(
    "old, new",
    [("running", "pending"), ("completed", "spawned"), ("completed", "failed")],
)
def test_current_step_status_never_moves_backwards_on_the_same_step(old: str, new: str) -> None:
    current = doc(old)
    result = merge_metadata(current, {"current_step_status": new})
    assert result.metadata["current_step_status"] == old
    assert not result.changed
    # Naming the same current_step_id does not lift the guard.
    result = merge_metadata(current, {"current_step_id": "s0", "current_step_status": new})
    assert result.metadata["current_step_status"] == old


def test_current_step_status_moves_forwards_on_the_same_step() -> None:
    result = merge_metadata(doc("running"), {"current_step_status": "spawned"})
    assert result.metadata["current_step_status"] == "spawned"
    assert result.changed


def test_moving_to_another_step_sets_both_freely() -> None:
    current = doc("completed", "pending")
    result = merge_metadata(
        current,
        {"current_step": 2, "current_step_id": "s1", "current_step_status": "pending"},
    )
    assert result.metadata["current_step_id"] == "s1"
    assert result.metadata["current_step_status"] == "pending"


def test_first_current_step_status_is_accepted() -> None:
    result = merge_metadata({"current_step_id": "s0"}, {"current_step_status": "running"})
    assert result.metadata["current_step_status"] == "running"


# -- UpdateStepStatInManager -----------------------------------------------------------------
def test_step_stat_update_sets_the_entry_and_the_current_step_status() -> None:
    current = doc("pending", "pending")
    before = copy.deepcopy(current)
    update = set_step_stat_status(current, "s0", Status.RUNNING)
    assert update.entry == stat(0, "running")
    assert update.metadata["current_step_status"] == "running"
    assert update.current_step_status_changed
    assert update.changed
    assert by_id(update.metadata, "s1")["status"] == "pending"
    assert current == before


def test_step_stat_update_of_another_step_leaves_current_step_status() -> None:
    update = set_step_stat_status(doc("running", "pending"), "s1", Status.COMPLETED)
    assert update.entry["status"] == "completed"
    assert update.metadata["current_step_status"] == "running"
    assert not update.current_step_status_changed
    assert update.metadata["completed_steps"] == 1


def test_step_stat_update_to_the_same_status_is_a_noop() -> None:
    current = doc("completed", "running", current=1)
    update = set_step_stat_status(current, "s0", Status.COMPLETED)
    assert not update.changed
    assert not update.current_step_status_changed
    assert update.metadata == current


@pytest.mark.parametrize(
    "old, new",
    [("running", Status.PENDING), ("completed", Status.FAILED), ("skipped", Status.SPAWNED)],
)
def test_step_stat_update_backwards_or_from_terminal_is_refused(old: str, new: Status) -> None:
    with pytest.raises(StatusConflict):
        set_step_stat_status(doc(old), "s0", new)


def test_step_stat_update_without_step_stats_is_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition):
        set_step_stat_status({"current_step_id": "s0"}, "s0", Status.RUNNING)
    with pytest.raises(FailedPrecondition):
        set_step_stat_status({"step_stats": "broken"}, "s0", Status.RUNNING)


def test_step_stat_update_of_an_unknown_step_is_not_found() -> None:
    with pytest.raises(NotFound):
        set_step_stat_status(doc("pending"), "nope", Status.RUNNING)


def test_step_stat_update_does_not_move_a_current_step_status_that_is_further_on() -> None:
    current = doc("pending")
    current["current_step_status"] = "completed"
    update = set_step_stat_status(current, "s0", Status.RUNNING)
    assert update.entry["status"] == "running"
    assert update.metadata["current_step_status"] == "completed"
    assert not update.current_step_status_changed


# -- a step's row changed status --------------------------------------------------------------
def facts(index: int, status: Status, **kw: Any) -> StepFacts:
    return StepFacts(
        step_id=f"s{index}",
        step_name=f"step-{index}",
        step_type="simulate",
        step_index=index,
        status=status,
        error=kw.pop("error", ""),
        **kw,
    )


def test_step_end_reaches_entry_current_step_status_and_completed_steps() -> None:
    current = doc("running", "pending")
    new = record_step_status(current, facts(0, Status.FAILED, error="boom"))
    assert by_id(new, "s0")["status"] == "failed"
    assert by_id(new, "s0")["error"] == "boom"
    assert new["current_step_status"] == "failed"
    assert new["completed_steps"] == 1


def test_step_end_of_a_step_that_is_not_current_leaves_current_step_status() -> None:
    new = record_step_status(doc("running", "pending"), facts(1, Status.COMPLETED))
    assert by_id(new, "s1")["status"] == "completed"
    assert new["current_step_status"] == "running"
    assert new["completed_steps"] == 1


def test_a_skipped_step_gets_an_entry_when_it_is_skipped() -> None:
    current = {"step_stats": [stat(0, "failed"), stat(2, "pending")]}
    new = record_step_status(current, facts(1, Status.SKIPPED))
    assert [e["step_id"] for e in new["step_stats"]] == ["s0", "s1", "s2"]
    assert by_id(new, "s1") == stat(1, "skipped")
    assert new["completed_steps"] == 2


def test_an_entry_further_on_stays() -> None:
    current = doc("completed")
    new = record_step_status(current, facts(0, Status.RUNNING))
    assert by_id(new, "s0")["status"] == "completed"
    assert new["current_step_status"] == "completed"


def test_a_terminal_entry_is_not_replaced_by_another_terminal_status() -> None:
    new = record_step_status(doc("completed"), facts(0, Status.CANCELLED, error="late"))
    assert by_id(new, "s0")["status"] == "completed"
    assert by_id(new, "s0")["error"] == ""


def test_step_end_records_child_count_and_counts() -> None:
    tally = ChildTally(completed=3, failed=1)
    new = record_step_status(doc("spawned"), facts(0, Status.COMPLETED, child_count=4, tally=tally))
    entry = by_id(new, "s0")
    assert entry["child_count"] == 4
    assert entry["children"] == {
        "pending": 0,
        "running": 0,
        "completed": 3,
        "failed": 1,
        "cancelled": 0,
    }


def test_record_child_count_sets_only_that_entry() -> None:
    new = record_child_count(doc("spawned", "pending"), "s0", 12)
    assert by_id(new, "s0")["child_count"] == 12
    assert by_id(new, "s1")["child_count"] == 0
