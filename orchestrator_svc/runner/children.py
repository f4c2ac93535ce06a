"""A step's children as its worker reports them: each transition counted in the step's tally
and sent on the event stream, and the hooks a worker's ``StepContext`` calls."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from orchestrator_svc import metrics
from orchestrator_svc.definitions import Executor, OnInterrupt
from orchestrator_svc.runner.context import JobContext, log
from orchestrator_svc.runner.dispatch import CeleryDispatch
from orchestrator_svc.runner.step_state import StepRun
from orchestrator_svc.workers.base import ChildStatus, StepContext
from stepflow_common.errors import FailedPrecondition
from stepflow_common.status import Status

ChildTransition = Literal["created", "running", "completed", "failed", "cancelled"]
_CHILD_ENDS: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class Children:
    """The children of every step of one job."""

    def __init__(self, job: JobContext, *, rerun_after: float) -> None:
        self.job = job
        # A resumed job: children (and a step) interrupted in a superseded instance run again
        # only after this time.monotonic() value, when that instance's processes are gone.
        self.rerun_after = rerun_after

    async def until_rerun_allowed(self) -> None:
        """Wait until work interrupted in a superseded instance is known stopped."""
        delay = self.rerun_after - time.monotonic()
        if delay > 0:
            log.info(
                "waiting for the superseded instance's lease before running work again",
                manager_id=self.job.manager_id,
                wait_s=round(delay, 2),
            )
            await asyncio.sleep(delay)

    def context(self, step: StepRun) -> StepContext:
        """The worker's view of ``step``: its config and the hooks that report children."""
        must_run_once = step.spec.on_interrupt is OnInterrupt.FAIL

        async def child_running(child_id: str, attempt: int = 1, /) -> None:
            """Work that must not run twice (``on_interrupt = "fail"``) starts only once its
            ``running`` (with its attempt) is committed: a child the monitor shows ``pending``
            has not started anywhere, so an orchestrator lost before the commit is never
            followed by a second run. Other work starts at once: every process it starts dies
            with this orchestrator (``process_guard``), so a run lost before its commit is
            simply run again, never beside itself (waiting would cost every child a commit)."""
            if self.rerun_after:
                before = step.existing.get(child_id)
                if before is not None and before.status == Status.RUNNING.value:
                    await self.until_rerun_allowed()
            seq = await self.event(step, child_id, "running", attempt=attempt)
            if must_run_once:
                await self.job.stream.wait_acked(seq)
                if self.job.fenced:
                    raise asyncio.CancelledError  # rejected: another instance owns the job

        async def child_created(child_id: str, name: str) -> None:
            await self.event(step, child_id, "created", name=name)

        async def child_finished(child_id: str, status: ChildStatus, error: str) -> None:
            await self.event(step, child_id, status, error=error)

        async def write_log(
            message: str,
            /,
            *,
            source: str = "log",
            level: str = "info",
            child_id: str = "",
            attempt: int = 0,
        ) -> None:
            """A line of the step's (or a child's) output, on the stream with its events."""
            if self.job.fenced:
                return  # the job's new owner writes its log now
            step.last_log_seq = await self.job.stream.emit_log(
                step.job_id, message, source=source, level=level, child_id=child_id, attempt=attempt
            )

        return StepContext(
            step_id=step.job_id,
            step_name=step.spec.name,
            config=step.spec.config,
            child_created=child_created,
            child_running=child_running,
            child_finished=child_finished,
            cancelled=step.cancel,
            child_cancel=lambda cid: step.child(cid).signal,
            attempt=step.attempt,
            retry=step.spec.retry,
            existing_children=step.existing,
            draining=self.job.draining,
            write_log=write_log,
            dispatch=self._dispatch(step),
        )

    def _dispatch(self, step: StepRun) -> CeleryDispatch | None:
        if step.spec.executor is not Executor.CELERY:
            return None
        if self.job.publisher is None:
            raise FailedPrecondition(
                f'step {step.spec.name} runs its children on runners (executor = "celery"), '
                "and this orchestrator has no --broker-url"
            )
        return CeleryDispatch(self.job, step, self.job.publisher)

    async def event(
        self,
        step: StepRun,
        child_id: str,
        kind: ChildTransition,
        *,
        name: str = "",
        error: str = "",
        attempt: int = 0,
    ) -> int:
        """Count one transition of a child and send it; its stream sequence number."""
        if kind == "created":
            step.counts.created()
        elif kind == "running":
            step.counts.started(child_id)
        else:
            if kind not in _CHILD_ENDS:
                raise ValueError(f"not how a child ends: {kind!r}")
            status: ChildStatus = kind
            step.counts.ended(child_id, status)
            metrics.observe_child_end(step.spec.type, status)
            control = step.children.pop(child_id, None)
            if control is not None:
                control.ended.set()
            if status == "failed":
                self.job.count_child_failures()
            elif status == "cancelled":
                step.cancelled_sent += 1
        seq = await self.job.stream.emit_child(
            kind, step.job_id, child_id, error=error, name=name, attempt=attempt
        )
        if kind == "created" and not step.first_child.is_set():
            step.first_child_seq = seq
            step.first_child.set()
        return seq
