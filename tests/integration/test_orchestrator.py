"""End to end through a real monitor and orchestrator."""

from __future__ import annotations

from stepflow_proto.v1 import job_pb2
from tests.helpers import meta
from tests.jobs import get
from tests.orchestrator_fixtures import run_to_end

S = job_pb2


async def test_multi_step_job_with_failures_and_a_skip(stub, ostub) -> None:
    job = await run_to_end(
        stub,
        ostub,
        {
            "name": "e2e",
            "steps": [
                {
                    "name": "crawl",
                    "type": "simulate",
                    "on_error": "continue",
                    "config": {
                        "children": 40,
                        "duration_ms": 0,
                        "fail_every": 0,
                        "cancel_every": 0,
                    },
                },
                {
                    "name": "flaky",
                    "type": "simulate",
                    "on_error": "continue",
                    "config": {"children": 10, "duration_ms": 0, "fail_every": 1},
                },
                {
                    "name": "after-flaky",
                    "type": "command",
                    "depends_on": ["flaky"],
                    "config": {"command": "true"},
                },
                {
                    "name": "handed",
                    "type": "simulate",
                    "wait": False,
                    "config": {"children": 20, "duration_ms": 1, "fail_every": 5},
                },
                {"name": "last", "type": "command", "config": {"command": "echo done"}},
            ],
        },
    )
    assert job.status == S.JOB_STATUS_COMPLETED, job
    md = meta(job)
    assert md["total_steps"] == 5 and md["completed_steps"] == 5
    by_name = {s.step_name: s for s in job.step_stats}
    assert by_name["crawl"].status == S.JOB_STATUS_COMPLETED
    assert by_name["crawl"].children.completed == 40
    assert by_name["flaky"].status == S.JOB_STATUS_FAILED
    assert by_name["flaky"].children.failed == 10
    assert by_name["after-flaky"].status == S.JOB_STATUS_SKIPPED
    assert by_name["handed"].status == S.JOB_STATUS_COMPLETED
    assert (by_name["handed"].children.completed, by_name["handed"].children.failed) == (16, 4)
    assert by_name["last"].status == S.JOB_STATUS_COMPLETED
    # Every step_stats entry equals its step's own row.
    for stat in job.step_stats:
        row = await get(stub, stat.step_id)
        assert row.status == stat.status, stat.step_name


async def test_on_error_fail_skips_the_rest(stub, ostub) -> None:
    job = await run_to_end(
        stub,
        ostub,
        {
            "name": "fail",
            "steps": [
                {"name": "bad", "type": "command", "config": {"command": "exit 3"}},
                {"name": "never", "type": "command", "config": {"command": "true"}},
            ],
        },
    )
    assert job.status == S.JOB_STATUS_FAILED
    assert [s.status for s in job.step_stats] == [S.JOB_STATUS_FAILED, S.JOB_STATUS_SKIPPED]
