"""Children on many machines, with real processes: a monitor, orchestrators with a broker, and
two ``orchestrator-svc runner`` processes standing in for two machines (each in its own
process group), on a RabbitMQ queue of the test's own.

What the children's own processes did is read off a ledger (``tests/ledger.py``): each run
writes its start and end, and an overlap if an earlier run of the same item is still alive.
Every scenario ends with exact counts, every child's work run at most once at a time, and
nothing ``running`` that no process runs.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from kombu import Connection

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.jobs import Recorder, by_name, counts_of, final, list_all, submit
from tests.ledger import Ledger
from tests.process_helpers import (
    ORCHESTRATOR_SVC,
    assert_tree_consistent,
    clean_env,
    free_port,
    install,
    monitor_process,
    orchestrator_process,
)
from tests.remote_helpers import (
    cluster,
    own_queue,
    pid_alive,
    runner_process,
)

S = job_pb2
WITHIN_S = 60.0
pytestmark = pytest.mark.timeout(180)


def fanout_job(
    ledger: Ledger, items: int, seconds: float, *, concurrency: int = 4, **step: Any
) -> dict[str, Any]:
    return {
        "name": "remote",
        "steps": [
            {
                "name": "work",
                "type": "fanout",
                "executor": "celery",
                "config": {
                    "items": [str(i) for i in range(items)],
                    "command": ledger.command(seconds),
                    "concurrency": concurrency,
                },
                **step,
            }
        ],
    }


def exact(recorder: Recorder, total: int) -> None:
    """Counts never above the total, never falling, in any state the watch showed."""
    recorder.assert_never_backwards()
    for state in recorder.states:
        for stat in state.step_stats:
            assert sum(counts_of(stat.children)) <= total, state.change_seq


async def nothing_running_unrun(stub: m_grpc.MonitorServiceStub, manager_id: str) -> None:
    """No child is left ``running`` (the job has ended: every process it ran is gone)."""
    for step in await list_all(stub, parent_id=manager_id):
        for child in await list_all(stub, parent_id=step.id):
            assert child.status not in (S.JOB_STATUS_PENDING, S.JOB_STATUS_RUNNING), child


def running_on(name: str) -> Callable[[list[job_pb2.Job]], bool]:
    return lambda kids: any(k.status == S.JOB_STATUS_RUNNING and k.runner == name for k in kids)


async def _pid_of(ledger: Ledger, item: str, within: float = 10.0) -> int:
    deadline = time.monotonic() + within
    while not ledger.pids(item):
        assert time.monotonic() < deadline, f"item {item} never started"
        await asyncio.sleep(0.05)
    return ledger.pids(item)[-1]


async def _gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {within:g}s"
        await asyncio.sleep(0.05)


# -- the plain case --------------------------------------------------------------------------
async def test_children_run_on_both_runners_with_their_output_and_retries(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path) as c:
        flaky = tmp_path / "flaky.sh"
        flaky.write_text('echo "attempt $STEPFLOW_ATTEMPT of $1"; [ "$STEPFLOW_ATTEMPT" -ge 2 ]\n')
        job = {
            "name": "remote",
            "steps": [
                {
                    "name": "sim",
                    "type": "simulate",
                    "executor": "celery",
                    "config": {"children": 60, "duration_ms": 20, "fail_every": 20},
                },
                {
                    "name": "flaky",
                    "type": "fanout",
                    "executor": "celery",
                    "retries": 1,
                    "retry_backoff": "0.1s",
                    "config": {"items": ["x", "y"], "command": f"sh {flaky} {{item}}"},
                },
            ],
        }
        manager_id = await submit(c.ostub(), job)
        recorder = Recorder(c.stub, manager_id)
        manager = await final(c.stub, manager_id, within=WITHIN_S)
        assert manager.status == S.JOB_STATUS_COMPLETED, manager
        await recorder.done()
        exact(recorder, 60)
        await assert_tree_consistent(
            c.stub,
            manager_id,
            expected_counts={"sim": (0, 0, 57, 3, 0), "flaky": (0, 0, 2, 0, 0)},
        )
        stats = by_name(manager)
        sim = await c.children(stats["sim"].step_id)
        assert {k.runner for k in sim} == {"A", "B"}  # both machines took work
        assert all(k.end_reason == "runner" and k.attempt == 1 for k in sim)
        flaky_kids = await c.children(stats["flaky"].step_id)
        assert [k.attempt for k in flaky_kids] == [2, 2]  # the step's retries, not Celery's
        lines = [
            (x.child_id, x.attempt, x.message)
            for x in (await c.stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager_id))).lines
            if x.source == "stdout"
        ]
        for kid in flaky_kids:
            assert (kid.id, 1, f"attempt 1 of {kid.name}") in lines
            assert (kid.id, 2, f"attempt 2 of {kid.name}") in lines
        await nothing_running_unrun(c.stub, manager_id)


async def test_a_job_asking_for_runners_is_refused_by_an_orchestrator_without_a_broker(
    tmp_path: Path,
) -> None:
    monitor = monitor_process(f"sqlite:///{tmp_path / 'm.db'}", tmp_path)
    orch = orchestrator_process(monitor.address, tmp_path)
    try:
        await monitor.run()
        await orch.run()
        async with aio.insecure_channel(orch.address) as channel:
            stub = o_grpc.OrchestratorServiceStub(channel)
            job = {
                "name": "remote",
                "steps": [
                    {
                        "name": "s",
                        "type": "simulate",
                        "executor": "celery",
                        "config": {"children": 1},
                    }
                ],
            }
            with pytest.raises(aio.AioRpcError) as refused:
                await submit(stub, job)
        assert refused.value.code().name == "INVALID_ARGUMENT"
        assert "steps[0].executor" in str(refused.value.details())
        assert "--broker-url" in str(refused.value.details())
        async with aio.insecure_channel(monitor.address) as channel:
            managers = await list_all(m_grpc.MonitorServiceStub(channel), kind=S.JOB_KIND_MANAGER)
        assert managers == []  # no manager was created
    finally:
        orch.stop()
        monitor.stop()


# -- a runner dies, or freezes ---------------------------------------------------------------
ON_EACH_DATABASE = pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@ON_EACH_DATABASE
async def test_kill_9_of_a_runner_mid_child_runs_it_again_on_the_other(
    tmp_path: Path, database_url: str
) -> None:
    ledger = Ledger(tmp_path)
    async with cluster(tmp_path, database_url=database_url) as c:
        manager_id = await submit(c.ostub(), fanout_job(ledger, 8, 6.0))
        recorder = Recorder(c.stub, manager_id)
        step_id = await c.step_id(manager_id)
        kids = await c.wait_children(step_id, running_on("A"))
        victim = next(k for k in kids if k.runner == "A" and k.status == S.JOB_STATUS_RUNNING)
        pid = await _pid_of(ledger, victim.name)
        c.runners["A"].kill()
        await _gone(pid, 5.0)  # every process a child starts dies with its runner
        manager = await final(c.stub, manager_id, within=WITHIN_S)
        assert manager.status == S.JOB_STATUS_COMPLETED, manager
        await recorder.done()
        exact(recorder, 8)
        await assert_tree_consistent(c.stub, manager_id, expected_counts={"work": (0, 0, 8, 0, 0)})
        again = next(k for k in await c.children(step_id) if k.id == victim.id)
        assert (again.attempt, again.runner, again.interruptions) == (2, "B", 1)
        assert ledger.overlaps() == []
        assert ledger.ends()[victim.name] == 1  # attempt 1 never ended: it was killed
        await nothing_running_unrun(c.stub, manager_id)


async def test_a_frozen_runner_loses_its_child_and_its_stale_end_counts_for_nothing(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    async with cluster(tmp_path) as c:
        manager_id = await submit(c.ostub(), fanout_job(ledger, 4, 8.0))
        step_id = await c.step_id(manager_id)
        kids = await c.wait_children(step_id, running_on("A"))
        victim = next(k for k in kids if k.runner == "A" and k.status == S.JOB_STATUS_RUNNING)
        pid = await _pid_of(ledger, victim.name)
        c.runners["A"].signal_group(signal.SIGSTOP)
        try:
            # Half a heartbeat (1s) frozen: its processes are killed; past the heartbeat the
            # broker gives the message to B, which runs attempt 2.
            await _gone(pid, 5.0)
            await c.wait_children(
                step_id,
                lambda ks: any(k.id == victim.id and k.runner == "B" for k in ks),
                within=30.0,
            )
        finally:
            c.runners["A"].signal_group(signal.SIGCONT)
        manager = await final(c.stub, manager_id, within=WITHIN_S)
        assert manager.status == S.JOB_STATUS_COMPLETED, manager
        await assert_tree_consistent(c.stub, manager_id, expected_counts={"work": (0, 0, 4, 0, 0)})
        again = next(k for k in await c.children(step_id) if k.id == victim.id)
        assert (again.attempt, again.runner) == (2, "B")
        assert ledger.overlaps() == []
        # A woke up with attempt 1's result: refused by the monitor, or dropped by A itself
        # once it saw it had been frozen; the job's log tells which.
        told = (
            "stale end of attempt 1 from runner A",
            "runner A stopped attempt 1 and dropped its result",
        )
        deadline = time.monotonic() + 15
        while True:
            lines = (await c.stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager_id))).lines
            said = [x.message for x in lines if x.child_id == victim.id]
            if any(t in message for message in said for t in told):
                break
            assert time.monotonic() < deadline, said
            await asyncio.sleep(0.2)
        await nothing_running_unrun(c.stub, manager_id)


# -- the orchestrator dies -------------------------------------------------------------------
async def test_kill_9_of_the_orchestrator_mid_step_leaves_remote_children_running(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    async with cluster(tmp_path, orchestrators=2, lease="2s") as c:
        manager_id = await submit(c.ostub(0), fanout_job(ledger, 10, 1.5, concurrency=3))
        step_id = await c.step_id(manager_id)
        await c.wait_children(
            step_id, lambda ks: sum(k.status == S.JOB_STATUS_RUNNING for k in ks) >= 3
        )
        c.orchestrators[0].kill()
        manager = await final(c.stub, manager_id, within=WITHIN_S)
        assert manager.status == S.JOB_STATUS_COMPLETED, manager
        assert manager.owner == "orch1"  # adopted
        await assert_tree_consistent(c.stub, manager_id, expected_counts={"work": (0, 0, 10, 0, 0)})
        # Not one child ran twice: the adopter published only what was never published.
        assert set(ledger.starts().values()) == {1}, ledger.lines()
        kids = await c.children(step_id)
        assert {(k.attempt, k.interruptions) for k in kids} == {(1, 0)}
        assert ledger.overlaps() == []


# -- cancel ----------------------------------------------------------------------------------
async def test_cancel_stops_running_remote_children_and_queued_ones_never_start(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    async with cluster(tmp_path) as c:
        manager_id = await submit(c.ostub(), fanout_job(ledger, 12, 60.0, concurrency=6))
        step_id = await c.step_id(manager_id)
        await c.wait_children(
            step_id, lambda ks: sum(k.status == S.JOB_STATUS_RUNNING for k in ks) >= 4
        )
        await asyncio.sleep(0.3)
        started = set(ledger.starts())
        assert len(started) == 4  # two runners of two slots; two more are queued
        pids = [p for item in started for p in ledger.pids(item)]
        await c.ostub().CancelJob(o.CancelJobRequest(job_id=manager_id), timeout=10)
        for pid in pids:
            await _gone(pid, 5.0)
        manager = await final(c.stub, manager_id, within=WITHIN_S)
        assert manager.status == S.JOB_STATUS_CANCELLED
        await asyncio.sleep(2.0)
        assert set(ledger.starts()) == started  # the queued ones never started
        await assert_tree_consistent(c.stub, manager_id, expected_counts={"work": (0, 0, 0, 0, 12)})


# -- workers a runner lacks, or that kill it -------------------------------------------------
PLUGIN = """\
import os, signal
from orchestrator_svc.workers.base import BaseWorker, StepResult
from orchestrator_svc.workers.children import ChildOutcome, run_children

