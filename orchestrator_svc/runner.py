"""Runs one job: manager -> ordered steps -> children, recording everything in the monitor.

The rules (design §3): steps start in file order, each once the previous one has ended or been
handed off and every step it depends on has ended (a dependency that did not complete skips
it). ``wait = true`` steps are ended here, after their children's events are committed, with
the same final-status rule the monitor uses; ``wait = false`` steps are handed to the monitor
(``spawned``) and their end is learned from WatchJob, never by polling. ``on_error`` and the
error tolerance decide whether later steps start; the manager ends when every step is terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from orchestrator_svc.definitions import JobSpec, OnError, OnInterrupt, StepSpec
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import JobFenced, MonitorClient
from orchestrator_svc.process_guard import ProcessGuard
from orchestrator_svc.records import ChildEvent, EventKind, Job
from orchestrator_svc.resume import JobRecord, Plan, StepRecord, plan_step
from orchestrator_svc.workers.base import (
    NO_CHILDREN,
    ChildStatus,
    ExistingChild,
    StepContext,
    StepResult,
    Worker,
)
from stepflow_common import metrics, tracing
from stepflow_common.errors import FailedPrecondition, StatusConflict, StepflowError
from stepflow_common.status import EndReason, Status
from stepflow_common.step_outcome import ChildTally, final_step_status
from stepflow_common.takeover import LOST_WHILE_RUNNING as LOST_ERROR

log = structlog.get_logger(__name__)

T = TypeVar("T")

TERMINAL_EVENT_STATUS = {
    EventKind.COMPLETED: Status.COMPLETED,
    EventKind.FAILED: Status.FAILED,
    EventKind.CANCELLED: Status.CANCELLED,
}
_CHILD_ENDS = frozenset(TERMINAL_EVENT_STATUS)  # how ``child_finished`` may end a child
WATCH_RETRY_S = 0.5  # pause before watching the manager again after an unexpected error


class _AnySet:
    """A cancel signal set when the step's or the child's own event is."""

    def __init__(self, step: asyncio.Event) -> None:
        self.step = step
        self.own = asyncio.Event()

    def is_set(self) -> bool:
        return self.step.is_set() or self.own.is_set()

    async def wait(self) -> object:
        if self.is_set():
            return True
        waits = [asyncio.ensure_future(self.step.wait()), asyncio.ensure_future(self.own.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return True


@dataclass(slots=True)
class _ChildControl:
    signal: _AnySet
    ended: asyncio.Event = field(default_factory=asyncio.Event)


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
    cancel_reason: str = ""  # set by CancelJob on this step
    # Stream sequence of the step's first CREATED event (0: none yet), and its signal.
    first_child_seq: int = 0
    first_child: asyncio.Event = field(default_factory=asyncio.Event)
    final: Status | None = None
    error: str = ""
    # Children whose terminal event the monitor rejected: their records being repaired, and
    # what could not be repaired (the step then cannot claim its children's outcome).
    repairs: list[asyncio.Task[None]] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    # Children cancelled one by one (CancelJob on a child), and their workers' signals.
    children: dict[str, _ChildControl] = field(default_factory=dict)
    # Continuing a job: what this step does next, the step's attempt, the children it already
    # has.
    plan: Plan = Plan.START
    attempt: int = 1
    existing: Mapping[str, ExistingChild] = field(default_factory=lambda: NO_CHILDREN)
    # The children counted ``running`` (seen running here, or recorded running): a further
    # RUNNING event of one moves no count, and its end leaves ``running``; any other child's
    # end (it never ran: cancelled before it started) leaves ``pending``.
    counted_running: set[str] = field(default_factory=set)
    # Cancelled events this runner sent for the step: more in the monitor means a child was
    # cancelled through the API (perhaps through another orchestrator).
    cancelled_sent: int = 0
    cancelled_seen: int = 0  # the monitor's cancelled count last looked into
    cancelled_elsewhere: set[str] = field(default_factory=set)

    def child(self, child_id: str) -> _ChildControl:
        control = self.children.get(child_id)
        if control is None:
            control = self.children[child_id] = _ChildControl(_AnySet(self.cancel))
            if child_id in self.cancelled_elsewhere:
                control.signal.own.set()  # cancelled through the API before it started
        return control

    counts: dict[str, int] = field(
        default_factory=lambda: {
            "pending": 0,
            "running": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
        }
    )

    def tally(self) -> ChildTally:
        c = self.counts
        return ChildTally(c["pending"], c["running"], c["completed"], c["failed"], c["cancelled"])


class JobRunner:
    """One manager job in this orchestrator. ``run`` drives it to a terminal status."""

    def __init__(
        self,
        spec: JobSpec,
        manager: Job,
        steps: list[Job],
        *,
        monitor: MonitorClient,
        stream: EventStream,
        workers: Mapping[str, Worker],
        owner: str = "",
        resume: JobRecord | None = None,
        rerun_after: float = 0.0,
    ) -> None:
        self.spec = spec
        # The processes of this job's work die with this orchestrator (see process_guard).
        self.guard: ProcessGuard | None = None
        # A resumed job: children (and a step) interrupted in a superseded instance run again
        # only after this time.monotonic() value, when that instance's processes are gone.
        self._rerun_after = rerun_after
        self.manager_id = manager.id
        self.owner = owner
        self._monitor = monitor
        self._stream = stream
        self._workers = workers
        self._steps = [
            _StepRun(i, s, job.id) for i, (s, job) in enumerate(zip(spec.steps, steps, strict=True))
        ]
        self._by_id = {s.job_id: s for s in self._steps}
        self._stop_new = False  # fail / fatal / tolerance: start no new step
        self._halted = False  # fatal / tolerance / cancel / job end: stop running steps too
        self._failed_by_rule = False
        self._manager_error = ""
        self._cancelled = False
        self._cancel_reason = "cancelled"
        self._timed_out = False
        self._child_failures = 0
        self._tolerance_exceeded = False
        self._side_writes: list[asyncio.Task[Job]] = []
        self._resume = resume
        # Drained (shutdown): no new step or child starts, and what is left unfinished stays
        # unrecorded for the next owner. Fenced: another orchestrator owns the job now.
        self.draining = asyncio.Event()
        self.fenced = False
        self._task: asyncio.Task[Any] | None = None
        self.finished = asyncio.Event()

    @classmethod
    def resumed(
        cls,
        record: JobRecord,
        *,
        monitor: MonitorClient,
        stream: EventStream,
        workers: Mapping[str, Worker],
        owner: str,
        rerun_after: float = 0.0,
    ) -> JobRunner:
        """A runner that continues a job from what the monitor recorded (see ``resume``)."""
        return cls(
            record.spec,
            record.manager,
            record.steps,
            monitor=monitor,
            stream=stream,
            workers=workers,
            owner=owner,
            resume=record,
            rerun_after=rerun_after,
        )

    # -- public ------------------------------------------------------------------------------
    async def run(self) -> Status | None:
        """Drive the job to its end; None when it was drained or fenced (not ended here)."""
        self._task = asyncio.current_task()
        if self.guard is not None:
            with self.guard.active():  # the steps' tasks, created below, inherit it
                return await self._run()
        return await self._run()

    async def _run(self) -> Status | None:
        if self._resume is not None:
            self._apply_records(self._resume)
        watcher = asyncio.create_task(self._watch_manager(), name=f"watch-{self.manager_id}")
        step_tasks: list[asyncio.Task[None]] = []
        try:
            await self._write_status(self.manager_id, Status.RUNNING)
            await self._write_metadata(
                self.manager_id,
                {
                    "total_steps": len(self._steps),
                    "completed_steps": 0,
                    "step_job_ids": {s.spec.name: s.job_id for s in self._steps},
                },
            )
            for step in self._steps:
                if step.ended.is_set() or step.handed:
                    continue  # continued job: ended, or with the monitor
                if not await self._unless_drained(self._wait_to_start(step)):
                    break
                run = tracing.step_run(
                    self._run_step(step),
                    step.job_id,
                    step.spec.name,
                    step.spec.type,
                    self.manager_id,
                )
                task = asyncio.create_task(run, name=f"step-{step.spec.name}")
                step_tasks.append(task)
                # The next step starts once this one has ended or been handed off.
                released = asyncio.ensure_future(step.released.wait())
                try:
                    moved_on = await self._unless_drained(
                        asyncio.wait([task, released], return_when=asyncio.FIRST_COMPLETED)
                    )
                finally:
                    released.cancel()
                if not moved_on:
                    break
            await asyncio.gather(*step_tasks)
            for step in self._steps:
                if not await self._unless_drained(step.ended.wait()):
                    break
            if self.draining.is_set():
                log.info("job drained; its next owner continues it", manager_id=self.manager_id)
                return None
            await asyncio.gather(*self._side_writes)
            return await self._finish()
        except asyncio.CancelledError:
            if self.fenced:
                return None
            raise
        except JobFenced:
            self.fence()
            return None
        finally:
            watcher.cancel()
            # Left running only when the job was fenced, drained past its grace, or crashed:
            # its steps' workers must not run on unowned (their processes are killed).
            for task in step_tasks:
                task.cancel()
            await asyncio.gather(*step_tasks, return_exceptions=True)
            self.finished.set()

    async def _unless_drained(self, aw: Awaitable[Any]) -> bool:
        """Await ``aw``; False (``aw`` abandoned) if the runner is drained first."""
        if self.draining.is_set():
            if asyncio.iscoroutine(aw):
                aw.close()
            elif isinstance(aw, asyncio.Future):
                aw.cancel()
            return False
        work = asyncio.ensure_future(aw)
        drained = asyncio.ensure_future(self.draining.wait())
        try:
            await asyncio.wait([work, drained], return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not work.done():
                work.cancel()
        return work.done() and not work.cancelled()

    def owns_step(self, step_id: str) -> bool:
        return step_id in self._by_id

    def drain(self) -> None:
        """Shutdown: start no new step or child, let running children finish, leave the rest
        (and the step they belong to) unrecorded for the job's next owner."""
        self.draining.set()

    def fence(self, why: str = "another orchestrator owns it now") -> None:
        """Stop all the job's work here at once (processes killed) without writing anything
        more for it: another orchestrator owns it now (or will, after a shutdown)."""
        if self.fenced:
            return
        self.fenced = True
        log.warning("job's work here stops", manager_id=self.manager_id, why=why)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _apply_records(self, record: JobRecord) -> None:
        """Continue a job: each step's plan from its record; ended steps stand and count for
        on_error and the error tolerance, handed-off ones are watched."""
        for step, rec in zip(self._steps, record.records, strict=True):
            worker = self._workers[step.spec.type]
            step.plan = plan_step(step.spec, rec, spawns_children=worker.spawns_children)
            self._child_failures += rec.failed_children
            if step.plan is Plan.STANDS:
                step.started = rec.status is not Status.SKIPPED
                self._record_end(step, rec.status, rec.error, observe=False)
            elif step.plan is Plan.WATCH:
                step.started = True
                self._hand_off(step)
            elif step.plan is Plan.CONTINUE:
                self._adopt_children(step, rec)
            elif step.plan is Plan.RERUN:
                step.attempt = rec.attempt + 1
        self._check_tolerance()
        log.info(
            "continuing job",
            manager_id=self.manager_id,
            plans={s.spec.name: s.plan.value for s in self._steps},
            child_failures=self._child_failures,
        )

    @staticmethod
    def _adopt_children(step: _StepRun, rec: StepRecord) -> None:
        step.existing = rec.children
        for child_id, child in rec.children.items():
            step.counts[child.status] += 1
            if child.status == Status.RUNNING.value:
                step.counted_running.add(child_id)
            elif child.status == Status.CANCELLED.value:
                step.cancelled_sent += 1

    async def _write_status(
        self, job_id: str, status: Status, error: str = "", end_reason: str = ""
    ) -> Job:
        return await self._fenced_write(
            self._monitor.update_status(job_id, status, error, end_reason, owner=self.owner)
        )

    async def _write_metadata(self, job_id: str, metadata: dict[str, Any]) -> Job:
        return await self._fenced_write(
            self._monitor.update_metadata(job_id, metadata, owner=self.owner)
        )

    async def _fenced_write(self, write: Awaitable[T]) -> T:
        try:
            return await write
        except JobFenced:
            self.fence()
            raise

    async def cancel(self, reason: str = "") -> None:
        """Stop all work at once (CancelJob); the job then ends `cancelled` with ``reason``."""
        self._cancelled = True
        self._cancel_reason = reason or "cancelled"
        self._stop_all()

    async def cancel_step(self, step_id: str, reason: str = "") -> None:
        step = self._by_id.get(step_id)
        if step is not None:
            step.cancel_reason = reason or "cancelled"
            step.cancel.set()

    def on_event_rejected(self, event: ChildEvent, reason: str) -> bool:
        """The monitor rejected (or refused) one of this job's events; False if not ours.

        A rejected terminal event would leave its child live in the record while the worker
        has ended it, and the step would then be decided from a tally missing that child. So
        the child's end is written through UpdateJobStatus instead (the same transition the
        event makes); what cannot be written is kept, and the step ends ``failed`` naming it.
        """
        step = self._by_id.get(event.step_id)
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
                step.repairs.append(asyncio.create_task(self._fail_unrecorded(step)))
        return True

    async def _repair_child(
        self, step: _StepRun, child_id: str, status: Status, error: str, reason: str
    ) -> None:
        try:
            current = await self._monitor.get_job(child_id)
            if current.status.terminal:
                return  # the monitor had already ended it (a cancel): its record stands
            await self._write_status(child_id, status, error, EndReason.ORCHESTRATOR)
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
            await self._fail_unrecorded(step)

    async def _fail_unrecorded(self, step: _StepRun) -> None:
        """A handed-off step whose children cannot all be recorded would wait out its
        deadline: it fails now, saying why."""
        if not step.ended.is_set():
            await self._end_step(step, Status.FAILED, self._unrecorded_error(step))

    @staticmethod
    def _unrecorded_error(step: _StepRun) -> str:
        more = len(step.unrecorded) - 1
        return f"the outcome of its children is not recorded: {step.unrecorded[0]}" + (
            f" (and {more} more)" if more > 0 else ""
        )

    async def cancel_child(self, step_id: str, child_id: str, wait_s: float) -> None:
        """Stop one child's work (its process too), waiting up to ``wait_s`` for it to end."""
        step = self._by_id.get(step_id)
        if step is None or step.ended.is_set():
            return
        control = step.child(child_id)
        control.signal.own.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(control.ended.wait(), wait_s)

    # -- steps -------------------------------------------------------------------------------
    async def _wait_to_start(self, step: _StepRun) -> None:
        for name in step.spec.depends_on:
            dep = next(s for s in self._steps if s.spec.name == name)
            await dep.ended.wait()

    async def _run_step(self, step: _StepRun) -> None:
        try:
            if self._cancelled:
                # The monitor's cascade makes every step of a cancelled job `cancelled`; ending
                # this one the same way keeps the result independent of which write lands first.
                await self._end_step(
                    step, Status.CANCELLED, "job cancelled", reason=EndReason.CANCELLED
                )
                return
            if step.plan is Plan.LOST:
                await self._end_step(
                    step, Status.FAILED, LOST_ERROR, reason=EndReason.ORCHESTRATOR_LOST
                )
                return
            if step.plan is Plan.CONTINUE:
                step.started = True  # already running (or handed off) in the record
                if step.spec.on_interrupt is OnInterrupt.FAIL:
                    await self._fail_lost_children(step)
            else:
                # A step that was running is not skipped now: it had started.
                skip_reason = "" if step.plan is Plan.RERUN else self._skip_reason(step)
                if skip_reason:
                    await self._end_step(step, Status.SKIPPED, skip_reason)
                    return
                if step.plan is Plan.RERUN:
                    await self._until_rerun_allowed()
                if not await self._start_step(step):
                    return
            worker = self._workers[step.spec.type]
            if worker.spawns_children:
                await self._run_spawning(step, worker)
            else:
                await self._run_simple(step, worker)
        except JobFenced:
            raise  # the runner stops; nothing more is written for this job
        except Exception as exc:
            log.exception("step crashed", step=step.spec.name)
            if not step.ended.is_set():
                await self._end_step(step, Status.FAILED, f"{type(exc).__name__}: {exc}")

    async def _fail_lost_children(self, step: _StepRun) -> None:
        """Children recorded running when their orchestrator was lost, in a step whose work
        must not run twice, end ``failed`` ``orchestrator_lost``. The monitor already does so
        when it hands the job over; this holds when a record read says otherwise (a child
        ended meanwhile is left as it is)."""
        existing = dict(step.existing)
        for child_id, child in step.existing.items():
            if child.status != Status.RUNNING.value:
                continue
            try:
                await self._write_status(
                    child_id,
                    Status.FAILED,
                    LOST_ERROR,
                    EndReason.ORCHESTRATOR_LOST,
                )
            except StatusConflict:
                continue  # ended meanwhile
            existing[child_id] = ExistingChild("failed", child.attempt, child.interruptions)
            step.counted_running.discard(child_id)
            step.counts["running"] -= 1
            step.counts["failed"] += 1
            self._count_child_failure()
        step.existing = existing

    def _skip_reason(self, step: _StepRun) -> str:
        if self._stop_new:
            return "job stopped before this step"
        for name in step.spec.depends_on:
            dep = next(s for s in self._steps if s.spec.name == name)
            if dep.final is not Status.COMPLETED:
                return f"dependency {name} ended {dep.final}"
        return ""

    async def _start_step(self, step: _StepRun) -> bool:
        """Record the step as started; False if the monitor had already ended it.

        The row goes first: its running status reaches the step's step_stats entry in the
        same transaction, and a step that a cancel or timeout ended meanwhile is refused here
        before it is made the current step, so current_step_status never shows it running.
        """
        step.started = True
        spec = step.spec
        try:
            row = await self._write_status(step.job_id, Status.RUNNING)
            step.attempt = max(step.attempt, row.attempt)
        except (StatusConflict, FailedPrecondition):
            job = await self._monitor.get_job(step.job_id)
            self._record_end(step, job.status, job.error)
            return False
        await self._write_metadata(
            self.manager_id,
            {
                "step_stats": [
                    {
                        "step_index": step.index,
                        "step_id": step.job_id,
                        "step_name": spec.name,
                        "step_type": spec.type,
                        "status": Status.RUNNING.value,
                    }
                ],
                "current_step": step.index + 1,
                "current_step_id": step.job_id,
                "current_step_name": spec.name,
                "current_step_type": spec.type,
                "current_step_status": Status.RUNNING.value,
            },
        )
        return True

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
        spawned_writer: asyncio.Task[None] | None = None
        if not step.spec.wait:
            # Hand-off: the monitor ends this step (seal + children), the job moves on now.
            self._hand_off(step)
            spawned_writer = asyncio.create_task(self._write_spawned(step))
        try:
            result = await self._run_worker(step, worker)
            if self.draining.is_set() and not step.cancel.is_set():
                # Drained: its worker stopped claiming children, and the ones it never started
                # are not reported. No seal and no end: the job's next owner continues the step
                # from its recorded children.
                return
            stopped = self._halted or bool(step.cancel_reason)
            if not step.spec.wait and stopped and not step.ended.is_set():
                # Cancelled, or stopped with the job (fatal, tolerance, cancel): end it before
                # the seal, or the monitor would end it by its children, ``completed`` if any
                # had. (A timeout has already ended it, as ``failed``.)
                await self._stream.wait_acked()
                why = step.cancel_reason or (
                    self._cancel_reason if self._cancelled else self._manager_error
                )
                await self._end_step(
                    step, Status.CANCELLED, why or "job stopped", reason="cancelled"
                )
            seal = ChildEvent(
                kind=EventKind.SEALED,
                step_id=step.job_id,
                child_count=result.child_count,
                handed_to_monitor=not step.spec.wait,
            )
            await self._stream.emit(seal)
            # Without any child the seal alone hands the step off (and ends it).
            if spawned_writer is not None and step.first_child.is_set():
                await spawned_writer
        finally:
            if spawned_writer is not None and not spawned_writer.done():
                spawned_writer.cancel()
        if not step.spec.wait:
            return  # the manager watcher records the end when the monitor decides it
        # Wait until the monitor has committed every event of this step, so no reader sees a
        # finished step whose counts still lag.
        await self._stream.wait_acked()
        # Rejections are reported before their batch counts as acknowledged, so every repair
        # of this step's children has started by now.
        await asyncio.gather(*step.repairs)
        if step.ended.is_set():
            return
        if not result.ok and not result.cancelled:
            await self._end_step(step, Status.FAILED, result.error)
        elif step.cancel.is_set() and step.final is None:
            await self._end_step(step, Status.CANCELLED, step.cancel_reason or "cancelled")
        elif step.unrecorded:
            await self._end_step(step, Status.FAILED, self._unrecorded_error(step))
        else:
            tally = await self._committed_tally(step)
            live = tally.pending + tally.running
            if live:
                # Every child has ended in the worker, and every event is settled: a child
                # still live in the record lost its end, and the step must not be decided
                # as though that child did not exist.
                await self._end_step(
                    step,
                    Status.FAILED,
                    f"{live} of {tally.total} child jobs did not end in the monitor's record",
                )
                return
            status, error = final_step_status(tally)
            await self._end_step(step, status, error)

    async def _committed_tally(self, step: _StepRun) -> ChildTally:
        """The step's child counts as the monitor committed them (its events are acknowledged).

        They, not this runner's own counts, decide the step (path 5): a child cancelled through
        the API stays cancelled in the monitor even though its worker later finished it, and
        the step must end as its rows and ``step_stats`` entry say, not as the worker believed.
        """
        manager = await self._monitor.get_job(self.manager_id)
        for stat in manager.step_stats:
            if stat.step_id == step.job_id:
                return stat.children
        return step.tally()

    def _hand_off(self, step: _StepRun) -> None:
        """Let the next step start; the monitor will end this one."""
        step.handed = True
        step.released.set()

    async def _write_spawned(self, step: _StepRun) -> None:
        """Show the hand-off (``spawned``) once the step's first child is committed.

        Not earlier: a ``spawned`` step with no child and no seal is ended ``completed`` by the
        monitor's grace period, so writing it before any child exists would end a hand-off that
        is merely slow to create its first child (or whose events wait out a monitor restart)
        with zero children. A step without children is handed off by its seal alone. A refused
        write means the monitor has already ended the step, which is what a hand-off asks for.
        """
        await step.first_child.wait()
        await self._stream.wait_acked(step.first_child_seq)
        with contextlib.suppress(StatusConflict, FailedPrecondition):
            await self._write_status(step.job_id, Status.SPAWNED)

    async def _run_worker(self, step: _StepRun, worker: Worker) -> StepResult:
        must_run_once = step.spec.on_interrupt is OnInterrupt.FAIL

        async def child_running(child_id: str, attempt: int = 1, /) -> None:
            """Work that must not run twice (``on_interrupt = "fail"``) starts only once its
            ``running`` (with its attempt) is committed: a child the monitor shows ``pending``
            has not started anywhere, so an orchestrator lost before the commit is never
            followed by a second run. Other work starts at once: every process it starts dies
            with this orchestrator (``process_guard``), so a run lost before its commit is
            simply run again, never beside itself (waiting would cost every child a commit)."""
            if self._rerun_after:
                before = step.existing.get(child_id)
                if before is not None and before.status == Status.RUNNING.value:
                    await self._until_rerun_allowed()
            seq = await self._child_event(step, child_id, "running", attempt=attempt)
            if must_run_once:
                await self._stream.wait_acked(seq)
                if self.fenced:
                    raise asyncio.CancelledError  # rejected: another instance owns the job

        async def child_created(child_id: str, name: str) -> None:
            await self._child_event(step, child_id, "created", name=name)

        async def child_finished(child_id: str, status: ChildStatus, error: str) -> None:
            await self._child_event(step, child_id, status, error=error)

        ctx = StepContext(
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
            draining=self.draining,
        )
        timeout = step.spec.timeout_s
        try:
            if timeout is None:
                return await worker.run(ctx)
            return await self._run_with_timeout(step, worker, ctx, timeout_s=timeout)
        except Exception as exc:
            return StepResult.failure(
                f"{type(exc).__name__}: {exc}", child_count=step.tally().total
            )

    async def _run_with_timeout(
        self, step: _StepRun, worker: Worker, ctx: StepContext, *, timeout_s: float
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
            await self._stream.wait_acked()
            await self._end_step(step, Status.FAILED, "timed out waiting for child jobs")
        return result

    async def _until_rerun_allowed(self) -> None:
        """Wait until work interrupted in a superseded instance is known stopped."""
        delay = self._rerun_after - time.monotonic()
        if delay > 0:
            log.info(
                "waiting for the superseded instance's lease before running work again",
                manager_id=self.manager_id,
                wait_s=round(delay, 2),
            )
            await asyncio.sleep(delay)

    async def _child_event(
        self,
        step: _StepRun,
        child_id: str,
        kind: str,
        *,
        name: str = "",
        error: str = "",
        attempt: int = 0,
    ) -> int:
        counts = step.counts
        if kind == "created":
            counts["pending"] += 1
        elif kind == "running":
            # Running again (a later attempt, or after its orchestrator was lost): no count
            # moves.
            if child_id not in step.counted_running:
                step.counted_running.add(child_id)
                counts["pending"] -= 1
                counts["running"] += 1
        else:
            if kind not in _CHILD_ENDS:
                raise ValueError(f"not how a child ends: {kind!r}")
            status: ChildStatus = kind  # type: ignore[assignment]
            if child_id in step.counted_running:
                step.counted_running.discard(child_id)
                counts["running"] -= 1
            else:
                counts["pending"] -= 1
            counts[status] += 1
            metrics.observe_child_end(step.spec.type, status)
            control = step.children.pop(child_id, None)
            if control is not None:
                control.ended.set()
            if status == "failed":
                self._count_child_failure()
            elif status == "cancelled":
                step.cancelled_sent += 1
        seq = await self._stream.emit_child(
            kind, step.job_id, child_id, error=error, name=name, attempt=attempt
        )
        if kind == "created" and not step.first_child.is_set():
            step.first_child_seq = seq
            step.first_child.set()
        return seq

    def _count_child_failure(self) -> None:
        self._child_failures += 1
        self._check_tolerance()

    def _check_tolerance(self) -> None:
        tolerance = self.spec.error_tolerance
        if tolerance is None or self._tolerance_exceeded:
            return
        if self._child_failures > tolerance.max_child_failures:
            self._tolerance_exceeded = True
            message = (
                f"error tolerance exceeded ({self._child_failures} > "
                f"{tolerance.max_child_failures})"
            )
            log.warning(
                "error tolerance exceeded", manager_id=self.manager_id, action=tolerance.action
            )
            if tolerance.action == "fail":
                self._failed_by_rule = True
                self._manager_error = message
                self._stop_new = True
                self._stop_all()
            else:
                # Kept and awaited before the job ends: a bare task may be garbage-collected,
                # or land after the manager is final.
                self._side_writes.append(
                    asyncio.create_task(
                        self._write_metadata(self.manager_id, {"error_tolerance_exceeded": message})
                    )
                )

    async def _end_step(
        self, step: _StepRun, status: Status, error: str, *, reason: str = EndReason.ORCHESTRATOR
    ) -> None:
        try:
            job = await self._write_status(step.job_id, status, error, reason)
            final = job.status
            error = job.error
        except (StatusConflict, FailedPrecondition):
            # The monitor ended it first (deadline, cancel through the API): its word stands.
            job = await self._monitor.get_job(step.job_id)
            final, error = job.status, job.error
        self._record_end(step, final, error)

    def _record_end(
        self, step: _StepRun, status: Status, error: str, *, observe: bool = True
    ) -> None:
        if step.ended.is_set():
            return
        step.final, step.error = status, error
        step.ended.set()
        if observe:  # a continued job's steps that had ended were counted by their runner
            metrics.observe_step_end(step.spec.type, status.value)
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
        self._halted = True
        for step in self._steps:
            step.cancel.set()

    # -- learning from the monitor -------------------------------------------------------------
    async def _watch_manager(self) -> None:
        """Handed-off step endings, API cancellations and the job's own deadline arrive here.

        It must outlive any error: the job waits on it for every handed-off step's end, so a
        watch that died would leave the job running for ever. On a failure it starts again,
        from the job's current state (latest state wins, nothing is missed).
        """
        while True:
            try:
                async for job in self._monitor.watch(self.manager_id):
                    if await self._on_manager_state(job):
                        return
                log.warning("manager watch ended early; watching again", manager_id=self.manager_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("manager watch failed; watching again", manager_id=self.manager_id)
            await asyncio.sleep(WATCH_RETRY_S)

    async def _on_manager_state(self, job: Job) -> bool:
        """Apply one state of the manager; True once it is terminal."""
        manager_status = job.status
        if (
            self.owner
            and job.owner != self.owner
            and manager_status is not None
            and not manager_status.terminal
        ):
            # Adopted by another orchestrator (or orphaned: this one's lease lapsed).
            self.fence("its manager has another owner")
            return True
        for stat in job.step_stats:
            step = self._by_id.get(stat.step_id)
            if (
                step is not None
                and step.started
                and not step.ended.is_set()
                and stat.children.cancelled > max(step.cancelled_sent, step.cancelled_seen)
            ):
                await self._stop_cancelled_children(step, stat.children.cancelled)
            status = stat.status
            if step is None or status is None or not status.terminal or step.ended.is_set():
                continue
            # The entry is a hint (clients may change it alone); the step's row decides.
            row = await self._monitor.get_job(step.job_id)
            row_status = row.status
            if row_status is not None and row_status.terminal:
                self._record_end(step, row_status, row.error)
            elif step.started and not step.handed:
                # A client ended the step through its entry: stop it and end its row too.
                step.cancel.set()
                await self._end_step(step, status, stat.error)
        if manager_status is None or not manager_status.terminal:
            return False
        if manager_status is Status.CANCELLED:
            self._cancelled = True
        elif job.end_reason == EndReason.TIMEOUT:
            self._timed_out = True
            self._manager_error = job.error
        self._stop_all()
        for step in self._steps:
            if not step.ended.is_set() and not step.started:
                # Never started: the monitor's cascade already made it terminal.
                fresh = await self._monitor.get_job(step.job_id)
                self._record_end(step, fresh.status, fresh.error)
        return True

    async def _stop_cancelled_children(self, step: _StepRun, cancelled: int) -> None:
        """More of the step's children are cancelled in the monitor than this runner ended so:
        some were cancelled through the API, perhaps through another orchestrator. Their work
        stops here too (processes killed); those not started yet will not start."""
        step.cancelled_seen = cancelled
        for child in await self._monitor.list_jobs(parent_id=step.job_id, status=Status.CANCELLED):
            control = step.children.get(child.id)
            if control is not None:
                control.signal.own.set()
            else:
                step.cancelled_elsewhere.add(child.id)

    async def _finish(self) -> Status:
        reason = EndReason.ORCHESTRATOR
        if self._cancelled:
            status, error, reason = Status.CANCELLED, self._cancel_reason, EndReason.CANCELLED
        elif self._timed_out:
            status, error = Status.FAILED, self._manager_error or "job timed out"
        elif self._failed_by_rule:
            status, error = Status.FAILED, self._manager_error
        else:
            status, error = Status.COMPLETED, ""
        try:
            job = await self._write_status(self.manager_id, status, error, reason)
            final = job.status
        except (StatusConflict, FailedPrecondition):
            final = (await self._monitor.get_job(self.manager_id)).status
        log.info("job finished", manager_id=self.manager_id, status=final.value)
        metrics.observe_job_end(final.value)
        return final
