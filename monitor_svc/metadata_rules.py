"""Pure rules for a manager's metadata document (design §2). No I/O, no gRPC, no SQL.

The metadata is one JSON object shared by two writers (orchestrator and monitor), so every
rule here is a function from (current document, request) to a new document; the store applies
it under a row lock. Statuses inside the document never move backwards.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from stepflow_common.errors import FailedPrecondition, InvalidArgument, NotFound
from stepflow_common.limits import MAX_STEP_STAT_ERROR_CHARS, truncate_text
from stepflow_common.manager_document import (
    CHILD_COUNT,
    COMPLETED_STEPS,
    CURRENT_STEP_ID,
    CURRENT_STEP_STATUS,
    DOCUMENT_COUNT,
    ERROR,
    STATUS,
    STEP_ID,
    STEP_INDEX,
    STEP_NAME,
    STEP_STATS,
    STEP_TYPE,
)
from stepflow_common.status import Status, Transition, check_transition, is_forward, parse_status
from stepflow_common.step_outcome import ChildTally

log = structlog.get_logger(__name__)

TEXT_FIELDS = (STEP_NAME, STEP_TYPE, ERROR)
# Whole numbers in an entry: JSON (a double) holds them exactly up to 2**53; step_index is an
# int32 in the typed StepStat.
MAX_WHOLE = 2**53
MAX_STEP_INDEX = 2**31 - 1
Metadata = dict[str, Any]


@dataclass(slots=True)
class MergeResult:
    metadata: Metadata
    changed: bool
    ignored: list[str] = field(default_factory=list)  # writes refused by the status guard


def merge_metadata(current: Mapping[str, Any], patch: Mapping[str, Any]) -> MergeResult:
    """Shallow merge: each key of ``patch`` replaces that key; ``None`` deletes it.

    ``step_stats`` is merged entry by entry (matched by ``step_id``), kept in ``step_index``
    order, and no entry's status moves backwards. ``current_step_status`` is guarded the same
    way unless the patch also moves ``current_step_id`` to another step.
    """
    new: Metadata = dict(current)
    ignored: list[str] = []
    for key, value in patch.items():
        if key == COMPLETED_STEPS:
            # Derived: the monitor's count of ended steps. A client's value (or delete) is
            # ignored rather than refused, so a client that writes the counters keeps working.
            ignored.append(f"completed_steps {value!r} (the monitor counts ended steps)")
        elif key == STEP_STATS:
            if value is None:
                raise InvalidArgument("metadata.step_stats cannot be deleted")
            new[STEP_STATS] = _merge_step_stats(current.get(STEP_STATS), value, ignored)
        elif value is None:
            new.pop(key, None)
        else:
            new[key] = copy.deepcopy(value)
    _guard_current_step_status(current, patch, new, ignored)
    if STEP_STATS in patch and new[STEP_STATS] != current.get(STEP_STATS):
        new[COMPLETED_STEPS] = count_ended_steps(new[STEP_STATS])
    if patch.keys() & {STEP_STATS, CURRENT_STEP_ID, CURRENT_STEP_STATUS} and isinstance(
        new.get(STEP_STATS), list
    ):
        _follow_current_entry(new)
    for what in ignored:
        log.info("metadata write ignored", reason=what)
    return MergeResult(new, new != current, ignored)


def _follow_current_entry(new: Metadata) -> None:
    current_id = new.get(CURRENT_STEP_ID)
    entry = next((e for e in new[STEP_STATS] if e.get(STEP_ID) == current_id), None)
    if entry is None:
        return
    entry_status = _status_or_none(entry.get(STATUS))
    if entry_status is not None:
        _current_follows(new, current_id, entry_status)


def _current_follows(new: Metadata, step_id: Any, status: Status) -> bool:
    """The one rule tying current_step_status to its entry: when the entry of the current
    step moves forward, current_step_status follows it, so the two never disagree (the first
    failure this design exists to prevent). True if it moved."""
    if new.get(CURRENT_STEP_ID) != step_id:
        return False
    shown = _status_or_none(new.get(CURRENT_STEP_STATUS))
    if shown is not None and not is_forward(shown, status):
        return False
    new[CURRENT_STEP_STATUS] = status.value
    return True


def _guard_current_step_status(
    current: Mapping[str, Any], patch: Mapping[str, Any], new: Metadata, ignored: list[str]
) -> None:
    if CURRENT_STEP_STATUS not in patch:
        return
    requested = patch[CURRENT_STEP_STATUS]
    if requested is not None:
        parse_status(requested)
    moves_step = CURRENT_STEP_ID in patch and patch[CURRENT_STEP_ID] != current.get(CURRENT_STEP_ID)
    old = current.get(CURRENT_STEP_STATUS)
    if moves_step or old is None:
        return
    old_status = _status_or_none(old)
    if old_status is None:
        return
    if requested is None:  # deleting it would erase the status just as a backwards move would
        new[CURRENT_STEP_STATUS] = old
        ignored.append(f"current_step_status {old} -> deleted")
        return
    if requested != old and not is_forward(old_status, Status(requested)):
        new[CURRENT_STEP_STATUS] = old
        ignored.append(f"current_step_status {old} -> {requested}")


def _merge_step_stats(current: Any, patch: Any, ignored: list[str]) -> list[dict[str, Any]]:
    if not isinstance(patch, list):
        raise InvalidArgument("metadata.step_stats must be a list of objects")
    entries: list[dict[str, Any]] = [dict(e) for e in current] if isinstance(current, list) else []
    by_id = {e.get(STEP_ID): e for e in entries}
    for raw in patch:
        _validate_entry(raw)
        step_id = raw[STEP_ID]
        existing = by_id.get(step_id)
        if isinstance(raw.get(ERROR), str):
            raw = {**raw, ERROR: truncate_text(raw[ERROR], MAX_STEP_STAT_ERROR_CHARS)}
        if existing is None:
            entry = {k: v for k, v in raw.items() if v is not None}
            entries.append(entry)
            by_id[step_id] = entry
            continue
        for key, value in raw.items():
            if key == STATUS:
                old = _status_or_none(existing.get(STATUS))
                if old is not None and value != old.value and not is_forward(old, Status(value)):
                    ignored.append(f"step_stats[{step_id}].status {old} -> {value}")
                    continue
            if value is None:
                existing.pop(key, None)
            else:
                existing[key] = copy.deepcopy(value)
    return sort_entries(entries)


def _validate_entry(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise InvalidArgument("each metadata.step_stats entry must be an object")
    step_id = raw.get(STEP_ID)
    if not isinstance(step_id, str) or not step_id:
        raise InvalidArgument("each metadata.step_stats entry needs a non-empty string step_id")
    if raw.get(STATUS) is None and STATUS in raw:
        raise InvalidArgument(f"step_stats[{step_id}].status cannot be deleted")
    if STATUS in raw:
        parse_status(raw[STATUS])
    index = raw.get(STEP_INDEX)
    if index is not None and (not _is_whole(index) or not 0 <= index <= MAX_STEP_INDEX):
        raise InvalidArgument(
            f"step_stats[{step_id}].step_index must be a whole number from 0 to {MAX_STEP_INDEX}"
        )
    for name in (CHILD_COUNT, DOCUMENT_COUNT):
        value = raw.get(name)
        if value is not None and (not _is_whole(value) or abs(value) > MAX_WHOLE):
            raise InvalidArgument(
                f"step_stats[{step_id}].{name} must be a whole number of at most 2**53"
            )
    for name in TEXT_FIELDS:
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"step_stats[{step_id}].{name} must be a string")


def _is_whole(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value == int(value)
    )


def sort_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the array in step order; entries without an index keep their place at the end."""
    big = float("inf")
    return sorted(entries, key=lambda e: e.get(STEP_INDEX, big))


