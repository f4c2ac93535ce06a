"""One orchestrator instance's lease on its owner's jobs: the heartbeat that keeps them its own
and says which to resume or adopt, the wait before re-running work that a superseded (perhaps
only frozen) instance may still run, the stop once a newer instance takes over, and giving
jobs back.

Kept apart from running the jobs, so the lease rules read on their own: ``LeaseKeeper`` speaks
to the monitor and reaches the jobs (the ``Orchestrator``) only through ``LeasedJobs``."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import structlog

from orchestrator_svc.monitor_client import JobFenced, MonitorClient
from orchestrator_svc.process_guard import ProcessGuard
from orchestrator_svc.records import LeaseAnswer
from orchestrator_svc.workers.base import Worker
from stepflow_common.errors import DeadlineExceeded, StepflowError, Unavailable
from stepflow_common.takeover import MAX_OWNED_IDS

log = structlog.get_logger(__name__)

DEFAULT_LEASE_S = 30.0
RERUN_MARGIN_S = 0.5  # after a superseded instance's lease would lapse, for its reaper to act


class LeasedJobs(Protocol):
    """What the lease keeper asks of the jobs its lease covers (``Orchestrator`` is one)."""

    draining: bool

    def held(self) -> list[str]:
        """The jobs running or being loaded here (a heartbeat reports them)."""
        ...

    def room(self) -> int:
        """How many more jobs to adopt (0 while draining)."""
        ...

    async def apply_lease(self, answer: LeaseAnswer, beat: int) -> None:
        """Act on heartbeat ``beat``'s answer: stop the jobs lost, continue those ours."""
        ...

    def fence_all(self, reason: str) -> None:
        """Stop every job's work here, writing nothing more."""
        ...


class LeaseKeeper:
    """The lease of one orchestrator process (its instance) under its owner name: renewed
    every lease/3, given up on shutdown, lost for good once a newer instance takes over."""

    def __init__(
        self,
        monitor: MonitorClient,
        jobs: LeasedJobs,
        *,
        owner: str,
        workers: Mapping[str, Worker],
        guard: ProcessGuard,
        monitor_address: str = "",
        lease_s: float = DEFAULT_LEASE_S,
        instance: str = "",
        extra_types: tuple[str, ...] = (),
    ) -> None:
        self.monitor = monitor
        # What it can run besides its workers (``RUNNERS_TYPE`` with a broker).
        self.extra_types = extra_types
        self.jobs = jobs
        self.owner = owner
        # Read at every heartbeat: the types it declares are those it can run at the time.
        self.workers = workers
        # Told each renewed deadline: past it, the reaper kills what this instance's jobs started.
        self.guard = guard
        self.monitor_address = monitor_address
        self.lease_s = lease_s
        # Unique per process: the monitor tells a restart (a new instance) from a renewal, and
        # fences this process for good once a newer one under the same owner takes over.
        self.instance = instance or new_instance_id()
        # Why this instance was superseded ("" while it was not): it then runs nothing more.
        self.superseded = ""
        self.on_superseded: Callable[[str], Awaitable[None]] | None = None
        # Why the last heartbeat could not reach the monitor ("" once one gets through): the
        # orchestrator then reports NOT_SERVING and refuses submits at once, naming the monitor.
        self.monitor_error = ""
        self.on_monitor_reachable: Callable[[bool], Awaitable[None]] | None = None
        # Resumed jobs whose interrupted children may still run in the superseded instance
        # (frozen, not dead) until its lease lapses: re-run them after this monotonic time.
        self._rerun_after: dict[str, float] = {}
        self._beats = 0
        # When the lease lapses unless renewed (monotonic clock; None before the first beat).
        self._lease_until: float | None = None

    @property
    def beats(self) -> int:
        """Heartbeats sent so far: the answer to beat N knows the jobs started before it."""
        return self._beats

    def rerun_after(self, job_id: str) -> float:
        """When a resumed job's interrupted children may run again (monotonic; 0.0: at once).
        Asked once, as its runner is made."""
        return self._rerun_after.pop(job_id, 0.0)

    async def heartbeat(self) -> LeaseAnswer:
        """Renew the lease once and act on the answer: continue the jobs that are ours and not
        running here (resumed after a restart, adopted, or left over), and stop the work on
        jobs that are no longer ours."""
        if self.superseded:
            raise JobFenced(self.superseded)
        max_adopt = self.jobs.room()
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
                worker_types=sorted([*self.workers, *self.extra_types]),
                running_job_ids=self.jobs.held(),
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
        await self.jobs.apply_lease(resp, beat)
        return resp

    async def lease_loop(self) -> None:
        """Heartbeat every lease/3 until cancelled. A lease that lapses unrenewed (the monitor
        unreachable, or this process frozen) stops all work here: another orchestrator may
        own those jobs by now, and the answer that says which comes only with a heartbeat."""
        interval = self.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            if self._lease_until is not None and time.monotonic() > self._lease_until:
                self.jobs.fence_all("this orchestrator's lease lapsed")
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
        if self.on_monitor_reachable is not None and not (self.superseded or self.jobs.draining):
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

    async def give_back(self, job_id: str, reason: str) -> bool:
        """Hand a job this orchestrator cannot run back to the monitor (orphaned at once, for
        an orchestrator that can). False if that failed: the caller does not try it again."""
        log.error("cannot run job; giving it back", manager_id=job_id, reason=reason)
        try:
            await self.monitor.release_lease(
                self.owner, timeout_s=5.0, job_ids=[job_id], reason=reason
            )
        except StepflowError as exc:
            log.warning("could not give the job back", manager_id=job_id, error=str(exc))
            return False
        return True

    async def _supersede(self, reason: str) -> None:
        """A newer instance under this owner took over: stop every job's work here (its
        processes killed), run and adopt nothing more, and never take a job back."""
        if self.superseded:
            return
        self.superseded = reason
        log.error("this instance was superseded; it stops all its work", reason=reason)
        self.jobs.fence_all("a newer instance of this orchestrator took over")
        self.guard.no_deadline()
        if self.on_superseded is not None:
            await self.on_superseded(reason)


def lost_jobs(answer: LeaseAnswer, job_ids: Iterable[str]) -> list[str]:
    """The jobs among ``job_ids`` that ``answer`` says another orchestrator owns now: fenced,
    or missing from the owned list when that list is whole (the monitor cuts it at
    MAX_OWNED_IDS, and a cut list cannot say a job is missing)."""
    fenced = set(answer.fenced)
    owned = set(answer.owned)
    complete = len(answer.owned) < MAX_OWNED_IDS
    return [j for j in job_ids if j in fenced or (complete and j not in owned)]


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