class Grenade(BaseWorker):
    type = "grenade"
    description = "child config.poison kills its runner (kill -9 of its own process)"
    spawns_children = True

    async def run(self, ctx):
        poison = int(ctx.config.get("poison", -1))

        async def run_one(index, attempt):
            if index == poison:
                os.kill(os.getpid(), signal.SIGKILL)
            return ChildOutcome("completed")

        names = [f"c{i}" for i in range(int(ctx.config["children"]))]
        count = await run_children(ctx, names, run_one, concurrency=4)
        return StepResult.spawned(count)
"""


def grenade_job(children: int, poison: int = -1) -> dict[str, Any]:
    return {
        "name": "plugin",
        "steps": [
            {
                "name": "work",
                "type": "grenade",
                "executor": "celery",
                "config": {"children": children, "poison": poison},
            }
        ],
    }


async def test_a_runner_without_the_plugin_fails_its_children_naming_it(tmp_path: Path) -> None:
    plugin = install(
        tmp_path / "plugin", "grenade_plugin", PLUGIN, "grenade = grenade_plugin:Grenade"
    )
    async with cluster(
        tmp_path, runners=("bare",), orchestrator_env={"PYTHONPATH": str(plugin)}
    ) as c:
        manager_id = await submit(c.ostub(), grenade_job(3))
        manager = await final(c.stub, manager_id, within=WITHIN_S)
        assert by_name(manager)["work"].status == S.JOB_STATUS_FAILED
        await assert_tree_consistent(c.stub, manager_id, expected_counts={"work": (0, 0, 0, 3, 0)})
        for kid in await c.children(by_name(manager)["work"].step_id):
            assert "runner bare has no worker type 'grenade'" in kid.error, kid.error
            assert kid.runner == "bare"


async def test_a_poison_message_is_dead_lettered_and_fails_its_child(tmp_path: Path) -> None:
    plugin = install(
        tmp_path / "plugin", "grenade_plugin", PLUGIN, "grenade = grenade_plugin:Grenade"
    )
    env = {"PYTHONPATH": str(plugin)}
    async with cluster(tmp_path, concurrency=1, runner_env=env, orchestrator_env=env) as c:
        stop = asyncio.Event()

        async def supervise() -> None:
            """Start a runner again when it dies (what systemd or compose would do), under a
            new name each time (a new process)."""
            while not stop.is_set():
                for name, runner in c.runners.items():
                    if not runner.alive and not stop.is_set():
                        runner.argv[runner.argv.index("--name") + 1] = f"{name}.{runner.starts + 1}"
                        await runner.run()
                await asyncio.sleep(0.2)

        keeper = asyncio.create_task(supervise())
        try:
            manager_id = await submit(c.ostub(), grenade_job(4, poison=3))
            manager = await final(c.stub, manager_id, within=120)
        finally:
            stop.set()
            await keeper
        work = by_name(manager)["work"]
        assert work.status == S.JOB_STATUS_COMPLETED  # the step ends: three completed
        await assert_tree_consistent(c.stub, manager_id, expected_counts={"work": (0, 0, 3, 1, 0)})
        poison = next(k for k in await c.children(work.step_id) if k.name == "c3")
        assert poison.end_reason == "runner_lost", poison
        assert "dead-lettered" in poison.error
        # It killed the runner holding it three times (each a delivery), then the broker gave
        # up on it and a runner failed it: its third interruption.
        deaths = sum(r.starts for r in c.runners.values()) - sum(
            r.alive for r in c.runners.values()
        )
        assert deaths == 3, deaths
        assert (poison.attempt, poison.interruptions) == (3, 3)
        assert c.broker.depth(f"{c.broker.queue}.dead") == 0


# -- settings that would lose or duplicate work ----------------------------------------------
def _runner_exit(argv: list[str]) -> tuple[int, str]:
    done = subprocess.run(
        [str(ORCHESTRATOR_SVC), "runner", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    return done.returncode, done.stdout + done.stderr


def test_a_runner_refuses_settings_that_would_lose_or_duplicate_work(tmp_path: Path) -> None:
    with own_queue() as found:
        base = ["--monitor", "127.0.0.1:1", "--queue", found.queue]
        code, out = _runner_exit(["--broker-url", "redis://127.0.0.1:6379/0", *base])
        assert code == 2 and "--broker-url: expected an AMQP URL" in out, out
        code, out = _runner_exit(["--broker-url", found.url, "--broker-heartbeat", "0s", *base])
        assert code == 2 and "--broker-heartbeat" in out, out
        code, out = _runner_exit(["--broker-url", found.url, "--concurrency", "0", *base])
        assert code == 2 and "--concurrency" in out, out
        code, out = _runner_exit(["--monitor", "127.0.0.1:1"])
        assert code == 2 and "--broker-url: required" in out, out
        # A classic queue of that name (no delivery limit, no dead letters): refused.
        with Connection(found.url) as connection:
            connection.default_channel.queue_declare(found.queue, durable=True)
        code, out = _runner_exit(["--broker-url", found.url, *base])
        assert code == 2 and "exists on the broker with other settings" in out, out
        closed = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
        code, out = _runner_exit(["--broker-url", closed, *base])
        assert code == 4 and "cannot reach the broker" in out, out


async def test_a_celery_step_needs_a_worker_with_children(tmp_path: Path) -> None:
    async with cluster(tmp_path, runners=()) as c:
        job = {
            "name": "remote",
            "steps": [
                {
                    "name": "one",
                    "type": "command",
                    "executor": "celery",
                    "config": {"command": "true"},
                }
            ],
        }
        with pytest.raises(aio.AioRpcError) as refused:
            await submit(c.ostub(), job)
        assert refused.value.code().name == "INVALID_ARGUMENT"
        assert "steps[0].executor" in str(refused.value.details())


# -- an operator's mistakes, an older plugin ---------------------------------------------------
async def test_without_a_runner_the_log_says_so_and_a_late_runner_runs_the_children(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, runners=()) as c:
        job = {
            "name": "remote",
            "steps": [
                {
                    "name": "work",
                    "type": "simulate",
                    "executor": "celery",
                    "config": {"children": 3},
                }
            ],
        }
        manager_id = await submit(c.ostub(), job)
        deadline = time.monotonic() + WITHIN_S
        while True:
            lines = (await c.stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager_id))).lines
            if any(f"no runner takes from queue {c.broker.queue}" in x.message for x in lines):
                break
            assert time.monotonic() < deadline, [x.message for x in lines]
            await asyncio.sleep(0.1)
        step_id = await c.step_id(manager_id)
        assert {k.status for k in await c.children(step_id)} == {S.JOB_STATUS_PENDING}
        late = runner_process(c.broker, c.monitor.address, tmp_path, "late")
        try:
            await late.run()
            manager = await final(c.stub, manager_id, within=WITHIN_S)
        finally:
            late.stop()
        assert manager.status == S.JOB_STATUS_COMPLETED
        assert {k.runner for k in await c.children(step_id)} == {"late"}


OLD_PLUGIN = """\
from orchestrator_svc.workers.base import BaseWorker, StepResult
from orchestrator_svc.workers.children import ChildOutcome, run_children

