"""Runs one job: manager -> ordered steps -> children, recording everything in the monitor.

The rules (SPEC §3): steps start in file order, each once the previous one has ended or been
handed off and every step it depends on has ended (a dependency that did not complete skips
it). ``wait = true`` steps are ended here, after their children's events are committed, with
the same final-status rule the monitor uses; ``wait = false`` steps are handed to the monitor
(``spawned``) and their end is learned from WatchJob, never by polling. ``on_error`` and the
error tolerance decide whether later steps start; the manager ends when every step is terminal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
import structlog

from orchestrator_svc.definitions import JobSpec, OnError, StepSpec
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.workers.base import ChildStatus, StepContext, StepResult, Worker
from stepflow_common.errors import FailedPrecondition, StatusConflict
from stepflow_common.status import Status
from stepflow_common.step_outcome import ChildTally, final_step_status
from stepflow_proto.v1 import job_pb2

log = structlog.get_logger(__name__)

STATUS_PB = {
    Status.PENDING: job_pb2.JOB_STATUS_PENDING,
    Status.RUNNING: job_pb2.JOB_STATUS_RUNNING,
    Status.SPAWNED: job_pb2.JOB_STATUS_SPAWNED,
    Status.COMPLETED: job_pb2.JOB_STATUS_COMPLETED,
    Status.FAILED: job_pb2.JOB_STATUS_FAILED,
    Status.CANCELLED: job_pb2.JOB_STATUS_CANCELLED,
    Status.SKIPPED: job_pb2.JOB_STATUS_SKIPPED,
}
STATUS_FROM_PB = {v: k for k, v in STATUS_PB.items()}
EVENT_KIND = {
    "completed": job_pb2.CHILD_EVENT_KIND_COMPLETED,
    "failed": job_pb2.CHILD_EVENT_KIND_FAILED,
    "cancelled": job_pb2.CHILD_EVENT_KIND_CANCELLED,
}
END_ORCHESTRATOR = "orchestrator"


@dataclass(slots=True)
class _StepRun:
    index: int
    spec: StepSpec
    job_id: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the step has ended or been handed off: the next step may start.
    released: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    handed: bool = False
    final: Status | None = None
    error: str = ""
    counts: dict[str, int] = field(
        default_factory=lambda: {"pending": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 0}
    )

    def tally(self) -> ChildTally:
        c = self.counts
        return ChildTally(c["pending"], c["running"], c["completed"], c["failed"], c["cancelled"])


class JobRunner:
    """One manager job in this orchestrator. ``run`` drives it to a terminal status."""

    def __init__(
        self,
        spec: JobSpec,
        manager: job_pb2.Job,
        steps: list[job_pb2.Job],
        *,
        monitor: MonitorClient,
        stream: EventStream,
        workers: Mapping[str, Worker],
    ) -> None:
        self.spec = spec
        self.manager_id = manager.id
        self._monitor = monitor
        self._stream = stream
        self._workers = workers
        self._steps = [_StepRun(i, s, job.id) for i, (s, job) in enumerate(zip(spec.steps, steps, strict=True))]
        self._by_id = {s.job_id: s for s in self._steps}
        self._stop_new = False  # fail / fatal / tolerance: start no new step
        self._failed_by_rule = False
        self._manager_error = ""
        self._cancelled = False
        self._timed_out = False
        self._child_failures = 0
        self._tolerance_exceeded = False
        self._manager_done = asyncio.Event()
        self.finished = asyncio.Event()

    # -- public ------------------------------------------------------------------------------
    async def run(self) -> Status:
        watcher = asyncio.create_task(self._watch_manager(), name=f"watch-{self.manager_id}")
        try:
            await self._monitor.update_status(self.manager_id, job_pb2.JOB_STATUS_RUNNING)
            await self._monitor.update_metadata(
                self.manager_id,
                {
                    "total_steps": len(self._steps),
                    "completed_steps": 0,
                    "step_job_ids": {s.spec.name: s.job_id for s in self._steps},
                },
            )
            step_tasks = []
            for step in self._steps:
                await self._wait_to_start(step)
                task = asyncio.create_task(self._run_step(step), name=f"step-{step.spec.name}")
                step_tasks.append(task)
                # The next step starts once this one has ended or been handed off.
                released = asyncio.ensure_future(step.released.wait())
                await asyncio.wait([task, released], return_when=asyncio.FIRST_COMPLETED)
                released.cancel()
            await asyncio.gather(*step_tasks)
            for step in self._steps:
                await step.ended.wait()
            return await self._finish()
        finally:
            watcher.cancel()
            self.finished.set()

    async def cancel(self, reason: str = "") -> None:
        """Stop all work at once (CancelJob); the caller records `cancelled` in the monitor."""
        self._cancelled = True
        self._stop_all()

    async def cancel_step(self, step_id: str) -> None:
        step = self._by_id.get(step_id)
        if step is not None:
            step.cancel.set()

    # -- steps -------------------------------------------------------------------------------
    async def _wait_to_start(self, step: _StepRun) -> None:
        for name in step.spec.depends_on:
            dep = next(s for s in self._steps if s.spec.name == name)
            await dep.ended.wait()

    async def _run_step(self, step: _StepRun) -> None:
        try:
            skip_reason = self._skip_reason(step)
            if skip_reason:
                await self._end_step(step, Status.SKIPPED, skip_reason)
                return
            await self._start_step(step)
            worker = self._workers[step.spec.type]
            if worker.spawns_children:
                await self._run_spawning(step, worker)
            else:
                await self._run_simple(step, worker)
        except Exception as exc:
            log.exception("step crashed", step=step.spec.name)
            if not step.ended.is_set():
                await self._end_step(step, Status.FAILED, f"{type(exc).__name__}: {exc}")

    def _skip_reason(self, step: _StepRun) -> str:
        if self._cancelled:
            return "job cancelled"
        if self._stop_new:
            return "job stopped before this step"
        for name in step.spec.depends_on:
            dep = next(s for s in self._steps if s.spec.name == name)
            if dep.final is not Status.COMPLETED:
                return f"dependency {name} ended {dep.final}"
        return ""

    async def _start_step(self, step: _StepRun) -> None:
        step.started = True
        spec = step.spec
        await self._monitor.update_metadata(
            self.manager_id,
            {
                "step_stats": [
                    {
                        "step_index": step.index,
                        "step_id": step.job_id,
                        "step_name": spec.name,
                        "step_type": spec.type,
                        "child_count": 0,
                        "document_count": 0,
                        "status": Status.RUNNING.value,
                        "error": "",
                    }
                ],
                "current_step": step.index + 1,
                "current_step_id": step.job_id,
                "current_step_name": spec.name,
                "current_step_type": spec.type,
                "current_step_status": Status.RUNNING.value,
            },
        )
        await self._monitor.update_status(step.job_id, job_pb2.JOB_STATUS_RUNNING)

    async def _run_simple(self, step: _StepRun, worker: Worker) -> None:
        result = await self._run_worker(step, worker)
        if step.ended.is_set():
            return
        if result.cancelled or step.cancel.is_set():
            await self._end_step(step, Status.CANCELLED, result.error or "cancelled")
        elif result.ok:
            await self._end_step(step, Status.COMPLETED, "")
        else:
            await self._end_step(step, Status.FAILED, result.error)

    async def _run_spawning(self, step: _StepRun, worker: Worker) -> None:
        if not step.spec.wait:
            # Hand-off: the monitor ends this step (seal + children), the job moves on now.
            await self._write_handed(step)
        result = await self._run_worker(step, worker)
        seal = job_pb2.ChildEvent(
            kind=job_pb2.CHILD_EVENT_KIND_SEALED,
            step_id=step.job_id,
            child_count=result.child_count,
            handed_to_monitor=not step.spec.wait,
        )
        await self._stream.emit(seal)
        if not step.spec.wait:
            return  # the manager watcher records the end when the monitor decides it
        # Wait until the monitor has committed every event of this step, so no reader sees a
        # finished step whose counts still lag.
        await self._stream.wait_acked()
        if step.ended.is_set():
            return
        if not result.ok and not result.cancelled:
            await self._end_step(step, Status.FAILED, result.error)
        elif step.cancel.is_set() and step.final is None:
            await self._end_step(step, Status.CANCELLED, "cancelled")
        else:
            status, error = final_step_status(step.tally())
            await self._end_step(step, status, error)

    async def _write_handed(self, step: _StepRun) -> None:
        try:
            await self._monitor.update_status(step.job_id, job_pb2.JOB_STATUS_SPAWNED)
        except (StatusConflict, FailedPrecondition):
            pass  # refused backwards: the monitor already ended it, which is what we want
        step.handed = True
        step.released.set()

    async def _run_worker(self, step: _StepRun, worker: Worker) -> StepResult:
        ctx = StepContext(
            step_id=step.job_id,
            step_name=step.spec.name,
            config=step.spec.config,
            child_created=lambda cid, name: self._child_event(step, cid, "created", name=name),
            child_running=lambda cid: self._child_event(step, cid, "running"),
            child_finished=lambda cid, status, error: self._child_event(step, cid, status, error=error),
            cancelled=step.cancel,
        )
        timeout = step.spec.timeout_s
        try:
            if timeout is None:
                return await worker.run(ctx)
            return await self._run_with_timeout(step, worker, ctx, timeout)
        except Exception as exc:
            return StepResult.failure(f"{type(exc).__name__}: {exc}", child_count=step.tally().total)

    async def _run_with_timeout(
        self, step: _StepRun, worker: Worker, ctx: StepContext, timeout: float
    ) -> StepResult:
        """A step timeout cancels the step's running children (the worker sees ``cancel``)."""
        task = asyncio.create_task(worker.run(ctx))
        done, _ = await asyncio.wait([task], timeout=timeout)
        if task in done:
            return task.result()
        step.cancel.set()
        result = await task
        if not step.ended.is_set() and step.spec.wait:
            await self._stream.wait_acked()
            await self._end_step(step, Status.FAILED, "timed out waiting for child jobs", reason="timeout")
        return result

    async def _child_event(
        self, step: _StepRun, child_id: str, kind: str, *, name: str = "", error: str = ""
    ) -> None:
        counts = step.counts
        if kind == "created":
            counts["pending"] += 1
            event_kind = job_pb2.CHILD_EVENT_KIND_CREATED
        elif kind == "running":
            counts["pending"] -= 1
            counts["running"] += 1
            event_kind = job_pb2.CHILD_EVENT_KIND_RUNNING
        else:
            status: ChildStatus = kind  # type: ignore[assignment]
            # A child that never ran (cancelled before start) leaves pending, not running.
            if counts["running"] > 0 and not error.startswith("step cancelled before"):
                counts["running"] -= 1
            else:
                counts["pending"] -= 1
            counts[status] += 1
            event_kind = EVENT_KIND[status]
            if status == "failed":
                self._count_child_failure()
        await self._stream.emit(
            job_pb2.ChildEvent(kind=event_kind, step_id=step.job_id, child_id=child_id, error=error, name=name)
        )

    def _count_child_failure(self) -> None:
        self._child_failures += 1
        tolerance = self.spec.error_tolerance
        if tolerance is None or self._tolerance_exceeded:
            return
        if self._child_failures > tolerance.max_child_failures:
            self._tolerance_exceeded = True
            message = f"error tolerance exceeded ({self._child_failures} > {tolerance.max_child_failures})"
            log.warning("error tolerance exceeded", manager_id=self.manager_id, action=tolerance.action)
            if tolerance.action == "fail":
                self._failed_by_rule = True
                self._manager_error = message
                self._stop_new = True
                self._stop_all()
            else:
                asyncio.get_running_loop().create_task(
                    self._monitor.update_metadata(self.manager_id, {"error_tolerance_exceeded": message})
                )

    async def _end_step(self, step: _StepRun, status: Status, error: str, *, reason: str = END_ORCHESTRATOR) -> None:
        try:
            job = await self._monitor.update_status(step.job_id, STATUS_PB[status], error, reason)
            final = STATUS_FROM_PB[job.status]
            error = job.error
        except (StatusConflict, FailedPrecondition):
            # The monitor ended it first (deadline, cancel through the API): its word stands.
            job = await self._monitor.get_job(step.job_id)
            final, error = STATUS_FROM_PB[job.status], job.error
        self._record_end(step, final, error)

    def _record_end(self, step: _StepRun, status: Status, error: str) -> None:
        if step.ended.is_set():
            return
        step.final, step.error = status, error
        step.ended.set()
        step.released.set()
        step.cancel.set()  # nothing of an ended step keeps running
        if status is Status.FAILED and step.spec.on_error is not OnError.CONTINUE:
            self._failed_by_rule = True
            self._manager_error = self._manager_error or f"step {step.spec.name} failed: {error}"
            self._stop_new = True
            if step.spec.on_error is OnError.FATAL:
                self._stop_all()

    def _stop_all(self) -> None:
        self._stop_new = True
        for step in self._steps:
            step.cancel.set()

    # -- learning from the monitor -------------------------------------------------------------
    async def _watch_manager(self) -> None:
        """Handed-off step endings, API cancellations and the job's own deadline arrive here."""
        try:
            async for job in self._monitor.watch(self.manager_id):
                for stat in job.step_stats:
                    step = self._by_id.get(stat.step_id)
                    status = STATUS_FROM_PB.get(stat.status)
                    if step is None or status is None or not status.terminal or step.ended.is_set():
                        continue
                    self._record_end(step, status, stat.error)
                manager_status = STATUS_FROM_PB.get(job.status)
                if manager_status is not None and manager_status.terminal:
                    if manager_status is Status.CANCELLED:
                        self._cancelled = True
                    elif job.end_reason == "timeout":
                        self._timed_out = True
                        self._manager_error = job.error
                    self._stop_all()
                    for step in self._steps:
                        if not step.ended.is_set() and not step.started:
                            # Never started: the monitor's cascade already made it terminal.
                            fresh = await self._monitor.get_job(step.job_id)
                            self._record_end(step, STATUS_FROM_PB[fresh.status], fresh.error)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("manager watch failed", manager_id=self.manager_id)

    async def _finish(self) -> Status:
        if self._cancelled:
            status, error = Status.CANCELLED, "cancelled"
        elif self._timed_out:
            status, error = Status.FAILED, self._manager_error or "job timed out"
        elif self._failed_by_rule:
            status, error = Status.FAILED, self._manager_error
        else:
            status, error = Status.COMPLETED, ""
        try:
            job = await self._monitor.update_status(self.manager_id, STATUS_PB[status], error, END_ORCHESTRATOR)
            final = STATUS_FROM_PB[job.status]
        except (StatusConflict, FailedPrecondition):
            final = STATUS_FROM_PB[(await self._monitor.get_job(self.manager_id)).status]
        log.info("job finished", manager_id=self.manager_id, status=final.value)
        return final
