"""End to end with real processes: the monitor killed (-9) and restarted mid-job, a job
cancelled through another orchestrator, and ``orchestrator-svc submit --follow`` against
server processes (orchestrators coming and going: ``test_failover``). Each runs on SQLite (a
file) and on PostgreSQL.

Servers are started with the installed console scripts on free ports and polled through the
gRPC health service; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from grpc import aio

from monitor_svc.server import RunningMonitor
from orchestrator_svc.server import OrchestratorConfig, create_server
from stepflow_common.proto_status import LIVE_PB as LIVE
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.helpers import meta
from tests.jobs import (
    assert_consistent,
    by_name,
    counts_of,
    final,
    list_all,
    sim,
    submit,
    tally_counts,
    watch_until,
)
from tests.process_helpers import (
    ORCHESTRATOR_SVC,
    ServerProcess,
    clean_env,
    orchestrator_process,
)

S = job_pb2


# -- the monitor restarted mid-job ---------------------------------------------------------------
MONITOR_RESTART_JOB: dict[str, Any] = {
    "name": "monitor-restart",
    "timeout": "2m",
    "steps": [
        {
            # Handed off first, so it is mid-way too when the monitor dies.
            "name": "h1",
            "type": "simulate",
            "wait": False,
            "on_error": "continue",
            "config": sim(100, 40, concurrency=4, fail_every=5),
        },
        {
            "name": "w1",
            "type": "simulate",
            "on_error": "continue",
            "config": sim(120, 25, concurrency=6, fail_every=7, cancel_every=11),
        },
        {"name": "w2", "type": "simulate", "config": sim(40, 10, concurrency=8, cancel_every=6)},
        {
            "name": "tail",
            "type": "command",
            "depends_on": ["w1", "w2"],
            "config": {"command": "true"},
        },
    ],
}


async def test_monitor_killed_and_restarted_mid_job_keeps_exact_counts(
    database_url: str, tmp_path: Path, monitor_proc: ServerProcess
) -> None:
    orch = await create_server(
        OrchestratorConfig(
            port=0, monitor=monitor_proc.address, owner="restart-monitor-test", shutdown_grace_s=1.0
        )
    )
    try:
        async with (
            aio.insecure_channel(monitor_proc.address) as mch,
            aio.insecure_channel(orch.address) as och,
        ):
            stub = m_grpc.MonitorServiceStub(mch)
            ostub = o_grpc.OrchestratorServiceStub(och)
            manager_id = await submit(ostub, MONITOR_RESTART_JOB)
            # Mid-way through the first step: some children done, many to go.
            await watch_until(
                stub,
                manager_id,
                lambda j: "w1" in by_name(j) and by_name(j)["w1"].children.completed >= 20,
            )
            seen = await stub.GetJob(m.GetJobRequest(job_id=manager_id))
            assert by_name(seen.job)["h1"].status in LIVE, "the hand-off ended too soon"
            # Freeze it first, so batches are sent but never acknowledged; then kill it.
            monitor_proc.send(signal.SIGSTOP)
            await asyncio.sleep(0.3)
            assert orch.stream.buffered > 0, "no event was in flight when the monitor died"
            monitor_proc.kill()
            await asyncio.sleep(0.3)
            await monitor_proc.run()  # the same port and database
            job = await final(stub, manager_id, within=60)

            assert job.status == S.JOB_STATUS_COMPLETED, (job, monitor_proc.log_tail())
            stats = by_name(job)
            for step in MONITOR_RESTART_JOB["steps"]:
                if step["type"] == "simulate":
                    name = step["name"]
                    assert counts_of(stats[name].children) == tally_counts(step["config"]), name
                    assert stats[name].child_count == step["config"]["children"], name
                    kids = await list_all(stub, parent_id=stats[name].step_id)
                    assert len(kids) == len({k.id for k in kids}) == step["config"]["children"]
            assert [s.status for s in job.step_stats] == [S.JOB_STATUS_COMPLETED] * 4
            md = meta(job)
            assert md["completed_steps"] == md["total_steps"] == 4  # every step ended once
            await assert_consistent(stub, job)
            # The orchestrator's stream reconnected and sent its unacknowledged batches again.
            stats_ = orch.stream.stats
            assert stats_.reconnects >= 1 and stats_.resent_batches >= 1, stats_
            assert stats_.rejected == [], stats_.rejected
            assert orch.stream.buffered == 0
    finally:
        await orch.stop(grace=0.5)


# -- the orchestrator gone ------------------------------------------------------------------------
async def test_cancel_a_job_whose_orchestrator_died(
    monitor: RunningMonitor, stub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    """CancelJob through another orchestrator (another owner, no runner for the job) cancels a
    job whose orchestrator was killed: the monitor's cascade does it all."""
    dead = orchestrator_process(monitor.address, tmp_path, name="dies", owner="dies")
    await dead.run()
    other = orchestrator_process(monitor.address, tmp_path, name="survives", owner="survives")
    await other.run()
    try:
        async with aio.insecure_channel(dead.address) as och:
            manager_id = await submit(
                o_grpc.OrchestratorServiceStub(och),
                {
                    "name": "orphaned",
                    "steps": [
                        {"name": "busy", "type": "simulate", "config": sim(4, 60_000)},
                        {"name": "later", "type": "command", "config": {"command": "true"}},
                    ],
                },
            )
        await watch_until(
            stub,
            manager_id,
            lambda j: "busy" in by_name(j) and by_name(j)["busy"].children.running == 4,
        )
        dead.kill()
        async with aio.insecure_channel(other.address) as och:
            resp = await o_grpc.OrchestratorServiceStub(och).CancelJob(
                o.CancelJobRequest(job_id=manager_id, reason="orphan"), timeout=10
            )
        assert resp.job.status == S.JOB_STATUS_CANCELLED
        job = await final(stub, manager_id, within=5)
        assert (job.status, job.error) == (S.JOB_STATUS_CANCELLED, "orphan")
        # The started step is cancelled, the one that never started skipped.
        assert [s.status for s in job.step_stats] == [S.JOB_STATUS_CANCELLED, S.JOB_STATUS_SKIPPED]
        assert counts_of(by_name(job)["busy"].children) == (0, 0, 0, 0, 4)
        assert [j for j in await list_all(stub, manager_id=manager_id) if j.status in LIVE] == []
        await assert_consistent(stub, job)
    finally:
        dead.stop()
        other.stop()


