"""What every part of a job's run shares: its steps, its stop, its connection to the monitor,
and the writes that end a step (the one place a step's end is recorded in the runner)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import structlog

from orchestrator_svc import metrics
from orchestrator_svc.definitions import JobSpec, OnError
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import JobFenced, MonitorClient
from orchestrator_svc.records import Job
from orchestrator_svc.remote.publisher import Publisher
from orchestrator_svc.runner.step_state import StepRun
from orchestrator_svc.runner.stop import ChildFailures, Stop
from stepflow_common import manager_document as document
from stepflow_common.errors import FailedPrecondition, StatusConflict
from stepflow_common.status import EndReason, Status

log = structlog.get_logger("orchestrator_svc.runner")

T = TypeVar("T")


class JobContext:
    """One job's shared state in this orchestrator."""

    def __init__(
        self,
        spec: JobSpec,
        manager_id: str,
        steps: list[StepRun],
        *,
        monitor: MonitorClient,
        stream: EventStream,
        owner: str,
        publisher: Publisher | None = None,
    ) -> None:
        self.spec = spec
        # The broker of this orchestrator's executor-celery steps (None: it has none).
        self.publisher = publisher
        self.manager_id = manager_id
        self.steps = steps
        self.by_id = {s.job_id: s for s in steps}
        self.monitor = monitor
        self.stream = stream
        self.owner = owner
        self.stop = Stop()
        self.child_failures = ChildFailures()
        # Writes made beside the job's flow, awaited before it ends (a bare task may be
        # garbage-collected, or land after the manager is final).
        self.side_writes: list[asyncio.Task[Job]] = []
        # Drained (shutdown): no new step or child starts, and what is left unfinished stays
        # unrecorded for the next owner. Fenced: another orchestrator owns the job now.
        self.draining = asyncio.Event()
        self.fenced = False
        self.task: asyncio.Task[Any] | None = None

    def step_named(self, name: str) -> StepRun:
        return next(s for s in self.steps if s.spec.name == name)

    # -- writes ----------------------------------------------------------------------------
    async def write_status(
        self, job_id: str, status: Status, error: str = "", end_reason: str = ""
    ) -> Job:
        return await self._fenced(
            self.monitor.update_status(job_id, status, error, end_reason, owner=self.owner)
        )

    async def write_metadata(self, job_id: str, metadata: dict[str, Any]) -> Job:
        return await self._fenced(self.monitor.update_metadata(job_id, metadata, owner=self.owner))

    async def _fenced(self, write: Awaitable[T]) -> T:
        try:
            return await write
        except JobFenced:
            self.fence()
            raise

    def fence(self, why: str = "another orchestrator owns it now") -> None:
        """Stop all the job's work here at once (processes killed) without writing anything
        more for it: another orchestrator owns it now (or will, after a shutdown)."""
        if self.fenced:
            return
        self.fenced = True
        log.warning("job's work here stops", manager_id=self.manager_id, why=why)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- a step's end ------------------------------------------------------------------------
    async def end_step(
        self, step: StepRun, status: Status, error: str, *, reason: str = EndReason.ORCHESTRATOR
    ) -> None:
        if step.last_log_seq:
            await self.stream.wait_acked(step.last_log_seq)  # its output first, then its end
        try:
            job = await self.write_status(step.job_id, status, error, reason)
            final = job.status
            error = job.error
        except (StatusConflict, FailedPrecondition):
            # The monitor ended it first (deadline, cancel through the API): its word stands.
            job = await self.monitor.get_job(step.job_id)
            final, error = job.status, job.error
        self.record_end(step, final, error)

    def record_end(
        self, step: StepRun, status: Status, error: str, *, observe: bool = True
    ) -> None:
        """The step has ended as the monitor recorded it: release the next step, stop what
        is left of it, and apply its ``on_error``."""
        if step.ended.is_set():
            return
        step.final, step.error = status, error
        step.ended.set()
        if observe:  # a continued job's steps that had ended were counted by their runner
            metrics.observe_step_end(step.spec.type, status.value)
        step.released.set()
        step.cancel.set()  # nothing of an ended step keeps running
        if status is Status.FAILED and step.spec.on_error is not OnError.CONTINUE:
            fatal = step.spec.on_error is OnError.FATAL
            self.stop.step_failed(f"step {step.spec.name} failed: {error}", fatal=fatal)
            if fatal:
                self.stop_all()

    def stop_all(self) -> None:
        """Every running step stops (its workers see ``cancel``)."""
        self.stop.halt()
        for step in self.steps:
            step.cancel.set()

    # -- the error tolerance -----------------------------------------------------------------
    def count_child_failures(self, n: int = 1) -> None:
        tolerance = self.spec.error_tolerance
        limit = None if tolerance is None else tolerance.max_child_failures
        if not self.child_failures.add(n, limit):
            return
        assert tolerance is not None
        message = f"error tolerance exceeded ({self.child_failures.count} > {limit})"
        log.warning("error tolerance exceeded", manager_id=self.manager_id, action=tolerance.action)
        if tolerance.action == "fail":
            self.stop.tolerance_exceeded(message)
            self.stop_all()
        else:
            self.side_writes.append(
                asyncio.create_task(
                    self.write_metadata(
                        self.manager_id, {document.ERROR_TOLERANCE_EXCEEDED: message}
                    )
                )
            )
