"""What the runner learns from the monitor, through WatchJob on the manager: handed-off steps'
ends, steps and children cancelled through the API, the job's own deadline and end, and a
take-over by another orchestrator."""

from __future__ import annotations

import asyncio

from orchestrator_svc.records import Job
from orchestrator_svc.runner.context import JobContext, log
from orchestrator_svc.runner.step_state import StepRun
from stepflow_common.status import EndReason, Status

WATCH_RETRY_S = 0.5  # pause before watching the manager again after an unexpected error


class ManagerWatch:
    def __init__(self, job: JobContext) -> None:
        self.job = job

    async def run(self) -> None:
        """Apply the manager's states until it is terminal.

        It must outlive any error: the job waits on it for every handed-off step's end, so a
        watch that died would leave the job running for ever. On a failure it starts again,
        from the job's current state (latest state wins, nothing is missed).
        """
        manager_id = self.job.manager_id
        while True:
            try:
                async for state in self.job.monitor.watch(manager_id):
                    if await self.on_state(state):
                        return
                log.warning("manager watch ended early; watching again", manager_id=manager_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("manager watch failed; watching again", manager_id=manager_id)
            await asyncio.sleep(WATCH_RETRY_S)

    async def on_state(self, manager: Job) -> bool:
        """Apply one state of the manager; True once it is terminal."""
        job = self.job
        manager_status = manager.status
        if (
            job.owner
            and manager.owner != job.owner
            and manager_status is not None
            and not manager_status.terminal
        ):
            # Adopted by another orchestrator (or orphaned: this one's lease lapsed).
            job.fence("its manager has another owner")
            return True
        for stat in manager.step_stats:
            step = job.by_id.get(stat.step_id)
            if step is not None:
                step.observe(stat.children)
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
            row = await job.monitor.get_job(step.job_id)
            row_status = row.status
            if row_status is not None and row_status.terminal:
                job.record_end(step, row_status, row.error)
            elif step.started and not step.handed:
                # A client ended the step through its entry: stop it and end its row too.
                step.cancel.set()
                await job.end_step(step, status, stat.error)
        if manager_status is None or not manager_status.terminal:
            return False
        if manager_status is Status.CANCELLED:
            job.stop.cancel()
        elif manager.end_reason == EndReason.TIMEOUT:
            job.stop.timed_out(manager.error)
        job.stop_all()
        for step in job.steps:
            if not step.ended.is_set() and not step.started:
                # Never started: the monitor's cascade already made it terminal.
                fresh = await job.monitor.get_job(step.job_id)
                job.record_end(step, fresh.status, fresh.error)
        return True

    async def _stop_cancelled_children(self, step: StepRun, cancelled: int) -> None:
        """More of the step's children are cancelled in the monitor than this runner ended so:
        some were cancelled through the API, perhaps through another orchestrator. Their work
        stops here too (processes killed); those not started yet will not start."""
        step.cancelled_seen = cancelled
        children = await self.job.monitor.list_jobs(parent_id=step.job_id, status=Status.CANCELLED)
        for child in children:
            control = step.children.get(child.id)
            if control is not None:
                control.signal.own.set()
            else:
                step.cancelled_elsewhere.add(child.id)
