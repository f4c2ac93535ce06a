"""The worker interface is a contract: plugins of every supported shape, installed as real
distributions with a ``stepflow.workers`` entry point, run end to end through a real
orchestrator with exact counts; a plugin that fits no shape stops the orchestrator at start
with one line naming it and what to change."""

from __future__ import annotations

import subprocess
from pathlib import Path

from grpc import aio

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.jobs import by_name, final, list_all
from tests.process_helpers import (
    ORCHESTRATOR_SVC,
    ServerProcess,
    assert_tree_consistent,
    clean_env,
    free_port,
    install,
    orchestrator,
    submit_to,
)

S = job_pb2

# Written against the interface as first documented (before retries): run_one(index).
V1_PLUGIN = """\
import asyncio
from orchestrator_svc.workers.base import BaseWorker, StepResult
from orchestrator_svc.workers.children import ChildOutcome, run_children


class OldShape(BaseWorker):
    type = "old_shape"
    description = "run_one(index), the first shape"
    spawns_children = True

    async def run(self, ctx):
        async def run_one(index):
            await asyncio.sleep(0.01)
            if index % 4 == 3 and ctx.child_attempt(index) == 1:
                return ChildOutcome("failed", "fails its first attempt")
            return ChildOutcome("completed")

        created = await run_children(ctx, [f"c{i}" for i in range(12)], run_one, concurrency=3)
        return StepResult.spawned(created, cancelled=ctx.cancelled.is_set())
"""

V2_PLUGIN = """\
from orchestrator_svc.workers.base import BaseWorker, StepResult
from orchestrator_svc.workers.children import ChildOutcome, run_children


class NewShape(BaseWorker):
    type = "new_shape"
    description = "run_one(index, attempt)"
    spawns_children = True
    interface_version = 2

    async def run(self, ctx):
        async def run_one(index, attempt):
            return ChildOutcome("failed" if index == 0 else "completed", "always fails")

        created = await run_children(ctx, [f"c{i}" for i in range(5)], run_one, concurrency=2)
        return StepResult.spawned(created, cancelled=ctx.cancelled.is_set())
"""

BROKEN_PLUGIN = """\
from orchestrator_svc.workers.base import BaseWorker, StepResult


class Broken(BaseWorker):
    type = "broken"
    description = "run() takes no context"

    async def run(self):
        return StepResult.success()
"""


async def test_plugins_of_each_supported_shape_run_with_exact_counts(
    monitor_proc: ServerProcess, tmp_path: Path
) -> None:
    root = tmp_path / "site"
    install(root, "old_shape_plugin", V1_PLUGIN, "old_shape = old_shape_plugin:OldShape")
    install(root, "new_shape_plugin", V2_PLUGIN, "new_shape = new_shape_plugin:NewShape")
    orch = orchestrator(monitor_proc, tmp_path, "plugins")
    orch.extra_env = {"PYTHONPATH": str(root)}
    job_def = {
        "name": "shapes",
        "steps": [
            {"name": "old", "type": "old_shape", "retries": 1, "retry_backoff": "10ms"},
            {"name": "new", "type": "new_shape", "on_error": "continue"},
        ],
    }
    try:
        await orch.run()
        manager_id = await submit_to(orch, job_def)
        async with aio.insecure_channel(monitor_proc.address) as channel:
            stub = m_grpc.MonitorServiceStub(channel)
            job = await final(stub, manager_id, within=60)
            assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
            await assert_tree_consistent(
                stub,
                manager_id,
                expected_counts={"old": (0, 0, 12, 0, 0), "new": (0, 0, 4, 1, 0)},
            )
            old = await list_all(stub, parent_id=by_name(job)["old"].step_id)
            # The children failing their first attempt ran a second one, read from the context.
            assert sorted(k.attempt for k in old) == [1] * 9 + [2] * 3
    finally:
        orch.stop()


def test_a_plugin_of_no_supported_shape_is_refused_at_start(tmp_path: Path) -> None:
    root = install(
        tmp_path / "site", "broken_plugin", BROKEN_PLUGIN, "broken = broken_plugin:Broken"
    )
    argv = [str(ORCHESTRATOR_SVC), "serve", "--port", str(free_port()), "--monitor", "127.0.0.1:1"]
    env = {**clean_env(), "PYTHONPATH": str(root)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "broken" in line]
    assert lines, done.stderr
    assert "entry point 'broken'" in lines[0] and "async def run(self, ctx)" in lines[0]
