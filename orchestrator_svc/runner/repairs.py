"""Events the monitor rejected: a child's end is then written directly, and what cannot be
recorded is kept so that its step never claims an outcome its record does not hold."""

from __future__ import annotations

import asyncio

from orchestrator_svc.records import ChildEvent, EventKind
from orchestrator_svc.runner.context import JobContext, log
from orchestrator_svc.runner.step_state import StepRun
from stepflow_common.errors import StatusConflict, StepflowError
from stepflow_common.status import EndReason, Status

TERMINAL_EVENT_STATUS = {
    EventKind.COMPLETED: Status.COMPLETED,
    EventKind.FAILED: Status.FAILED,
    EventKind.CANCELLED: Status.CANCELLED,
}


class Repairs:
    def __init__(self, job: JobContext) -> None:
        self.job = job

    def on_event_rejected(self, event: ChildEvent, reason: str) -> bool:
        """The monitor rejected (or refused) one of this job's events; False if not ours.

        A rejected terminal event would leave its child live in the record while the worker
        has ended it, and the step would then be decided from a tally missing that child. So
        the child's end is written through UpdateJobStatus instead (the same transition the
        event makes); what cannot be written is kept, and the step ends ``failed`` naming it.
        """
        step = self.job.by_id.get(event.step_id)
        if step is None:
            return False
        status = TERMINAL_EVENT_STATUS.get(event.kind)
        if status is not None:
            step.repairs.append(
                asyncio.create_task(
                    self._repair_child(step, event.child_id, status, event.error, reason)
                )
            )
        elif event.kind == EventKind.SEALED:
            step.unrecorded.append(f"its seal was rejected: {reason}")
            if step.handed:
                step.repairs.append(asyncio.create_task(self.fail_unrecorded(step)))
        return True

    async def _repair_child(
        self, step: StepRun, child_id: str, status: Status, error: str, reason: str
    ) -> None:
        try:
            current = await self.job.monitor.get_job(child_id)
            if current.status.terminal:
                return  # the monitor had already ended it (a cancel): its record stands
            await self.job.write_status(child_id, status, error, EndReason.ORCHESTRATOR)
            log.warning(
                "child's end recorded directly after its event was rejected",
                child_id=child_id,
                status=status.value,
                reason=reason,
            )
            return
        except StatusConflict:
            return  # ended meanwhile
        except StepflowError as exc:
            why = str(exc)
        log.error(
            "a child's end could not be recorded",
            step_id=step.job_id,
            child_id=child_id,
            status=status.value,
            reason=reason,
            error=why,
        )
        step.unrecorded.append(
            f"child {child_id[:128]!r} ended {status} but the monitor rejected it ({reason})"
        )
        if step.handed:
            await self.fail_unrecorded(step)

    async def fail_unrecorded(self, step: StepRun) -> None:
        """A handed-off step whose children cannot all be recorded would wait out its
        deadline: it fails now, saying why."""
        if not step.ended.is_set():
            await self.job.end_step(step, Status.FAILED, step.unrecorded_error())
