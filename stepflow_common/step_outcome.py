"""How a step that spawned children ends: one pure rule, shared by both services (design §2)."""

from __future__ import annotations

from dataclasses import dataclass

from stepflow_common.status import Status


@dataclass(frozen=True, slots=True)
class ChildTally:
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def total(self) -> int:
        return self.pending + self.running + self.completed + self.failed + self.cancelled

    @property
    def terminal(self) -> int:
        return self.completed + self.failed + self.cancelled


def final_step_status(tally: ChildTally) -> tuple[Status, str]:
    """The status (and error text) of a step whose children are all terminal.

    No children or all completed -> completed; some completed and some failed -> completed
    (the failed count stays in the counts); none completed and some failed -> failed; none
    completed and none failed, i.e. all cancelled -> cancelled.
    """
    if tally.completed > 0 or tally.terminal == 0:
        return Status.COMPLETED, ""
    if tally.failed > 0:
        return Status.FAILED, f"{tally.failed} of {tally.terminal} child jobs failed"
    return Status.CANCELLED, f"all {tally.cancelled} child jobs were cancelled"


def children_done(tally: ChildTally, sealed_count: int | None) -> bool:
    """True once a sealed step has seen all its children reach a terminal status."""
    return (
        sealed_count is not None
        and tally.terminal >= sealed_count
        and tally.pending == 0
        and (tally.running == 0)
    )
