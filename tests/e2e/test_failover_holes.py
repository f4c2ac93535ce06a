"""An operator's bad day, with real processes, on SQLite and PostgreSQL: two live processes
under one owner, an orchestrator lost while a child's start is not yet committed, kill -9
with grandchildren running, a drain longer than the lease, and a job only some orchestrators
can run.

The fanout children here run ``ledger.py``: each run appends ``start``/``end`` lines (item,
attempt, pid) to a ledger file, and at its start records ``overlap`` if an earlier run of the
same item is still alive. So "run once" and "at most once at a time" are read off what the
processes themselves did, not off the record.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.jobs import by_name, final, list_all, watch_until
from tests.ledger import Ledger
from tests.process_helpers import (
    ORCHESTRATOR_SVC,
    ServerProcess,
    assert_tree_consistent,
    clean_env,
    install,
    orchestrator,
    submit_to,
)

S = job_pb2
WITHIN_S = 60.0
QUICK_JOB = str(Path(__file__).resolve().parents[2] / "examples" / "quick.toml")
# Long: a job waiting for an orchestrator that can run it must not fail meanwhile.
ORPHAN_TIMEOUT = "60s"


@pytest.fixture
def monitor_options() -> dict[str, Any]:
    """A job waiting for an orchestrator that can run it must not fail meanwhile."""
    return {
        "grace_period": "1s",
        "default_wait_timeout": "120s",
        "extra": ["--orphan-timeout", ORPHAN_TIMEOUT],
    }


NAPPER_ENTRY = "napper = napper_plugin:Napper"


def fanout_job(
    name: str, ledger: Ledger, items: int, seconds: float, *, on_interrupt: str = "rerun"
) -> dict[str, Any]:
    return {
        "name": name,
        "steps": [
            {
                "name": "work",
                "type": "fanout",
                "on_interrupt": on_interrupt,
                "config": {
                    "items": [str(i) for i in range(items)],
                    "command": ledger.command(seconds),
                    "concurrency": 3,
                },
            }
        ],
    }


def work_at_least(done: int, *, running: bool = True) -> Any:
    def check(job: job_pb2.Job) -> bool:
        stats = by_name(job)
        if "work" not in stats:
            return False
        c = stats["work"].children
        return c.completed + c.failed >= done and (c.running > 0 or not running)

    return check


def processes_with(token: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if token in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


async def eventually(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g}s: {what}")
        await asyncio.sleep(0.05)


# -- 1. two live processes under one --owner -----------------------------------------------------
async def test_a_second_process_under_the_same_owner_supersedes_the_first_for_good(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path)
    first = orchestrator(monitor_proc, tmp_path, "same", lease="2s")
    second = orchestrator(monitor_proc, tmp_path, "same", lease="2s")
    second.log_path = tmp_path / "same-2.log"
    try:
        await first.run()
        manager_id = await submit_to(first, fanout_job("twins", ledger, 12, 0.8))
        await watch_until(mstub, manager_id, work_at_least(3), within=WITHIN_S)
        first.send(signal.SIGSTOP)  # frozen mid-job, its children still running
        await second.run()  # a restart as far as the monitor can tell: resumes at once
        await asyncio.sleep(1.0)
        first.send(signal.SIGCONT)  # wakes up: it must not take the job back
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
        await assert_tree_consistent(mstub, manager_id, expected_counts={"work": (0, 0, 12, 0, 0)})
        kids = await list_all(mstub, parent_id=by_name(job)["work"].step_id)
        assert all(k.interruptions <= 1 for k in kids), [k.interruptions for k in kids]
        assert ledger.overlaps() == []  # no two runs of one child at once
        assert all(n >= 1 for n in ledger.ends().values()) and len(ledger.ends()) == 12
        # The first instance was told it was superseded, stopped its work and took nothing
        # back: one take-over in all, by the second.
        await eventually(
            lambda: "superseded" in first.log_text(), 10, "the first instance learns it"
        )
        assert first.log_text().count("jobs taken over") == 0
        assert second.log_text().count("jobs taken over") == 1
        assert first.proc is not None and first.proc.poll() is None  # alive, idle, fenced
    finally:
        first.stop()
        second.stop()


# -- 2. a child's work starts only once its running is committed ----------------------------------
async def test_on_interrupt_fail_work_runs_at_most_once_when_its_start_was_never_committed(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path)
    a = orchestrator(monitor_proc, tmp_path, "a")
    b = orchestrator(monitor_proc, tmp_path, "b")
    try:
        await a.run()
        await b.run()
        job_def = fanout_job("once", ledger, 9, 0.6, on_interrupt="fail")
        manager_id = await submit_to(a, job_def)
        await watch_until(mstub, manager_id, work_at_least(1), within=WITHIN_S)
        # The monitor freezes: the next children's `running` cannot be committed. They must
        # not start; then their orchestrator dies.
        monitor_proc.send(signal.SIGSTOP)
        await asyncio.sleep(1.5)
        started_while_frozen = sum(ledger.starts().values())
        a.kill()
        monitor_proc.send(signal.SIGCONT)
        job = await final(mstub, manager_id, within=WITHIN_S)
        # Every child's work ran at most once, whatever died when; the children lost while
        # running failed orchestrator_lost, the others ran (once) on b.
        assert max(ledger.starts().values()) == 1, ledger.starts()
        kids = await list_all(mstub, parent_id=by_name(job)["work"].step_id)
        lost = [k for k in kids if k.end_reason == "orchestrator_lost"]
        done = [k for k in kids if k.status == S.JOB_STATUS_COMPLETED]
        assert len(lost) + len(done) == 9
        assert sum(ledger.starts().values()) <= started_while_frozen + len(done)
        assert all(k.attempt == 1 for k in done)
    finally:
        monitor_proc.send(signal.SIGCONT)
        a.stop()
        b.stop()


async def test_every_process_of_a_killed_orchestrator_dies_with_it(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    token = f"{time.time_ns() % 10**6}.271828"  # a sleep no other process runs
    a = orchestrator(monitor_proc, tmp_path, "a")
    try:
        await a.run()
        job_def = {
            "name": "grandchildren",
            "steps": [
                {
                    "name": "work",
                    "type": "fanout",
                    "config": {
                        # A background grandchild a parent-death signal would not reach.
                        "items": ["1", "2", "3"],
                        "command": f"sleep {token} & sleep {token}; wait",
                    },
                }
            ],
        }
        manager_id = await submit_to(a, job_def)
        await watch_until(mstub, manager_id, lambda j: running_children(j) == 3, within=WITHIN_S)
        # Three shells, each with two sleeps (one in the background).
        await eventually(lambda: len(processes_with(token)) >= 9, 10, "the sleeps running")
        a.kill()
        await eventually(lambda: processes_with(token) == [], 2.0, "none alive 2 s later")
    finally:
        a.stop()


def running_children(job: job_pb2.Job) -> int:
    stats = by_name(job)
    return stats["work"].children.running if "work" in stats else 0


# -- 3. a drain longer than the lease keeps the lease ---------------------------------------------
async def test_a_drain_longer_than_the_lease_lets_its_children_finish(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path)
    # A lease of 3s (heartbeats every 1s) under a drain of 6s: short enough to lapse twice over
    # were it not renewed, long enough that a loaded machine's late heartbeat is not a lapse.
    a = orchestrator(monitor_proc, tmp_path, "draining", lease="3s", grace="12s")
    b = orchestrator(monitor_proc, tmp_path, "other", lease="3s")
    try:
        await a.run()
        await b.run()
        manager_id = await submit_to(a, fanout_job("drain", ledger, 6, 6.0))
        await watch_until(mstub, manager_id, lambda j: running_children(j) == 3, within=WITHIN_S)
        assert await asyncio.to_thread(a.stop, 30.0) == 0
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
        await assert_tree_consistent(mstub, manager_id, expected_counts={"work": (0, 0, 6, 0, 0)})
        # The three running at the SIGTERM finished there; nothing ran twice.
        assert set(ledger.starts().values()) == {1}, ledger.starts()
        kids = await list_all(mstub, parent_id=by_name(job)["work"].step_id)
        assert {k.attempt for k in kids} == {1}
        assert "lease lapsed" not in a.log_text()
    finally:
        a.stop()
        b.stop()


# -- 5. a job only some orchestrators can run ----------------------------------------------------
PLUGIN = """\
import asyncio
from orchestrator_svc.workers.base import BaseWorker, StepResult
from orchestrator_svc.workers.children import ChildOutcome, run_children


