"""Driving one step from its start to its end: skip or start it, run its worker (with its
timeout), hand it off or wait for its children, seal it, and decide how it ended."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from orchestrator_svc.definitions import OnInterrupt
from orchestrator_svc.monitor_client import JobFenced
from orchestrator_svc.records import ChildEvent, EventKind
from orchestrator_svc.resume import Plan
from orchestrator_svc.runner.children import Children
from orchestrator_svc.runner.context import JobContext, log
from orchestrator_svc.runner.step_state import StepRun
from orchestrator_svc.workers.base import ExistingChild, StepContext, StepResult, Worker
from stepflow_common import manager_document as document
from stepflow_common.errors import FailedPrecondition, StatusConflict
from stepflow_common.status import EndReason, Status
from stepflow_common.step_outcome import ChildTally, final_step_status
from stepflow_common.takeover import LOST_WHILE_RUNNING


class StepDriver:
    def __init__(self, job: JobContext, children: Children, workers: Mapping[str, Worker]) -> None:
        self.job = job
        self.children = children
        self.workers = workers

    async def run(self, step: StepRun) -> None:
        job = self.job
        try:
            if job.stop.cancelled:
                # The monitor's cascade makes every step of a cancelled job `cancelled`; ending
                # this one the same way keeps the result independent of which write lands first.
                await job.end_step(
                    step, Status.CANCELLED, "job cancelled", reason=EndReason.CANCELLED
                )
                return
            if step.plan is Plan.LOST:
                await job.end_step(
                    step, Status.FAILED, LOST_WHILE_RUNNING, reason=EndReason.ORCHESTRATOR_LOST
                )
                return
            if step.plan is Plan.CONTINUE:
                step.started = True  # already running (or handed off) in the record
                if step.spec.on_interrupt is OnInterrupt.FAIL:
                    await self._fail_lost_children(step)
            else:
                # A step that was running is not skipped now: it had started.
                skip_reason = "" if step.plan is Plan.RERUN else self.skip_reason(step)
                if skip_reason:
                    await job.end_step(step, Status.SKIPPED, skip_reason)
                    return
                if step.plan is Plan.RERUN:
                    await self.children.until_rerun_allowed()
                if not await self._start(step):
                    return
            worker = self.workers[step.spec.type]
            if worker.spawns_children:
                await self._run_spawning(step, worker)
            else:
                await self._run_simple(step, worker)
        except JobFenced:
            raise  # the runner stops; nothing more is written for this job
        except Exception as exc:
            log.exception("step crashed", step=step.spec.name)
            if not step.ended.is_set():
                await job.end_step(step, Status.FAILED, f"{type(exc).__name__}: {exc}")

    def skip_reason(self, step: StepRun) -> str:
        if self.job.stop.starts_no_step:
            return "job stopped before this step"
        for name in step.spec.depends_on:
            dep = self.job.step_named(name)
            if dep.final is not Status.COMPLETED:
                return f"dependency {name} ended {dep.final}"
        return ""

    async def _fail_lost_children(self, step: StepRun) -> None:
        """Children recorded running when their orchestrator was lost, in a step whose work
        must not run twice, end ``failed`` ``orchestrator_lost``. The monitor already does so
        when it hands the job over; this holds when a record read says otherwise (a child
        ended meanwhile is left as it is)."""
        existing = dict(step.existing)
        for child_id, child in step.existing.items():
            if child.status != Status.RUNNING.value:
                continue
            try:
                await self.job.write_status(
                    child_id, Status.FAILED, LOST_WHILE_RUNNING, EndReason.ORCHESTRATOR_LOST
                )
            except StatusConflict:
                continue  # ended meanwhile
            existing[child_id] = ExistingChild("failed", child.attempt, child.interruptions)
            step.counts.ended(child_id, "failed")
            self.job.count_child_failures()
        step.existing = existing

    async def _start(self, step: StepRun) -> bool:
        """Record the step as started; False if the monitor had already ended it.

        The row goes first: its running status reaches the step's step_stats entry in the
        same transaction, and a step that a cancel or timeout ended meanwhile is refused here
        before it is made the current step, so current_step_status never shows it running.
        """
        job = self.job
        step.started = True
        spec = step.spec
        try:
            row = await job.write_status(step.job_id, Status.RUNNING)
            step.attempt = max(step.attempt, row.attempt)
        except (StatusConflict, FailedPrecondition):
            current = await job.monitor.get_job(step.job_id)
            job.record_end(step, current.status, current.error)
            return False
        await job.write_metadata(
            job.manager_id,
            document.step_started(
                step.index, step.job_id, spec.name, spec.type, Status.RUNNING.value
            ),
        )
        return True

    async def _run_simple(self, step: StepRun, worker: Worker) -> None:
        result = await self._run_worker(step, worker)
        if step.ended.is_set():
            return
        if result.cancelled or step.cancel.is_set():
            await self.job.end_step(step, Status.CANCELLED, result.error or "cancelled")
        elif result.ok:
            await self.job.end_step(step, Status.COMPLETED, "")
        else:
            await self.job.end_step(step, Status.FAILED, result.error)

    async def _run_spawning(self, step: StepRun, worker: Worker) -> None:
        job = self.job
        spawned_writer: asyncio.Task[None] | None = None
        if not step.spec.wait:
            # Hand-off: the monitor ends this step (seal + children), the job moves on now.
            hand_off(step)
            spawned_writer = asyncio.create_task(self._write_spawned(step))
        try:
            result = await self._run_worker(step, worker)
            if job.draining.is_set() and not step.cancel.is_set():
                # Drained: its worker stopped claiming children, and the ones it never started
                # are not reported. No seal and no end: the job's next owner continues the step
                # from its recorded children.
                return
            stopped = job.stop.halted or bool(step.cancel_reason)
            if not step.spec.wait and stopped and not step.ended.is_set():
                # Cancelled, or stopped with the job (fatal, tolerance, cancel): end it before
                # the seal, or the monitor would end it by its children, ``completed`` if any
                # had. (A timeout has already ended it, as ``failed``.)
                await job.stream.wait_acked()
                why = step.cancel_reason or job.stop.error
                await job.end_step(step, Status.CANCELLED, why or "job stopped", reason="cancelled")
            seal = ChildEvent(
                kind=EventKind.SEALED,
                step_id=step.job_id,
                child_count=result.child_count,
                handed_to_monitor=not step.spec.wait,
            )
            await job.stream.emit(seal)
            # Without any child the seal alone hands the step off (and ends it).
            if spawned_writer is not None and step.first_child.is_set():
                await spawned_writer
        finally:
            if spawned_writer is not None and not spawned_writer.done():
                spawned_writer.cancel()
        if not step.spec.wait:
            return  # the manager watch records the end when the monitor decides it
        # Wait until the monitor has committed every event of this step, so no reader sees a
        # finished step whose counts still lag.
        await job.stream.wait_acked()
        # Rejections are reported before their batch counts as acknowledged, so every repair
        # of this step's children has started by now.
        await asyncio.gather(*step.repairs)
        if step.ended.is_set():
            return
        if not result.ok and not result.cancelled:
            await job.end_step(step, Status.FAILED, result.error)
        elif step.cancel.is_set() and step.final is None:
            await job.end_step(step, Status.CANCELLED, step.cancel_reason or "cancelled")
        elif step.unrecorded:
            await job.end_step(step, Status.FAILED, step.unrecorded_error())
        else:
            tally = await self._committed_tally(step)
            live = tally.pending + tally.running
            if live:
                # Every child has ended in the worker, and every event is settled: a child
                # still live in the record lost its end, and the step must not be decided
                # as though that child did not exist.
                await job.end_step(
                    step,
                    Status.FAILED,
                    f"{live} of {tally.total} child jobs did not end in the monitor's record",
                )
                return
            status, error = final_step_status(tally)
            await job.end_step(step, status, error)

    async def _committed_tally(self, step: StepRun) -> ChildTally:
        """The step's child counts as the monitor committed them (its events are acknowledged).

        They, not this runner's own counts, decide the step (path 5): a child cancelled through
        the API stays cancelled in the monitor even though its worker later finished it, and
        the step must end as its rows and ``step_stats`` entry say, not as the worker believed.
        """
        manager = await self.job.monitor.get_job(self.job.manager_id)
        for stat in manager.step_stats:
            if stat.step_id == step.job_id:
                return stat.children
        return step.counts.tally()

    async def _write_spawned(self, step: StepRun) -> None:
        """Show the hand-off (``spawned``) once the step's first child is committed.

        Not earlier: a ``spawned`` step with no child and no seal is ended ``completed`` by the
        monitor's grace period, so writing it before any child exists would end a hand-off that
        is merely slow to create its first child (or whose events wait out a monitor restart)
        with zero children. A step without children is handed off by its seal alone. A refused
        write means the monitor has already ended the step, which is what a hand-off asks for.
        """
        await step.first_child.wait()
        await self.job.stream.wait_acked(step.first_child_seq)
        with contextlib.suppress(StatusConflict, FailedPrecondition):
            await self.job.write_status(step.job_id, Status.SPAWNED)

    async def _run_worker(self, step: StepRun, worker: Worker) -> StepResult:
        timeout = step.spec.timeout_s
        try:
            ctx = self.children.context(step)
            if timeout is None:
                return await worker.run(ctx)
            return await self._run_with_timeout(step, worker, ctx, timeout_s=timeout)
        except Exception as exc:
            return StepResult.failure(
                f"{type(exc).__name__}: {exc}", child_count=step.counts.tally().total
            )

    async def _run_with_timeout(
        self, step: StepRun, worker: Worker, ctx: StepContext, *, timeout_s: float
    ) -> StepResult:
        """A step timeout cancels the step's running children (the worker sees ``cancel``)."""
        task = asyncio.create_task(worker.run(ctx))
        try:
            done, _ = await asyncio.wait([task], timeout=timeout_s)
        except asyncio.CancelledError:
            task.cancel()  # the runner is going away: its worker must not run on unowned
            raise
        if task in done:
            return task.result()
        step.cancel.set()
        result = await task
        if not step.ended.is_set():
            # Ended here in both wait modes (the monitor's own deadline for the step may fire
            # first; then this is a no-op): a handed-off step must fail *before* its seal, or
            # the monitor would end it by its children (all cancelled -> ``cancelled``), and a
            # worker without children has no seal at all. The monitor records `timeout` itself:
            # the step's stored deadline has passed by now, and it fires that before this write.
            await self.job.stream.wait_acked()
            await self.job.end_step(step, Status.FAILED, "timed out waiting for child jobs")
        return result


def hand_off(step: StepRun) -> None:
    """Let the next step start; the monitor will end this one."""
    step.handed = True
    step.released.set()
