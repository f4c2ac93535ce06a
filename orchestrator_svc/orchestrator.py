"""The orchestrator's state: the jobs this instance runs, submit (idempotent), cancel, drain.
Its lease on them (the heartbeat, resume and adoption, being superseded, giving jobs back) is
``lease_keeper.LeaseKeeper``'s, which reaches the jobs through ``LeasedJobs``."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping

import structlog

from orchestrator_svc import resume
from orchestrator_svc.definitions import Executor, JobSpec, to_mapping
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.lease_keeper import DEFAULT_LEASE_S, LeaseKeeper, lost_jobs
from orchestrator_svc.monitor_client import JobFenced, MonitorClient
from orchestrator_svc.process_guard import ProcessGuard
from orchestrator_svc.records import ChildEvent, Job, LeaseAnswer
from orchestrator_svc.remote.publisher import Publisher
from orchestrator_svc.runner import JobRunner
from orchestrator_svc.workers.base import Worker
from stepflow_common import manager_document as doc
from stepflow_common import tracing
from stepflow_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    StepflowError,
    Unavailable,
)
from stepflow_common.job_keys import RUNNERS_TYPE
from stepflow_common.status import EndReason, Kind, Status

log = structlog.get_logger(__name__)

CANCEL_WAIT_S = 10.0  # how long CancelJob waits for a job's work to stop before ending it
DEFAULT_CAPACITY = 16
"""Jobs an orchestrator runs before it stops adopting others' (it still takes submits)."""
STOP_WAIT_S = 5.0  # after the shutdown grace, how long stopped runners get to unwind


