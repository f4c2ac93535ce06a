"""Property tests (hypothesis) of the pure rules, each against a small reference model written
from design §2 rather than from the code:

- ``merge_metadata``: shallow merge, a JSON null deletes, ``step_stats`` merged entry by entry
  by ``step_id`` and kept in ``step_index`` order, statuses never backwards (in entries and in
  ``current_step_status``), ``completed_steps`` counting the ended entries; invalid patches
  are InvalidArgument and nothing else;
- ``check_transition``: no-op, forward, or StatusConflict, and any sequence of accepted
  changes climbs the order and ends at most once;
- ``final_step_status``: the outcome of a step whose children are all terminal;
- the monitor-side writers of an entry (``set_step_stat_status``, ``record_step_status``)
  never move it backwards either.

Example counts are modest so the suite stays fast.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor_svc.metadata_rules import (
    StepFacts,
    merge_metadata,
    record_step_status,
    set_step_stat_status,
)
from stepflow_common.errors import InvalidArgument, StatusConflict
from stepflow_common.status import Status, Transition, check_transition
from stepflow_common.step_outcome import ChildTally, children_done, final_step_status

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- the reference model -------------------------------------------------------------------------
STATUSES = ["pending", "running", "spawned", "completed", "failed", "cancelled", "skipped"]
TERMINAL = {"completed", "failed", "cancelled", "skipped"}
RANK = {"pending": 0, "running": 1, "spawned": 2, **dict.fromkeys(TERMINAL, 3)}
RESERVED = {"step_stats", "current_step_id", "current_step_status", "completed_steps"}
STEP_IDS = [f"s{i}" for i in range(6)]


def may_replace(old: str, new: str) -> bool:
    """design §2's order: the same status, or strictly forward from a live one."""
    return new == old or (old not in TERMINAL and RANK[new] > RANK[old])