_ENDED = frozenset(s.value for s in Status if s.terminal)


def count_ended_steps(entries: list[dict[str, Any]]) -> int:
    # Plain text lookups: this runs over every entry on every step-stat write.
    ended = _ENDED
    return sum(1 for e in entries if isinstance(status := e.get(STATUS), str) and status in ended)


def _status_or_none(value: Any) -> Status | None:
    try:
        return Status(value)
    except ValueError:
        return None


@dataclass(slots=True)
class StepStatUpdate:
    metadata: Metadata
    entry: dict[str, Any]
    changed: bool
    current_step_status_changed: bool


def set_step_stat_status(
    metadata: Mapping[str, Any], step_id: str, status: Status
) -> StepStatUpdate:
    """UpdateStepStatInManager: one entry's status (and current_step_status), never backwards."""
    entries = metadata.get(STEP_STATS)
    if not isinstance(entries, list):
        raise FailedPrecondition("the manager's metadata has no step_stats yet")
    index = next((i for i, e in enumerate(entries) if e.get(STEP_ID) == step_id), None)
    if index is None:
        raise NotFound(f"step {step_id} is not in the manager's step_stats")
    entry = entries[index]
    old = _status_or_none(entry.get(STATUS)) or Status.PENDING
    if check_transition(old, status, what=f"step {step_id} in step_stats") is Transition.NOOP:
        return StepStatUpdate(dict(metadata), dict(entry), False, False)
    new_entries = list(entries)
    new_entry = {**entry, STATUS: status.value}
    new_entries[index] = new_entry
    new: Metadata = {**metadata, STEP_STATS: new_entries}
    current_changed = _current_follows(new, step_id, status)
    new[COMPLETED_STEPS] = count_ended_steps(new_entries)
    return StepStatUpdate(new, new_entry, new != metadata, current_changed)