class Old(BaseWorker):
    type = "old"
    description = "the worker interface's first shape: run_one(index)"
    spawns_children = True

    async def run(self, ctx):
        async def run_one(index):
            attempt = ctx.child_attempt(index)
            await ctx.log(f"old child {index} attempt {attempt}", child_id=ctx.child_id(index))
            if attempt == 1 and index == 0:
                return ChildOutcome("failed", "first try")
            return ChildOutcome("completed")

        count = await run_children(ctx, ["a", "b"], run_one, concurrency=2)
        return StepResult.spawned(count)
"""


async def test_a_plugin_of_the_first_interface_runs_on_runners_unchanged(tmp_path: Path) -> None:
    plugin = install(tmp_path / "plugin", "old_plugin", OLD_PLUGIN, "old = old_plugin:Old")
    env = {"PYTHONPATH": str(plugin)}
    async with cluster(tmp_path, runner_env=env, orchestrator_env=env) as c:
        job = {
            "name": "old",
            "steps": [
                {
                    "name": "work",
                    "type": "old",
                    "executor": "celery",
                    "retries": 1,
                    "retry_backoff": "0.1s",
                }
            ],
        }
        manager_id = await submit(c.ostub(), job)
        manager = await final(c.stub, manager_id, within=WITHIN_S)
        assert manager.status == S.JOB_STATUS_COMPLETED
        await assert_tree_consistent(c.stub, manager_id, expected_counts={"work": (0, 0, 2, 0, 0)})
        kids = {k.name: k for k in await c.children(by_name(manager)["work"].step_id)}
        assert (kids["a"].attempt, kids["b"].attempt) == (2, 1)
        lines = {
            x.message
            for x in (await c.stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager_id))).lines
        }
        assert {"old child 0 attempt 1", "old child 0 attempt 2", "old child 1 attempt 1"} <= lines