class Napper(BaseWorker):
    type = "napper"
    description = "children that nap (a test plugin)"
    spawns_children = True

    async def run(self, ctx):
        count = int(ctx.config.get("children", 4))

        async def run_one(index, attempt):
            await asyncio.sleep(float(ctx.config.get("seconds", 0.5)))
            return ChildOutcome("completed")

        names = [f"nap-{i}" for i in range(count)]
        created = await run_children(ctx, names, run_one, concurrency=2)
        return StepResult.spawned(created, cancelled=ctx.cancelled.is_set())
"""


async def test_a_job_goes_only_to_an_orchestrator_that_can_run_it(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    plugin = {"PYTHONPATH": str(install(tmp_path / "site", "napper_plugin", PLUGIN, NAPPER_ENTRY))}
    # A long lease: the restart below comes while the job is still its owner's.
    able = orchestrator(monitor_proc, tmp_path, "able", lease="60s")
    able.extra_env = plugin
    able_again = orchestrator(monitor_proc, tmp_path, "able", lease="60s")
    able_again.log_path = tmp_path / "able-2.log"
    lacking = orchestrator(monitor_proc, tmp_path, "lacking")
    later = orchestrator(monitor_proc, tmp_path, "later")
    later.extra_env = plugin
    try:
        await able.run()
        await lacking.run()
        job_def = {
            "name": "naps",
            "steps": [{"name": "work", "type": "napper", "config": {"children": 8}}],
        }
        manager_id = await submit_to(able, job_def)
        await watch_until(mstub, manager_id, work_at_least(1), within=WITHIN_S)
        able.kill()
        # Its owner restarted without the plugin: the job is given back at once, not kept.
        await able_again.run()
        await eventually_async(mstub, manager_id, lambda j: j.owner == "", 10)
        # Only orchestrators without the plugin are alive: neither adopts the job, and it does
        # not fail meanwhile (it waits, visibly: no owner).
        await asyncio.sleep(2.0)
        job = (await mstub.GetJob(get_request(manager_id))).job
        assert job.owner == "" and job.status == S.JOB_STATUS_RUNNING, job.owner
        await later.run()
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
        assert job.owner == "later"
        await assert_tree_consistent(mstub, manager_id, expected_counts={"work": (0, 0, 8, 0, 0)})
    finally:
        able.stop()
        able_again.stop()
        lacking.stop()
        later.stop()


async def eventually_async(
    stub: m_grpc.MonitorServiceStub, job_id: str, check: Any, within: float
) -> None:
    deadline = time.monotonic() + within
    while True:
        job = (await stub.GetJob(get_request(job_id))).job
        if check(job):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g}s: owner {job.owner!r}")
        await asyncio.sleep(0.05)


def get_request(job_id: str) -> Any:
    from stepflow_proto.v1 import monitor_service_pb2 as m

    return m.GetJobRequest(job_id=job_id)


# -- a newcomer's surprise: the monitor goes away under a running orchestrator --------------------
async def test_an_orchestrator_that_loses_its_monitor_says_so_at_once(
    monitor_proc: ServerProcess, tmp_path: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from stepflow_proto.v1 import orchestrator_service_pb2 as o
    from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

    orch = orchestrator(monitor_proc, tmp_path, "alone", lease="1.5s")
    try:
        await orch.run()
        monitor_proc.kill()
        async with aio.insecure_channel(orch.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                return int(resp.status)

            deadline = time.monotonic() + 10
            while await status() == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "still SERVING 10 s after the monitor died"
                await asyncio.sleep(0.1)
            stub = o_grpc.OrchestratorServiceStub(channel)
            started = time.monotonic()
            request = o.SubmitJobRequest()
            request.definition.name = "nowhere"
            step = request.definition.steps.add()
            step.name, step.type = "s", "command"
            step.config.update({"command": "true"})
            with pytest.raises(aio.AioRpcError) as caught:
                await stub.SubmitJob(request, timeout=30)
            assert caught.value.code().name == "UNAVAILABLE"
            assert monitor_proc.address in (caught.value.details() or "")
            assert time.monotonic() - started < 5  # at once, not after a deadline
            # The CLI names the service that is missing: the monitor, not the orchestrator.
            done = await asyncio.to_thread(
                subprocess.run,
                [str(ORCHESTRATOR_SVC), "submit", QUICK_JOB,
                 "--orchestrator", orch.address, "--connect-timeout", "5s"],
                capture_output=True, text=True, timeout=60, env=clean_env(),
            )  # fmt: skip
            line = done.stderr.strip().splitlines()[-1]
            assert done.returncode == 4, done.stderr
            assert f"the orchestrator at {orch.address} is unavailable" in line, line
            assert f"cannot reach its monitor at {monitor_proc.address}" in line, line
            await monitor_proc.run()  # back on the same port: SERVING again
            deadline = time.monotonic() + 20
            while await status() != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "not SERVING again with the monitor back"
                await asyncio.sleep(0.1)
    finally:
        orch.stop()