@dataclass(frozen=True, slots=True)
class StepFacts:
    """What the manager's step_stats entry says about a step, from the step's own row."""

    step_id: str
    step_name: str
    step_type: str
    step_index: int | None
    status: Status
    error: str
    child_count: int | None = None
    tally: ChildTally | None = None


def record_step_status(metadata: Mapping[str, Any], facts: StepFacts) -> Metadata:
    """A step's row changed status: carry it into step_stats, current_step_status, counters.

    Only forwards: an entry already further on stays as it is. A step with no entry yet gets
    one (a skipped step is recorded when it is skipped).
    """
    raw_entries = metadata.get(STEP_STATS)
    entries: list[dict[str, Any]] = list(raw_entries) if isinstance(raw_entries, list) else []
    index = next((i for i, e in enumerate(entries) if e.get(STEP_ID) == facts.step_id), None)
    if index is None:
        entry: dict[str, Any] = {
            STEP_INDEX: facts.step_index if facts.step_index is not None else len(entries),
            STEP_ID: facts.step_id,
            STEP_NAME: facts.step_name,
            STEP_TYPE: facts.step_type,
            CHILD_COUNT: 0,
            DOCUMENT_COUNT: 0,
            STATUS: Status.PENDING.value,
            ERROR: "",
        }
        entries.append(entry)
        index = len(entries) - 1
    else:
        entry = dict(entries[index])
    old = _status_or_none(entry.get(STATUS)) or Status.PENDING
    if facts.status != old and is_forward(old, facts.status):
        entry[STATUS] = facts.status.value
        if facts.error:
            entry[ERROR] = truncate_text(facts.error, MAX_STEP_STAT_ERROR_CHARS)
        if facts.status.terminal:
            if facts.child_count is not None:
                entry[CHILD_COUNT] = facts.child_count
            if facts.tally is not None:
                entry["children"] = tally_dict(facts.tally)
    entries[index] = entry
    new: Metadata = {**metadata, STEP_STATS: sort_entries(entries)}
    _current_follows(new, facts.step_id, facts.status)
    new[COMPLETED_STEPS] = count_ended_steps(new[STEP_STATS])
    return new


def record_child_count(metadata: Mapping[str, Any], step_id: str, child_count: int) -> Metadata:
    """A seal's child_count becomes the step's step_stats.child_count."""
    entries = metadata.get(STEP_STATS)
    if not isinstance(entries, list):
        return dict(metadata)
    new_entries = [
        {**e, CHILD_COUNT: child_count} if e.get(STEP_ID) == step_id else e for e in entries
    ]
    return {**metadata, STEP_STATS: new_entries}


def tally_dict(tally: ChildTally) -> dict[str, int]:
    return {
        "pending": tally.pending,
        "running": tally.running,
        "completed": tally.completed,
        "failed": tally.failed,
        "cancelled": tally.cancelled,
    }