def model_entries(
    current: list[dict[str, Any]], patch: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    entries = [dict(e) for e in current]
    by_id = {e["step_id"]: e for e in entries}
    for raw in patch:
        entry = by_id.get(raw["step_id"])
        if entry is None:
            entry = by_id[raw["step_id"]] = {}
            entries.append(entry)
        for key, value in raw.items():
            if key == "status" and "status" in entry and not may_replace(entry["status"], value):
                continue
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
    return sorted(entries, key=lambda e: e.get("step_index", float("inf")))


def ended(entries: list[dict[str, Any]]) -> int:
    return sum(1 for e in entries if e.get("status") in TERMINAL)


# -- strategies ----------------------------------------------------------------------------------
json_leaf = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
plain_key = st.text(alphabet="abcxyz_", min_size=1, max_size=4).filter(lambda k: k not in RESERVED)
status = st.sampled_from(STATUSES)


@st.composite
def current_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A stored manager document as the services keep it (valid, completed_steps right)."""
    ids = draw(st.lists(st.sampled_from(STEP_IDS), unique=True, max_size=5))
    entries = []
    for i, step_id in enumerate(ids):
        entry: dict[str, Any] = {"step_id": step_id, "status": draw(status)}
        if draw(st.booleans()):
            entry["step_index"] = draw(st.integers(0, 6)) if draw(st.booleans()) else i
        if draw(st.booleans()):
            entry["child_count"] = draw(st.integers(0, 50))
        if draw(st.booleans()):
            entry["error"] = draw(st.text(max_size=5))
        entries.append(entry)
    entries.sort(key=lambda e: e.get("step_index", float("inf")))
    doc: dict[str, Any] = draw(
        st.dictionaries(plain_key, json_value.filter(lambda v: v is not None), max_size=4)
    )
    if entries or draw(st.booleans()):
        doc["step_stats"] = entries
        doc["completed_steps"] = ended(entries)
    if draw(st.booleans()):
        doc["current_step_id"] = draw(st.sampled_from(STEP_IDS))
        doc["current_step_status"] = draw(status)
    return doc


@st.composite
def patches(draw: st.DrawFn) -> dict[str, Any]:
    """A valid UpdateJobMetadata request body."""
    patch: dict[str, Any] = draw(st.dictionaries(plain_key, json_value, max_size=4))
    if draw(st.booleans()):
        entries = []
        for _ in range(draw(st.integers(0, 4))):
            raw: dict[str, Any] = {"step_id": draw(st.sampled_from(STEP_IDS))}
            if draw(st.booleans()):
                raw["status"] = draw(status)
            if draw(st.booleans()):
                raw["step_index"] = draw(st.none() | st.integers(0, 6))
            if draw(st.booleans()):
                raw["child_count"] = draw(st.none() | st.integers(0, 50))
            if draw(st.booleans()):
                raw["error"] = draw(st.none() | st.text(max_size=5))
            if draw(st.booleans()):
                raw[draw(plain_key)] = draw(json_value)
            entries.append(raw)
        patch["step_stats"] = entries
    if draw(st.booleans()):
        patch["current_step_status"] = draw(st.none() | status)
    if draw(st.booleans()):
        patch["current_step_id"] = draw(st.sampled_from(STEP_IDS))
    return patch


# -- merge_metadata ------------------------------------------------------------------------------
@PROPERTY
@given(current_docs(), patches())
def test_merge_matches_the_reference_model(current: dict[str, Any], patch: dict[str, Any]) -> None:
    kept_current, kept_patch = copy.deepcopy(current), copy.deepcopy(patch)
    result = merge_metadata(current, patch)
    new = result.metadata
    assert current == kept_current and patch == kept_patch, "an input was mutated"

    # Shallow merge: each plain key of the patch replaces that key, a null deletes it, and
    # keys the patch does not name are kept as they were.
    for key in set(current) | set(patch):
        if key in RESERVED:
            continue
        if key not in patch:
            assert new[key] == current[key], key
        elif patch[key] is None:
            assert key not in new, key
        else:
            assert new[key] == patch[key], key
    if "current_step_id" in patch:
        assert new["current_step_id"] == patch["current_step_id"]
    elif "current_step_id" in current:
        assert new["current_step_id"] == current["current_step_id"]

    # step_stats: merged by step_id, nothing dropped, in step_index order, never backwards.
    if "step_stats" in patch:
        expected = model_entries(current.get("step_stats", []), patch["step_stats"])
        assert new["step_stats"] == expected
    elif "step_stats" in current:
        assert new["step_stats"] == current["step_stats"]
    old_entries = {e["step_id"]: e for e in current.get("step_stats", [])}
    for e in new.get("step_stats", []):
        before = old_entries.get(e["step_id"])
        if before is not None:  # a stored entry always has a status, and keeps one
            assert may_replace(before["status"], e["status"]), (before, e)
    if "step_stats" in new:
        assert new["completed_steps"] == ended(new["step_stats"])

    # current_step_status: guarded while the current step stays, free when it moves...
    old_css = current.get("current_step_status")
    moves = "current_step_id" in patch and patch["current_step_id"] != current.get(
        "current_step_id"
    )
    expected: Any = old_css
    if "current_step_status" in patch:
        requested = patch["current_step_status"]
        if moves or old_css is None or (requested is not None and may_replace(old_css, requested)):
            expected = requested
    # ...and it never stays behind the current step's own entry (the entry leads it forward).
    current_entry = next(
        (e for e in new.get("step_stats", []) if e["step_id"] == new.get("current_step_id")), None
    )
    entry_status = current_entry.get("status") if current_entry is not None else None
    touched = patch.keys() & {"step_stats", "current_step_id", "current_step_status"}
    if (
        touched
        and entry_status is not None
        and (expected is None or (expected != entry_status and may_replace(expected, entry_status)))
    ):
        expected = entry_status
    if expected is None:
        assert "current_step_status" not in new
    else:
        assert new["current_step_status"] == expected, (expected, new)
    if old_css is not None and not moves:
        assert may_replace(old_css, new["current_step_status"])

    assert result.changed == (new != current)


@PROPERTY
@given(current_docs(), patches())
def test_merge_is_idempotent(current: dict[str, Any], patch: dict[str, Any]) -> None:
    """Applying a request twice (a client retry) gives the same document as once."""
    once = merge_metadata(current, patch).metadata
    twice = merge_metadata(once, patch)
    assert twice.metadata == once
    assert not twice.changed


@PROPERTY
@given(current_docs(), st.lists(patches(), min_size=1, max_size=5))
def test_no_sequence_of_merges_moves_a_status_backwards(
    current: dict[str, Any], sequence: list[dict[str, Any]]
) -> None:
    """Whatever two writers send, in whatever order, a terminal entry stays as it is and every
    entry only climbs (design §1 bug 2: a late `spawned` cannot undo `completed`)."""
    doc = current
    for patch in sequence:
        new = merge_metadata(doc, patch).metadata
        before = {e["step_id"]: e.get("status") for e in doc.get("step_stats", [])}
        for e in new.get("step_stats", []):
            if before.get(e["step_id"]) is not None:
                assert may_replace(before[e["step_id"]], e["status"])
        assert {e["step_id"] for e in new.get("step_stats", [])} >= set(before)
        doc = new


def _bad_patch(kind: str, step_id: str) -> dict[str, Any]:
    return {
        "step_stats-null": {"step_stats": None},
        "step_stats-text": {"step_stats": "x"},
        "step_stats-object": {"step_stats": {"step_id": step_id}},
        "entry-number": {"step_stats": [3]},
        "entry-null": {"step_stats": [None]},
        "entry-no-step_id": {"step_stats": [{"status": "running"}]},
        "entry-empty-step_id": {"step_stats": [{"step_id": ""}]},
        "entry-numeric-step_id": {"step_stats": [{"step_id": 4}]},
        "entry-unknown-status": {"step_stats": [{"step_id": step_id, "status": "done"}]},
        "entry-numeric-status": {"step_stats": [{"step_id": step_id, "status": 3}]},
        "entry-status-null": {"step_stats": [{"step_id": step_id, "status": None}]},
        "entry-negative-index": {"step_stats": [{"step_id": step_id, "step_index": -1}]},
        "entry-fractional-index": {"step_stats": [{"step_id": step_id, "step_index": 0.5}]},
        "entry-text-index": {"step_stats": [{"step_id": step_id, "step_index": "0"}]},
        "entry-text-child_count": {"step_stats": [{"step_id": step_id, "child_count": "x"}]},
        "entry-bool-document_count": {"step_stats": [{"step_id": step_id, "document_count": True}]},
        "css-unknown": {"current_step_status": "done"},
        "css-number": {"current_step_status": 2},
        "css-list": {"current_step_status": ["running"]},
    }[kind]


BAD_KINDS = [
    "step_stats-null", "step_stats-text", "step_stats-object", "entry-number", "entry-null",
    "entry-no-step_id", "entry-empty-step_id", "entry-numeric-step_id", "entry-unknown-status",
    "entry-numeric-status", "entry-status-null", "entry-negative-index",
    "entry-fractional-index", "entry-text-index", "entry-text-child_count",
    "entry-bool-document_count", "css-unknown", "css-number", "css-list",
]  # fmt: skip


@PROPERTY
@given(current_docs(), patches(), st.sampled_from(BAD_KINDS), st.sampled_from(STEP_IDS))
def test_an_invalid_patch_is_invalid_argument_whatever_else_it_holds(
    current: dict[str, Any], patch: dict[str, Any], kind: str, step_id: str
) -> None:
    """One bad part spoils the whole request: InvalidArgument (never another exception), and
    the stored document is not touched."""
    bad = _bad_patch(kind, step_id)
    mixed = {**patch, **bad}
    if "step_stats" in bad and isinstance(bad["step_stats"], list) and "step_stats" in patch:
        mixed["step_stats"] = [*patch["step_stats"], *bad["step_stats"]]
    kept = copy.deepcopy(current)
    with pytest.raises(InvalidArgument) as err:
        merge_metadata(current, mixed)
    assert str(err.value)
    assert current == kept


# -- check_transition -----------------------------------------------------------------------------
statuses = st.sampled_from(list(Status))


def model_transition(current: Status, requested: Status) -> str:
    if requested == current:
        return "noop"
    if current.value in TERMINAL or RANK[requested.value] <= RANK[current.value]:
        return "conflict"
    return "forward"


@PROPERTY
@given(statuses, statuses)
def test_check_transition_matches_the_model(current: Status, requested: Status) -> None:
    want = model_transition(current, requested)
    if want == "conflict":
        with pytest.raises(StatusConflict) as err:
            check_transition(current, requested, what="job j1")
        assert "j1" in str(err.value) and current.value in str(err.value)
    else:
        got = check_transition(current, requested)
        assert got is (Transition.NOOP if want == "noop" else Transition.FORWARD)


@PROPERTY
@given(st.lists(statuses, max_size=12))
def test_accepted_changes_climb_the_order_and_end_at_most_once(requests: list[Status]) -> None:
    """Apply each request a client might send, in any order, keeping what is accepted: the
    history only climbs, has at most one terminal status, and nothing follows it."""
    history = [Status.PENDING]
    for requested in requests:
        try:
            if check_transition(history[-1], requested) is Transition.FORWARD:
                history.append(requested)
        except StatusConflict:
            pass
    ranks = [RANK[s.value] for s in history]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert sum(s.terminal for s in history) <= 1
    assert not any(s.terminal for s in history[:-1])


# -- final_step_status ----------------------------------------------------------------------------
def model_final(completed: int, failed: int, cancelled: int) -> Status:
    """design §2 path 5 (zero children: completed, path 4)."""
    if completed + failed + cancelled == 0 or completed > 0:
        return Status.COMPLETED
    if failed > 0:
        return Status.FAILED
    return Status.CANCELLED


counts = st.integers(0, 10_000)


@PROPERTY
@given(counts, counts, counts)
def test_final_step_status_matches_the_model(completed: int, failed: int, cancelled: int) -> None:
    status, error = final_step_status(ChildTally(0, 0, completed, failed, cancelled))
    assert status is model_final(completed, failed, cancelled)
    if status is Status.COMPLETED:
        assert error == ""
    elif status is Status.FAILED:
        assert str(failed) in error and str(failed + cancelled) in error
    else:
        assert str(cancelled) in error


@PROPERTY
@given(counts, counts, counts, st.integers(1, 100))
def test_more_completed_children_never_make_a_step_worse(
    completed: int, failed: int, cancelled: int, more: int
) -> None:
    order = {Status.COMPLETED: 2, Status.FAILED: 1, Status.CANCELLED: 0}
    before, _ = final_step_status(ChildTally(0, 0, completed, failed, cancelled))
    after, _ = final_step_status(ChildTally(0, 0, completed + more, failed, cancelled))
    assert after is Status.COMPLETED
    assert order[after] >= order[before]


@PROPERTY
@given(counts, counts, counts, counts, counts, st.none() | counts)
def test_children_done_only_when_the_seal_is_met_and_nothing_is_live(
    pending: int, running: int, completed: int, failed: int, cancelled: int, sealed: int | None
) -> None:
    tally = ChildTally(pending, running, completed, failed, cancelled)
    want = (
        sealed is not None
        and pending == 0
        and running == 0
        and completed + failed + cancelled >= sealed
    )
    assert children_done(tally, sealed) == want


# -- the monitor's own writers of an entry --------------------------------------------------------
@PROPERTY
@given(current_docs(), st.sampled_from(STEP_IDS), statuses)
def test_step_stat_update_follows_check_transition(
    doc: dict[str, Any], step_id: str, requested: Status
) -> None:
    entries = {e["step_id"]: e for e in doc.get("step_stats", [])}
    if step_id not in entries:
        return
    old = Status(entries[step_id]["status"])
    want = model_transition(old, requested)
    if want == "conflict":
        with pytest.raises(StatusConflict):
            set_step_stat_status(doc, step_id, requested)
        return
    update = set_step_stat_status(doc, step_id, requested)
    assert update.entry["status"] == requested.value
    assert update.changed == (want == "forward")
    assert update.metadata["completed_steps"] == ended(update.metadata["step_stats"])
    others = {e["step_id"]: e for e in update.metadata["step_stats"] if e["step_id"] != step_id}
    assert others == {k: v for k, v in entries.items() if k != step_id}


@PROPERTY
@given(current_docs(), st.sampled_from(STEP_IDS), statuses, st.text(max_size=5))
def test_a_step_row_change_reaches_its_entry_only_forwards(
    doc: dict[str, Any], step_id: str, row_status: Status, error: str
) -> None:
    facts = StepFacts(step_id, "name", "type", None, row_status, error)
    new = record_step_status(doc, facts)
    before = {e["step_id"]: e["status"] for e in doc.get("step_stats", [])}
    entry = next(e for e in new["step_stats"] if e["step_id"] == step_id)
    old = before.get(step_id, "pending")
    assert entry["status"] == (row_status.value if may_replace(old, row_status.value) else old)
    assert may_replace(old, entry["status"])
    assert new["completed_steps"] == ended(new["step_stats"])
    if new.get("current_step_id") == step_id and doc.get("current_step_status") is not None:
        assert may_replace(doc["current_step_status"], new["current_step_status"])
    for other, status_before in before.items():
        if other != step_id:
            after = next(e for e in new["step_stats"] if e["step_id"] == other)
            assert after["status"] == status_before
