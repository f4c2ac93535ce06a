"""The status-order rule (design §2) and the one error→status-code table, with no I/O."""

from __future__ import annotations

import itertools

import grpc
import pytest

from stepflow_common import errors
from stepflow_common.grpc_errors import code_for
from stepflow_common.status import (
    TERMINAL,
    Kind,
    Status,
    Transition,
    check_status_for_kind,
    check_transition,
    is_forward,
    parse_status,
)

# The order as design §2 writes it, independent of the module's own rank table.
LIVE_ORDER = [Status.PENDING, Status.RUNNING, Status.SPAWNED]
TERMINALS = [Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.SKIPPED]
ALL = LIVE_ORDER + TERMINALS


def _position(status: Status) -> int:
    return LIVE_ORDER.index(status) if status in LIVE_ORDER else len(LIVE_ORDER)


def test_statuses_and_their_lower_case_names() -> None:
    assert [s.value for s in Status] == [
        "pending",
        "running",
        "spawned",
        "completed",
        "failed",
        "cancelled",
        "skipped",
    ]
    assert set(TERMINAL) == set(TERMINALS)
    for status in ALL:
        assert status.terminal is (status in TERMINALS)


def test_rank_orders_pending_running_spawned_then_every_terminal_equal() -> None:
    assert Status.PENDING.rank < Status.RUNNING.rank < Status.SPAWNED.rank
    for terminal in TERMINALS:
        assert terminal.rank > Status.SPAWNED.rank
        assert terminal.rank == Status.COMPLETED.rank


@pytest.mark.parametrize("name", [s.value for s in Status])
def test_parse_status_accepts_every_lower_case_name(name: str) -> None:
    assert parse_status(name) is Status(name)


@pytest.mark.parametrize("bad", ["", "COMPLETED", "Running", "done", None, 3, "unspecified"])
def test_parse_status_rejects_anything_else(bad: object) -> None:
    with pytest.raises(errors.InvalidArgument, match="unknown status"):
        parse_status(bad)


@pytest.mark.parametrize("current, requested", [(s, s) for s in ALL])
def test_asking_for_the_current_status_is_a_noop(current: Status, requested: Status) -> None:
    assert check_transition(current, requested) is Transition.NOOP


@pytest.mark.parametrize(
    "current, requested",
    [(c, r) for c, r in itertools.permutations(ALL, 2) if c in TERMINALS],
)
def test_a_terminal_status_is_final(current: Status, requested: Status) -> None:
    with pytest.raises(errors.StatusConflict, match="final"):
        check_transition(current, requested)
    assert not is_forward(current, requested)


@pytest.mark.parametrize(
    "current, requested",
    [
        (c, r)
        for c, r in itertools.permutations(ALL, 2)
        if c not in TERMINALS and _position(r) < _position(c)
    ],
)
def test_backwards_moves_are_refused(current: Status, requested: Status) -> None:
    with pytest.raises(errors.StatusConflict, match="back"):
        check_transition(current, requested, what="step s1")
    assert not is_forward(current, requested)


@pytest.mark.parametrize(
    "current, requested",
    [
        (c, r)
        for c, r in itertools.permutations(ALL, 2)
        if c not in TERMINALS and _position(r) > _position(c)
    ],
)
def test_forward_moves_are_allowed(current: Status, requested: Status) -> None:
    assert check_transition(current, requested) is Transition.FORWARD
    assert is_forward(current, requested)


def test_every_pair_is_classified_exactly_once() -> None:
    outcomes: dict[str, int] = {"noop": 0, "forward": 0, "conflict": 0}
    for current, requested in itertools.product(ALL, ALL):
        try:
            outcomes[check_transition(current, requested).value] += 1
        except errors.StatusConflict:
            outcomes["conflict"] += 1
    # 7 no-ops; forward: pending->6, running->5, spawned->4; the rest (49-7-15) refused.
    assert outcomes == {"noop": 7, "forward": 15, "conflict": 27}


def test_is_forward_is_false_for_the_same_status() -> None:
    for status in ALL:
        assert not is_forward(status, status)


def test_conflict_message_names_the_job_and_both_statuses() -> None:
    with pytest.raises(errors.StatusConflict) as info:
        check_transition(Status.COMPLETED, Status.FAILED, what="step abc")
    text = str(info.value)
    assert "step abc" in text and "completed" in text and "failed" in text


@pytest.mark.parametrize("kind", [Kind.MANAGER, Kind.CHILD])
@pytest.mark.parametrize("status", [Status.SPAWNED, Status.SKIPPED])
def test_spawned_and_skipped_are_for_steps_only(kind: Kind, status: Status) -> None:
    with pytest.raises(errors.InvalidArgument, match="steps only"):
        check_status_for_kind(kind, status)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("status", [s for s in ALL if s not in (Status.SPAWNED, Status.SKIPPED)])
def test_other_statuses_apply_to_every_kind(kind: Kind, status: Status) -> None:
    check_status_for_kind(kind, status)


@pytest.mark.parametrize("status", ALL)
def test_every_status_applies_to_a_step(status: Status) -> None:
    check_status_for_kind(Kind.STEP, status)


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.StatusConflict("completed", "running"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.VersionConflict("j", 1, 2), grpc.StatusCode.ABORTED),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.StepflowError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_domain_error_maps_to_its_status_code(
    exc: errors.StepflowError, code: grpc.StatusCode
) -> None:
    assert code_for(exc) is code


def test_version_conflict_carries_its_data_and_an_actionable_message() -> None:
    exc = errors.VersionConflict.stale("job-1", 3, 5)
    assert "job-1" in str(exc) and "3" in str(exc) and "5" in str(exc)


def test_every_status_and_kind_has_one_protobuf_value_both_ways() -> None:
    from stepflow_common.proto_status import (
        KIND_FROM_PB,
        KIND_TO_PB,
        STATUS_FROM_PB,
        STATUS_TO_PB,
        TERMINAL_PB,
    )

    assert set(STATUS_TO_PB) == set(Status) and set(KIND_TO_PB) == set(Kind)
    assert {STATUS_FROM_PB[v] for v in STATUS_TO_PB.values()} == set(Status)
    assert {KIND_FROM_PB[v] for v in KIND_TO_PB.values()} == set(Kind)
    assert {STATUS_FROM_PB[v] for v in TERMINAL_PB} == {s for s in Status if s.terminal}
