"""The orchestrator's state: the jobs this instance runs, submit (idempotent), cancel, and the
recovery of jobs a previous run of this instance left unfinished."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping

import structlog

from orchestrator_svc.definitions import JobSpec
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.runner import JobRunner
from orchestrator_svc.workers.base import Worker
from stepflow_common.errors import FailedPrecondition, Unavailable
from stepflow_common.status import EndReason
from stepflow_proto.v1 import job_pb2

log = structlog.get_logger(__name__)

RESTARTED_ERROR = "orchestrator restarted"
CANCEL_WAIT_S = 10.0  # how long CancelJob waits for a job's work to stop before ending it
TERMINAL_PB = {
    job_pb2.JOB_STATUS_COMPLETED,
    job_pb2.JOB_STATUS_FAILED,
    job_pb2.JOB_STATUS_CANCELLED,
    job_pb2.JOB_STATUS_SKIPPED,
}


class Orchestrator:
    def __init__(
        self,
        monitor: MonitorClient,
        stream: EventStream,
        workers: Mapping[str, Worker],
        *,
        owner: str,
        monitor_address: str = "",
    ) -> None:
        self.monitor = monitor
        self.monitor_address = monitor_address
        # False until the monitor has answered once and this owner's jobs are recovered.
        self.connected = False
        self.stream = stream
        self.workers = workers
        self.owner = owner
        self._runners: dict[str, JobRunner] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._submit_lock = asyncio.Lock()

    async def recover(self) -> int:
        """Fail the jobs this owner left unfinished (its in-memory work is gone); the monitor
        cancels their steps and children in the same transaction."""
        failed = 0
        for status in (job_pb2.JOB_STATUS_PENDING, job_pb2.JOB_STATUS_RUNNING):
            for job in await self.monitor.list_jobs(
                owner=self.owner, kind=job_pb2.JOB_KIND_MANAGER, status=status
            ):
                if job.id in self._runners:
                    continue
                try:
                    await self.monitor.update_status(
                        job.id,
                        job_pb2.JOB_STATUS_FAILED,
                        RESTARTED_ERROR,
                        EndReason.ORCHESTRATOR_LOST,
                        owner=self.owner,
                    )
                    failed += 1
                except FailedPrecondition:
                    pass  # ended meanwhile
        if failed:
            log.warning("failed jobs left by a previous run", count=failed, owner=self.owner)
        return failed

    async def submit(self, spec: JobSpec, request_id: str = "") -> str:
        """Create the manager and its steps in the monitor and start running the job.

        A retried submit with the same request_id finds the same manager (CreateJob is
        idempotent by request_id) and does not run it again.
        """
        # Without a caller's key, one of our own: the monitor client retries CreateJob when the
        # answer is lost (UNAVAILABLE, DEADLINE_EXCEEDED), which without a key could create
        # a second manager.
        request_id = request_id or f"submit-{uuid.uuid4().hex}"
        async with self._submit_lock:
            manager = await self.monitor.create_job(
                kind=job_pb2.JOB_KIND_MANAGER,
                name=spec.name,
                timeout_s=spec.timeout_s,
                request_id=request_id,
                owner=self.owner,
                metadata={"definition_config": spec.config} if spec.config else {},
            )
            if (
                manager.id in self._runners
                or manager.status != job_pb2.JOB_STATUS_PENDING
                or manager.owner != self.owner  # another orchestrator took this request
            ):
                return manager.id
            steps = [
                await self.monitor.create_job(
                    kind=job_pb2.JOB_KIND_STEP,
                    parent_id=manager.id,
                    name=step.name,
                    type_=step.type,
                    metadata={"step_index": index},
                    timeout_s=step.timeout_s,
                    request_id=f"{manager.id}.step.{index}",
                    owner=self.owner,
                )
                for index, step in enumerate(spec.steps)
            ]
            runner = JobRunner(
                spec, manager, steps, monitor=self.monitor, stream=self.stream, workers=self.workers
            )
            self._runners[manager.id] = runner
            task: asyncio.Task[object] = asyncio.create_task(
                self._run(runner), name=f"job-{manager.id}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            log.info("job submitted", manager_id=manager.id, name=spec.name, steps=len(steps))
            return manager.id

    async def _run(self, runner: JobRunner) -> object:
        try:
            return await runner.run()
        except Exception:
            log.exception("job runner crashed", manager_id=runner.manager_id)
            try:
                await self.monitor.update_status(
                    runner.manager_id,
                    job_pb2.JOB_STATUS_FAILED,
                    "orchestrator error",
                    EndReason.ORCHESTRATOR,
                )
            except Exception:
                log.exception("could not record the crash", manager_id=runner.manager_id)
            return None
        finally:
            self._runners.pop(runner.manager_id, None)

    async def cancel(self, job_id: str, reason: str = "") -> job_pb2.Job:
        """Stop the job's work here (if this instance runs it), then record `cancelled` in the
        monitor, which cascades to everything under it. Works with no runner too."""
        job = await self.monitor.get_job(job_id)
        if job.status == job_pb2.JOB_STATUS_CANCELLED:
            return job
        if job.status in TERMINAL_PB:
            raise FailedPrecondition(f"job {job_id} has already ended; it cannot be cancelled")
        runner = self._runners.get(job.manager_id)
        if runner is not None:
            if job.kind == job_pb2.JOB_KIND_MANAGER:
                await runner.cancel(reason)
                # Stop the work first, so the job's own last writes (its steps' ends, a step
                # that was just starting) come before its end: the state a watcher sees last
                # is then the final one. Bounded: a worker may be slow to stop, and the
                # cancel below ends everything in the monitor anyway.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runner.finished.wait(), CANCEL_WAIT_S)
            elif job.kind == job_pb2.JOB_KIND_STEP:
                # Not waited for: the runner ends a cancelled step itself before its seal,
                # and the cancel below makes it final in the monitor at once either way.
                await runner.cancel_step(job_id, reason)
            elif job.kind == job_pb2.JOB_KIND_CHILD:
                # Its process stops before the record says `cancelled`, so a caller that sees
                # the answer can rely on the work having stopped (bounded, as above).
                await runner.cancel_child(job.parent_id, job_id, CANCEL_WAIT_S)
        return await self.monitor.update_status(
            job_id, job_pb2.JOB_STATUS_CANCELLED, reason or "cancelled", EndReason.CANCELLED
        )

    def require_connected(self) -> None:
        if not self.connected:
            raise Unavailable(
                f"the orchestrator is not connected to the monitor at {self.monitor_address} "
                "yet; retry once its health check reports SERVING"
            )

    def on_event_rejected(self, event: job_pb2.ChildEvent, reason: str) -> None:
        """A child event the monitor rejected or refused: the runner of its step repairs the
        record (see ``JobRunner.on_event_rejected``)."""
        for runner in self._runners.values():
            if runner.on_event_rejected(event, reason):
                return

    def running(self) -> list[str]:
        return list(self._runners)

    async def wait_all(self, timeout_s: float | None = None) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def abandon(self) -> None:
        """Shutdown: stop running jobs' tasks (they are failed by the next start's recovery)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
