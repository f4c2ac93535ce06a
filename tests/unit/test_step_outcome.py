"""How a step that spawned children ends (design §2, path 5): the one pure rule, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepflow_common.status import Status
from stepflow_common.step_outcome import ChildTally, children_done, final_step_status


@pytest.mark.parametrize(
    "tally, status",
    [
        (ChildTally(), Status.COMPLETED),  # no children at all
        (ChildTally(completed=5), Status.COMPLETED),  # all completed
        (ChildTally(completed=1, failed=4), Status.COMPLETED),  # some completed, some failed
        (ChildTally(completed=1, cancelled=3), Status.COMPLETED),
        (ChildTally(completed=2, failed=1, cancelled=1), Status.COMPLETED),
        (ChildTally(failed=2), Status.FAILED),  # none completed, some failed
        (ChildTally(failed=1, cancelled=9), Status.FAILED),
        (ChildTally(cancelled=3), Status.CANCELLED),  # none completed, none failed
    ],
)
def test_final_status_rules(tally: ChildTally, status: Status) -> None:
    assert final_step_status(tally)[0] is status


def test_completed_carries_no_error() -> None:
    assert final_step_status(ChildTally(completed=3, failed=2)) == (Status.COMPLETED, "")
    assert final_step_status(ChildTally()) == (Status.COMPLETED, "")


def test_failed_error_counts_the_failed_children() -> None:
    status, error = final_step_status(ChildTally(failed=2, cancelled=1))
    assert status is Status.FAILED
    assert error == "2 of 3 child jobs failed"


def test_cancelled_error_counts_the_cancelled_children() -> None:
    status, error = final_step_status(ChildTally(cancelled=4))
    assert status is Status.CANCELLED
    assert error == "all 4 child jobs were cancelled"


@given(completed=st.integers(0, 50), failed=st.integers(0, 50), cancelled=st.integers(0, 50))
def test_final_status_for_any_all_terminal_tally(
    completed: int, failed: int, cancelled: int
) -> None:
    tally = ChildTally(completed=completed, failed=failed, cancelled=cancelled)
    status, error = final_step_status(tally)
    if completed > 0 or completed + failed + cancelled == 0:
        assert (status, error) == (Status.COMPLETED, "")
    elif failed > 0:
        assert status is Status.FAILED and str(failed) in error
    else:
        assert status is Status.CANCELLED and str(cancelled) in error
    assert status.terminal


def test_tally_totals() -> None:
    tally = ChildTally(pending=1, running=2, completed=3, failed=4, cancelled=5)
    assert tally.total == 15
    assert tally.terminal == 12


@pytest.mark.parametrize(
    "tally, sealed, done",
    [
        (ChildTally(completed=3), None, False),  # never done before the seal
        (ChildTally(), 0, True),  # sealed with zero children
        (ChildTally(completed=2, failed=1), 3, True),
        (ChildTally(completed=2, running=1), 3, False),
        (ChildTally(completed=2, pending=1), 3, False),
        (ChildTally(completed=2), 3, False),  # one child not seen yet
        (ChildTally(cancelled=3), 3, True),
    ],
)
def test_children_done(tally: ChildTally, sealed: int | None, done: bool) -> None:
    assert children_done(tally, sealed) is done