class Orchestrator:
    def __init__(
        self,
        monitor: MonitorClient,
        stream: EventStream,
        workers: Mapping[str, Worker],
        *,
        owner: str,
        monitor_address: str = "",
        lease_s: float = DEFAULT_LEASE_S,
        capacity: int = DEFAULT_CAPACITY,
        instance: str = "",
        publisher: Publisher | None = None,
    ) -> None:
        # Where executor-celery steps send their children (None: no --broker-url).
        self.publisher = publisher
        self.monitor = monitor
        self.monitor_address = monitor_address
        # False until the monitor has answered the first heartbeat.
        self.connected = False
        self.ready = asyncio.Event()
        self.stream = stream
        self.workers = workers
        self.owner = owner
        # Kills what this orchestrator's jobs started if it dies or its lease lapses.
        self.guard = ProcessGuard()
        self.lease = LeaseKeeper(
            monitor,
            self,
            owner=owner,
            workers=workers,
            guard=self.guard,
            monitor_address=monitor_address,
            lease_s=lease_s,
            instance=instance,
            extra_types=(RUNNERS_TYPE,) if publisher is not None else (),
        )
        # Every write and event names this process's instance: a superseded one's are fenced.
        monitor.instance = self.lease.instance
        stream.instance = self.lease.instance
        self.capacity = capacity
        self.draining = False
        self._runners: dict[str, JobRunner] = {}
        # The heartbeat count when each runner started: an answer to an earlier heartbeat
        # does not know the job yet, so it cannot say the job is no longer ours.
        self._since: dict[str, int] = {}
        self._loading: set[str] = set()
        self._unrunnable: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._submit_lock = asyncio.Lock()

    # -- the lease: ``self.lease`` keeps it, with its state and its hooks ------------------------
    async def heartbeat(self) -> LeaseAnswer:
        """Renew the lease once and act on the answer (``LeaseKeeper.heartbeat``)."""
        return await self.lease.heartbeat()

    async def lease_loop(self) -> None:
        """Keep the lease until cancelled or superseded (``LeaseKeeper.lease_loop``)."""
        await self.lease.lease_loop()

    async def release_lease(self, timeout_s: float = 5.0) -> None:
        """Give the lease up on shutdown (``LeaseKeeper.release_lease``)."""
        await self.lease.release_lease(timeout_s)

    # What the lease keeper asks of the jobs (``LeasedJobs``).
    def held(self) -> list[str]:
        return [*self._runners, *self._loading]

    def room(self) -> int:
        return 0 if self.draining else max(0, self.capacity - len(self.held()))

    async def apply_lease(self, answer: LeaseAnswer, beat: int) -> None:
        """Stop the work on the jobs heartbeat ``beat``'s answer says are no longer ours, and
        continue those that are ours and not running here (resumed, adopted, left over)."""
        async with self._submit_lock:  # a submit in flight registers its runner first
            known = [j for j in self._runners if self._since.get(j, beat) < beat]
            for job_id in lost_jobs(answer, known):
                self._runners[job_id].fence("another orchestrator owns it now")
            for job_id in [*answer.resumed, *answer.adopted, *answer.owned]:
                self._continue_soon(job_id)

    def fence_all(self, reason: str) -> None:
        for runner in list(self._runners.values()):
            runner.fence(reason)

    def _continue_soon(self, job_id: str) -> None:
        if (
            self.draining
            or job_id in self._runners
            or job_id in self._loading
            or job_id in self._unrunnable
        ):
            return
        self._loading.add(job_id)
        task: asyncio.Task[object] = asyncio.create_task(
            self._continue(job_id), name=f"continue-{job_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _continue(self, job_id: str) -> object:
        """Read a job this orchestrator now owns and run it on from where it was."""
        try:
            record = await resume.load(self.monitor, job_id, self.workers, owner=self.owner)
        except JobFenced:
            return None  # adopted by another meanwhile
        except (StepflowError, KeyError) as exc:
            # No stored definition, or a step type this orchestrator lacks: given back at once,
            # for an orchestrator that can run it.
            self._loading.discard(job_id)
            if not await self.lease.give_back(job_id, f"{self.owner} cannot run it: {exc}"):
                self._unrunnable.add(job_id)  # not tried here again
            return None
        finally:
            self._loading.discard(job_id)
        if record.ended or record.manager.owner != self.owner or self.draining:
            return None
        async with self._submit_lock:
            if job_id in self._runners:
                return None
            runner = JobRunner.resumed(
                record,
                monitor=self.monitor,
                stream=self.stream,
                workers=self.workers,
                publisher=self.publisher,
                owner=self.owner,
                rerun_after=self.lease.rerun_after(job_id),
            )
            self._start(runner)
        return None

    # -- jobs ------------------------------------------------------------------------------------
    def _check_executors(self, spec: JobSpec) -> None:
        """Refuse, before anything is created, a job whose steps this orchestrator cannot send
        to runners."""
        for i, step in enumerate(spec.steps):
            if step.executor is not Executor.CELERY:
                continue
            if self.publisher is None:
                raise InvalidArgument(
                    f'steps[{i}].executor: "celery" needs an orchestrator started with '
                    "--broker-url (this one has no broker); submit it to one that has, or use "
                    '"local"'
                )
            worker = self.workers.get(step.type)
            if worker is not None and not worker.spawns_children:
                raise InvalidArgument(
                    f'steps[{i}].executor: "celery" runs a step\'s children on runners, and '
                    f'worker type {step.type!r} has no children; use "local"'
                )

    async def submit(self, spec: JobSpec, request_id: str = "") -> str:
        """Create the manager (with its definition) and its steps in the monitor and start
        running the job.

        A retried submit with the same request_id finds the same manager (CreateJob is
        idempotent by request_id), through any orchestrator, and does not run it again:
        whoever owns it runs it.
        """
        if self.draining:
            raise Unavailable("the orchestrator is shutting down; submit to another one")
        self._check_executors(spec)
        # Without a caller's key, one of our own: the monitor client retries CreateJob when the
        # answer is lost (UNAVAILABLE, DEADLINE_EXCEEDED), which without a key could create
        # a second manager.
        request_id = request_id or f"submit-{uuid.uuid4().hex}"
        async with self._submit_lock:
            manager = await self.monitor.create_job(
                kind=Kind.MANAGER,
                name=spec.name,
                timeout_s=spec.timeout_s,
                request_id=request_id,
                owner=self.owner,
                metadata={"definition_config": spec.config} if spec.config else {},
                definition=to_mapping(spec),
            )
            if (
                manager.id in self._runners
                or manager.id in self._loading
                or manager.status is not Status.PENDING
                or manager.owner != self.owner  # another orchestrator took this request
            ):
                return manager.id
            try:
                steps = [
                    await self.monitor.create_job(
                        kind=Kind.STEP,
                        parent_id=manager.id,
                        name=step.name,
                        type_=step.type,
                        metadata={doc.STEP_INDEX: index},
                        timeout_s=step.timeout_s,
                        request_id=resume.step_request_id(manager.id, index),
                        owner=self.owner,
                    )
                    for index, step in enumerate(spec.steps)
                ]
            except JobFenced:
                return manager.id  # adopted meanwhile: its new owner runs it
            runner = JobRunner(
                spec,
                manager,
                steps,
                monitor=self.monitor,
                stream=self.stream,
                workers=self.workers,
                publisher=self.publisher,
                owner=self.owner,
            )
            self._start(runner)
            log.info("job submitted", manager_id=manager.id, name=spec.name, steps=len(steps))
            return manager.id

    def _start(self, runner: JobRunner) -> None:
        runner.guard = self.guard
        self._runners[runner.manager_id] = runner
        self._since[runner.manager_id] = self.lease.beats
        task: asyncio.Task[object] = asyncio.create_task(
            tracing.job_run(self._run(runner), runner.manager_id, runner.spec.name, _job_outcome),
            name=f"job-{runner.manager_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, runner: JobRunner) -> object:
        try:
            return await runner.run()
        except JobFenced:
            return None  # another orchestrator owns it: nothing more is written
        except Exception:
            log.exception("job runner crashed", manager_id=runner.manager_id)
            try:
                await self.monitor.update_status(
                    runner.manager_id,
                    Status.FAILED,
                    "orchestrator error",
                    EndReason.ORCHESTRATOR,
                    owner=self.owner,
                )
            except Exception:
                log.exception("could not record the crash", manager_id=runner.manager_id)
            return None
        finally:
            if self._runners.get(runner.manager_id) is runner:
                del self._runners[runner.manager_id]
                self._since.pop(runner.manager_id, None)

    async def cancel(self, job_id: str, reason: str = "") -> Job:
        """Stop the job's work here (if this instance runs it), then record `cancelled` in the
        monitor, which cascades to everything under it. Works with no runner too."""
        job = await self.monitor.get_job(job_id)
        if job.status is Status.CANCELLED:
            return job
        if job.status.terminal:
            raise FailedPrecondition(f"job {job_id} has already ended; it cannot be cancelled")
        runner = self._runners.get(job.manager_id)
        if runner is not None:
            if job.kind is Kind.MANAGER:
                await runner.cancel(reason)
                # Stop the work first, so the job's own last writes (its steps' ends, a step
                # that was just starting) come before its end: the state a watcher sees last
                # is then the final one. Bounded: a worker may be slow to stop, and the
                # cancel below ends everything in the monitor anyway.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runner.finished.wait(), CANCEL_WAIT_S)
            elif job.kind is Kind.STEP:
                # Not waited for: the runner ends a cancelled step itself before its seal,
                # and the cancel below makes it final in the monitor at once either way.
                await runner.cancel_step(job_id, reason)
            elif job.kind is Kind.CHILD:
                # Its process stops before the record says `cancelled`, so a caller that sees
                # the answer can rely on the work having stopped (bounded, as above).
                await runner.cancel_child(job.parent_id, job_id, CANCEL_WAIT_S)
        return await self.monitor.update_status(
            job_id, Status.CANCELLED, reason or "cancelled", EndReason.CANCELLED
        )

    def require_connected(self) -> None:
        if self.lease.superseded:
            raise Unavailable(
                f"this orchestrator instance was superseded by a newer one under the owner "
                f"{self.owner}; submit to that one"
            )
        if self.lease.monitor_error:
            raise Unavailable(
                f"the orchestrator cannot reach its monitor at {self.monitor_address}: "
                f"{self.lease.monitor_error}"
            )
        if not self.connected:
            raise Unavailable(
                f"the orchestrator is not connected to the monitor at {self.monitor_address} "
                "yet; retry once its health check reports SERVING"
            )

    def on_event_rejected(self, event: ChildEvent, reason: str) -> None:
        """A child event the monitor rejected or refused: the runner of its step repairs the
        record (see ``JobRunner.on_event_rejected``)."""
        for runner in self._runners.values():
            if runner.on_event_rejected(event, reason):
                return

    def on_event_fenced(self, event: ChildEvent, reason: str) -> None:
        """A child event rejected because its job is fenced (another orchestrator owns it
        now): the job's work here stops at once."""
        for runner in self._runners.values():
            if runner.owns_step(event.step_id):
                runner.fence(reason)
                return

    def running(self) -> list[str]:
        return list(self._runners)

    async def wait_all(self, timeout_s: float | None = None) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def drain(self, grace_s: float) -> None:
        """Shutdown: start no new job, step or child; give running children ``grace_s`` to
        finish; then stop what is left without recording it. The jobs stay running in the
        monitor for the next owner (after ReleaseLease, another orchestrator adopts them)."""
        self.draining = True
        for runner in list(self._runners.values()):
            runner.drain()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        left = len(self._runners)
        self.fence_all("the shutdown grace is over")
        for task in list(self._tasks):
            if task.get_name().startswith("continue-"):
                task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_WAIT_S)
        if left:
            log.info("jobs left to the next owner", count=left)


def _job_outcome(result: object) -> dict[str, str]:
    """The job span's last attribute: how the run ended here."""
    return {tracing.JOB_STATUS: str(result) if isinstance(result, Status) else "not ended here"}
