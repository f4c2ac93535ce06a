"""The orchestrator's state: the jobs this instance runs, submit (idempotent), cancel, and its
lease: the heartbeat that keeps its jobs its own, resumes them after a restart, adopts the jobs
of orchestrators that went away, and stops its work on jobs another one owns now."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import structlog

from orchestrator_svc import resume
from orchestrator_svc.definitions import JobSpec, to_mapping
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import JobFenced, MonitorClient
from orchestrator_svc.process_guard import ProcessGuard
from orchestrator_svc.records import ChildEvent, Job, LeaseAnswer
from orchestrator_svc.runner import JobRunner
from orchestrator_svc.workers.base import Worker
from stepflow_common import manager_document as doc
from stepflow_common import tracing
from stepflow_common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    StepflowError,
    Unavailable,
)
from stepflow_common.status import EndReason, Kind, Status
from stepflow_common.takeover import MAX_OWNED_IDS

log = structlog.get_logger(__name__)

CANCEL_WAIT_S = 10.0  # how long CancelJob waits for a job's work to stop before ending it
DEFAULT_LEASE_S = 30.0
DEFAULT_CAPACITY = 16
"""Jobs an orchestrator runs before it stops adopting others' (it still takes submits)."""
STOP_WAIT_S = 5.0  # after the shutdown grace, how long stopped runners get to unwind
RERUN_MARGIN_S = 0.5  # after a superseded instance's lease would lapse, for its reaper to act


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
    ) -> None:
        self.monitor = monitor
        self.monitor_address = monitor_address
        # False until the monitor has answered the first heartbeat.
        self.connected = False
        self.ready = asyncio.Event()
        self.stream = stream
        self.workers = workers
        self.owner = owner
        # Unique per process: the monitor tells a restart (a new instance) from a renewal, and
        # fences this process for good once a newer one under the same owner takes over.
        self.instance = instance or new_instance_id()
        monitor.instance = self.instance
        stream.instance = self.instance
        # Why this instance was superseded ("" while it was not): it then runs nothing more.
        self.superseded = ""
        self.on_superseded: Callable[[str], Awaitable[None]] | None = None
        # Why the last heartbeat could not reach the monitor ("" once one gets through): the
        # orchestrator then reports NOT_SERVING and refuses submits at once, naming the monitor.
        self.monitor_error = ""
        self.on_monitor_reachable: Callable[[bool], Awaitable[None]] | None = None
        # Kills what this orchestrator's jobs started if it dies or its lease lapses.
        self.guard = ProcessGuard()
        # Resumed jobs whose interrupted children may still run in the superseded instance
        # (frozen, not dead) until its lease lapses: re-run them after this monotonic time.
        self._rerun_after: dict[str, float] = {}
        self.lease_s = lease_s
        self.capacity = capacity
        self.draining = False
        self._runners: dict[str, JobRunner] = {}
        # The heartbeat count when each runner started: an answer to an earlier heartbeat
        # does not know the job yet, so it cannot say the job is no longer ours.
        self._since: dict[str, int] = {}
        self._loading: set[str] = set()
        self._unrunnable: set[str] = set()
        self._beats = 0
        # When the lease lapses unless renewed (monotonic clock; None before the first beat).
        self._lease_until: float | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._submit_lock = asyncio.Lock()

    # -- the lease -----------------------------------------------------------------------------
    async def heartbeat(self) -> LeaseAnswer:
        """Renew the lease once and act on the answer: continue the jobs that are ours and not
        running here (resumed after a restart, adopted, or left over), and stop the work on
        jobs that are no longer ours."""
        if self.superseded:
            raise JobFenced(self.superseded)
        free = self.capacity - len(self._runners) - len(self._loading)
        max_adopt = 0 if self.draining else max(0, free)
        self._beats += 1
        beat = self._beats
        sent = time.monotonic()
        try:
            resp = await self.monitor.heartbeat(
                owner=self.owner,
                instance=self.instance,
                lease_s=self.lease_s,
                max_adopt=max_adopt,
                timeout_s=max(self.lease_s / 3, 1.0),
                worker_types=sorted(self.workers),
                running_job_ids=[*self._runners, *self._loading],
            )
        except JobFenced as exc:
            await self._supersede(str(exc))
            raise
        self._lease_until = sent + self.lease_s
        self.guard.lease_until(self._lease_until)
        if (
            resp.resumed
            and resp.superseded_remaining_s > 0
            and may_still_run(resp.superseded_instance)
        ):
            # The superseded instance may be frozen rather than dead: its reaper kills its
            # processes when its lease would have lapsed; its interrupted children run again
            # only after that.
            after = time.monotonic() + resp.superseded_remaining_s + RERUN_MARGIN_S
            for job_id in resp.resumed:
                self._rerun_after[job_id] = after
        if resp.adopted or resp.resumed:
            log.info(
                "jobs taken over",
                owner=self.owner,
                adopted=list(resp.adopted),
                resumed=list(resp.resumed),
            )
        async with self._submit_lock:  # a submit in flight registers its runner first
            fenced = set(resp.fenced)
            owned = set(resp.owned)
            complete = len(resp.owned) < MAX_OWNED_IDS  # the monitor cuts the owned list
            for job_id, runner in list(self._runners.items()):
                lost = job_id in fenced or (complete and job_id not in owned)
                if lost and self._since.get(job_id, beat) < beat:
                    runner.fence("another orchestrator owns it now")
            for job_id in [*resp.resumed, *resp.adopted, *resp.owned]:
                self._continue_soon(job_id)
        return resp

    async def lease_loop(self) -> None:
        """Heartbeat every lease/3 until cancelled. A lease that lapses unrenewed (the monitor
        unreachable, or this process frozen) stops all work here: another orchestrator may
        own those jobs by now, and the answer that says which comes only with a heartbeat."""
        interval = self.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            if self._lease_until is not None and time.monotonic() > self._lease_until:
                for runner in list(self._runners.values()):
                    runner.fence("this orchestrator's lease lapsed")
            try:
                await self.heartbeat()
                await self._monitor_reachable("")
            except JobFenced:
                return  # superseded: this instance runs nothing more
            except (Unavailable, DeadlineExceeded) as exc:
                log.warning("heartbeat failed; trying again", owner=self.owner, error=str(exc))
                await self._monitor_reachable(str(exc) or type(exc).__name__)
            except StepflowError as exc:
                log.warning("heartbeat failed; trying again", owner=self.owner, error=str(exc))
            except Exception:
                log.exception("heartbeat failed; trying again", owner=self.owner)

    async def _monitor_reachable(self, error: str) -> None:
        if bool(error) == bool(self.monitor_error):
            self.monitor_error = error or self.monitor_error
            return
        self.monitor_error = error
        if error:
            log.error("the monitor is unreachable; NOT_SERVING", monitor=self.monitor_address)
        else:
            log.info("the monitor answers again; SERVING", monitor=self.monitor_address)
        if self.on_monitor_reachable is not None and not (self.superseded or self.draining):
            await self.on_monitor_reachable(not error)

    async def release_lease(self, timeout_s: float = 5.0) -> None:
        """Give the lease up (shutdown), so another orchestrator adopts what is left at once."""
        if self.superseded:
            return  # the lease is the newer instance's
        try:
            orphaned = await self.monitor.release_lease(self.owner, timeout_s=timeout_s)
        except StepflowError as exc:
            log.warning("could not release the lease; it lapses", owner=self.owner, error=str(exc))
            return
        log.info("lease released", owner=self.owner, orphaned=orphaned)

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
            await self._give_back(job_id, f"{self.owner} cannot run it: {exc}")
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
                owner=self.owner,
                rerun_after=self._rerun_after.pop(job_id, 0.0),
            )
            self._start(runner)
        return None

    # -- jobs ------------------------------------------------------------------------------------
    async def submit(self, spec: JobSpec, request_id: str = "") -> str:
        """Create the manager (with its definition) and its steps in the monitor and start
        running the job.

        A retried submit with the same request_id finds the same manager (CreateJob is
        idempotent by request_id), through any orchestrator, and does not run it again:
        whoever owns it runs it.
        """
        if self.draining:
            raise Unavailable("the orchestrator is shutting down; submit to another one")
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
                owner=self.owner,
            )
            self._start(runner)
            log.info("job submitted", manager_id=manager.id, name=spec.name, steps=len(steps))
            return manager.id

    async def _give_back(self, job_id: str, reason: str) -> None:
        """Hand a job this orchestrator cannot run back to the monitor (orphaned at once, for
        an orchestrator that can); if that fails, it is not tried here again."""
        log.error("cannot run job; giving it back", manager_id=job_id, reason=reason)
        try:
            await self.monitor.release_lease(
                self.owner, timeout_s=5.0, job_ids=[job_id], reason=reason
            )
        except StepflowError as exc:
            log.warning("could not give the job back", manager_id=job_id, error=str(exc))
            self._unrunnable.add(job_id)

    async def _supersede(self, reason: str) -> None:
        """A newer instance under this owner took over: stop every job's work here (its
        processes killed), run and adopt nothing more, and never take a job back."""
        if self.superseded:
            return
        self.superseded = reason
        log.error("this instance was superseded; it stops all its work", reason=reason)
        for runner in list(self._runners.values()):
            runner.fence("a newer instance of this orchestrator took over")
        self.guard.no_deadline()
        if self.on_superseded is not None:
            await self.on_superseded(reason)

    def _start(self, runner: JobRunner) -> None:
        runner.guard = self.guard
        self._runners[runner.manager_id] = runner
        self._since[runner.manager_id] = self._beats
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
        if self.superseded:
            raise Unavailable(
                f"this orchestrator instance was superseded by a newer one under the owner "
                f"{self.owner}; submit to that one"
            )
        if self.monitor_error:
            raise Unavailable(
                f"the orchestrator cannot reach its monitor at {self.monitor_address}: "
                f"{self.monitor_error}"
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
        left = list(self._runners.values())
        for runner in left:
            runner.fence("the shutdown grace is over")
        for task in list(self._tasks):
            if task.get_name().startswith("continue-"):
                task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_WAIT_S)
        if left:
            log.info("jobs left to the next owner", count=len(left))


def new_instance_id() -> str:
    """``HOST:PID:RANDOM``: unique per process, and telling a later instance on the same host
    whether this process is still alive (``may_still_run``)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:16]}"


def may_still_run(instance: str) -> bool:
    """Whether a superseded instance's processes may still run. An instance of this host
    whose process is gone has none: its reaper killed them when it died. Any other (alive but
    frozen, on another host, or of unknown form) may, until its lease lapses."""
    host, _, rest = instance.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname()[:64] or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) runs nothing
        stat = Path(f"/proc/{pid_text}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _job_outcome(result: object) -> dict[str, str]:
    """The job span's last attribute: how the run ended here."""
    return {tracing.JOB_STATUS: str(result) if isinstance(result, Status) else "not ended here"}