# -- the CLI -------------------------------------------------------------------------------------
QUICK_JOB = """
name = "cli-follow"
timeout = "1m"

[[steps]]
name = "crawl"
type = "simulate"
on_error = "continue"
config = { children = 12, duration_ms = 20, concurrency = 4, fail_every = 4 }

[[steps]]
name = "handoff"
type = "simulate"
wait = false
config = { children = 6, duration_ms = 10 }

[[steps]]
name = "report"
type = "command"
depends_on = ["crawl"]
config = { command = "echo report" }
"""


async def run_cli(*args: str, within: float = 60.0) -> tuple[int, str, str]:
    env = clean_env() | {"COLUMNS": "160", "TERM": "dumb"}
    proc = await asyncio.create_subprocess_exec(
        str(ORCHESTRATOR_SVC),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def test_submit_follow_prints_the_final_table_and_exits_0(
    monitor_proc: ServerProcess, tmp_path: Path
) -> None:
    orch = orchestrator_process(monitor_proc.address, tmp_path, name="cli", owner="cli-test")
    await orch.run()
    try:
        job_file = tmp_path / "quick.toml"
        job_file.write_text(QUICK_JOB)
        code, out, err = await run_cli(
            "submit",
            str(job_file),
            "--follow",
            "--orchestrator",
            orch.address,
            "--monitor",
            monitor_proc.address,
        )
        assert code == 0, (out, err, orch.log_tail())
        # The final table: the job, its status and one row per step.
        assert "cli-follow" in out and "completed" in out, out
        for name in ("crawl", "handoff", "report"):
            assert name in out, (name, out)
        table = out[out.rindex("cli-follow") :]
        crawl_row = next(line for line in table.splitlines() if "crawl" in line)
        assert "12" in crawl_row and "9" in crawl_row and "3" in crawl_row, crawl_row

        # A job that fails: the table still prints, and the exit status says so.
        bad_file = tmp_path / "bad.json"
        bad_file.write_text(
            '{"name": "cli-fails", "steps": [{"name": "boom", "type": "command",'
            ' "config": {"command": "exit 4"}}]}'
        )
        code, out, err = await run_cli(
            "submit",
            str(bad_file),
            "--follow",
            "--orchestrator",
            orch.address,
            "--monitor",
            monitor_proc.address,
        )
        assert code == 3, (code, out, err)
        assert "boom" in out and "failed" in out

        # Without --follow it prints the manager id; an invalid job fails naming the field.
        code, out, err = await run_cli("submit", str(job_file), "--orchestrator", orch.address)
        assert code == 0 and len(out.strip()) == 32, (out, err)
        invalid = tmp_path / "invalid.toml"
        invalid.write_text('name = "x"\n[[steps]]\nname = "a"\ntype = "nope"\n')
        code, out, err = await run_cli("submit", str(invalid), "--orchestrator", orch.address)
        assert code != 0 and "steps[0].type" in err, (code, out, err)
    finally:
        orch.stop()
