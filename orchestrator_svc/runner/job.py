"""One job from start to end: its steps in file order and by their dependencies, the stop
that ends it early, drain and fence, continuing a job from its record, and its last write."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping
from typing import Any

from orchestrator_svc import metrics
from orchestrator_svc.definitions import JobSpec
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import JobFenced, MonitorClient
from orchestrator_svc.process_guard import ProcessGuard
from orchestrator_svc.records import ChildEvent, Job
from orchestrator_svc.remote.publisher import Publisher
from orchestrator_svc.resume import JobRecord, Plan, plan_step
from orchestrator_svc.runner.children import Children
from orchestrator_svc.runner.context import JobContext, log
from orchestrator_svc.runner.repairs import Repairs
from orchestrator_svc.runner.step import StepDriver, hand_off
from orchestrator_svc.runner.step_state import StepRun
from orchestrator_svc.runner.watch import ManagerWatch
from orchestrator_svc.workers.base import Worker
from stepflow_common import manager_document as document
from stepflow_common import tracing
from stepflow_common.errors import FailedPrecondition, StatusConflict
from stepflow_common.status import Status


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
        publisher: Publisher | None = None,
    ) -> None:
        self.spec = spec
        self.manager_id = manager.id
        # The processes of this job's work die with this orchestrator (see process_guard).
        self.guard: ProcessGuard | None = None
        runs = [
            StepRun(i, s, job.id) for i, (s, job) in enumerate(zip(spec.steps, steps, strict=True))
        ]
        self.job = JobContext(
            spec, manager.id, runs, monitor=monitor, stream=stream, owner=owner, publisher=publisher
        )
        self._workers = workers
        self._children = Children(self.job, rerun_after=rerun_after)
        self.driver = StepDriver(self.job, self._children, workers)
        self._repairs = Repairs(self.job)
        self._watch = ManagerWatch(self.job)
        self._resume = resume
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
        publisher: Publisher | None = None,
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
            publisher=publisher,
        )

    # -- what the orchestrator asks of a job -------------------------------------------------
    async def run(self) -> Status | None:
        """Drive the job to its end; None when it was drained or fenced (not ended here)."""
        self.job.task = asyncio.current_task()
        if self.guard is not None:
            with self.guard.active():  # the steps' tasks, created below, inherit it
                return await self._run()
        return await self._run()

    def owns_step(self, step_id: str) -> bool:
        return step_id in self.job.by_id

    def drain(self) -> None:
        """Shutdown: start no new step or child, let running children finish, leave the rest
        (and the step they belong to) unrecorded for the job's next owner."""
        self.job.draining.set()

    def fence(self, why: str = "another orchestrator owns it now") -> None:
        self.job.fence(why)

    async def cancel(self, reason: str = "") -> None:
        """Stop all work at once (CancelJob); the job then ends `cancelled` with ``reason``."""
        self.job.stop.cancel(reason)
        self.job.stop_all()

    async def cancel_step(self, step_id: str, reason: str = "") -> None:
        step = self.job.by_id.get(step_id)
        if step is not None:
            step.cancel_reason = reason or "cancelled"
            step.cancel.set()

    async def cancel_child(self, step_id: str, child_id: str, wait_s: float) -> None:
        """Stop one child's work (its process too), waiting up to ``wait_s`` for it to end."""
        step = self.job.by_id.get(step_id)
        if step is None or step.ended.is_set():
            return
        control = step.child(child_id)
        control.signal.own.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(control.ended.wait(), wait_s)

    def on_event_rejected(self, event: ChildEvent, reason: str) -> bool:
        return self._repairs.on_event_rejected(event, reason)

    # -- the job's flow ----------------------------------------------------------------------
    async def _run(self) -> Status | None:
        job = self.job
        if self._resume is not None:
            self.apply_records(self._resume)
        watcher = asyncio.create_task(self._watch.run(), name=f"watch-{self.manager_id}")
        step_tasks: list[asyncio.Task[None]] = []
        try:
            await job.write_status(self.manager_id, Status.RUNNING)
            await job.write_metadata(
                self.manager_id,
                document.job_started({s.spec.name: s.job_id for s in job.steps}),
            )
            for step in job.steps:
                if step.ended.is_set() or step.handed:
                    continue  # continued job: ended, or with the monitor
                if not await self._unless_drained(self._wait_to_start(step)):
                    break
                run = tracing.step_run(
                    self.driver.run(step),
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
            for step in job.steps:
                if not await self._unless_drained(step.ended.wait()):
                    break
            if job.draining.is_set():
                log.info("job drained; its next owner continues it", manager_id=self.manager_id)
                return None
            await asyncio.gather(*job.side_writes)
            return await self._finish()
        except asyncio.CancelledError:
            if job.fenced:
                return None
            raise
        except JobFenced:
            job.fence()
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
        draining = self.job.draining
        if draining.is_set():
            if asyncio.iscoroutine(aw):
                aw.close()
            elif isinstance(aw, asyncio.Future):
                aw.cancel()
            return False
        work = asyncio.ensure_future(aw)
        drained = asyncio.ensure_future(draining.wait())
        try:
            await asyncio.wait([work, drained], return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not work.done():
                work.cancel()
        return work.done() and not work.cancelled()

    async def _wait_to_start(self, step: StepRun) -> None:
        for name in step.spec.depends_on:
            await self.job.step_named(name).ended.wait()

    def apply_records(self, record: JobRecord) -> None:
        """Continue a job: each step's plan from its record; ended steps stand and count for
        on_error and the error tolerance, handed-off ones are watched."""
        job = self.job
        failed_children = 0
        for step, rec in zip(job.steps, record.records, strict=True):
            worker = self._workers[step.spec.type]
            step.plan = plan_step(step.spec, rec, spawns_children=worker.spawns_children)
            failed_children += rec.failed_children
            if step.plan is Plan.STANDS:
                step.started = rec.status is not Status.SKIPPED
                job.record_end(step, rec.status, rec.error, observe=False)
            elif step.plan is Plan.WATCH:
                step.started = True
                hand_off(step)
            elif step.plan is Plan.CONTINUE:
                step.adopt(rec)
            elif step.plan is Plan.RERUN:
                step.attempt = rec.attempt + 1
        job.count_child_failures(failed_children)
        log.info(
            "continuing job",
            manager_id=self.manager_id,
            plans={s.spec.name: s.plan.value for s in job.steps},
            child_failures=job.child_failures.count,
        )

    async def _finish(self) -> Status:
        status, error, reason = self.job.stop.outcome()
        try:
            written = await self.job.write_status(self.manager_id, status, error, reason)
            final = written.status
        except (StatusConflict, FailedPrecondition):
            final = (await self.job.monitor.get_job(self.manager_id)).status
        log.info("job finished", manager_id=self.manager_id, status=final.value)
        metrics.observe_job_end(final.value)
        return final
