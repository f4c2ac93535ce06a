"""Reading and waiting on jobs through the monitor's API, shared by every test that needs it:
one call (``get``, ``list_all``), a wait on WatchJob (``watch_until``, ``final``, ``Recorder``),
submitting through the orchestrator (``submit``), and the checks of a finished job's record
(``assert_consistent``, ``Recorder.assert_never_backwards``). Every wait is bounded."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping
from typing import Any

from orchestrator_svc.workers.simulate import expected_tally
from stepflow_common.proto_status import STATUS_TO_PB
from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.helpers import meta
from tests.orchestrator_fixtures import definition

S = job_pb2
Stub = m_grpc.MonitorServiceStub
OStub = o_grpc.OrchestratorServiceStub
WAIT_S = 20.0  # the longest any single wait may take
CALL_S = 15.0  # one call's deadline
STATUS_BY_NAME = {status.value: pb for status, pb in STATUS_TO_PB.items()}


async def get(stub: Stub, job_id: str, include_definition: bool = False) -> job_pb2.Job:
    request = m.GetJobRequest(job_id=job_id, include_definition=include_definition)
    return (await stub.GetJob(request, timeout=CALL_S)).job


async def list_all(stub: Stub, **filters: Any) -> list[job_pb2.Job]:
    """Every job matching ``filters``, all pages."""
    jobs: list[job_pb2.Job] = []
    token = ""
    while True:
        resp = await stub.ListJobs(
            m.ListJobsRequest(page_size=1000, page_token=token, **filters), timeout=CALL_S
        )
        jobs.extend(resp.jobs)
        token = resp.next_page_token
        if not token:
            return jobs


def rank(status: int) -> int:
    """design §2's order: pending < running < spawned < any terminal."""
    return min(status, S.JOB_STATUS_COMPLETED)


def counts_of(c: job_pb2.ChildCounts) -> tuple[int, int, int, int, int]:
    return (c.pending, c.running, c.completed, c.failed, c.cancelled)


def tally_counts(config: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    t = expected_tally(config)
    return (0, 0, t.completed, t.failed, t.cancelled)


def by_name(job: job_pb2.Job) -> dict[str, job_pb2.StepStat]:
    return {s.step_name: s for s in job.step_stats}


async def submit(ostub: OStub, data: dict[str, Any], request_id: str = "") -> str:
    resp = await ostub.SubmitJob(
        o.SubmitJobRequest(definition=definition(data), request_id=request_id), timeout=WAIT_S
    )
    return resp.manager_id


async def watch_until(
    stub: Stub, job_id: str, predicate: Callable[[job_pb2.Job], bool], within: float = WAIT_S
) -> job_pb2.Job:
    """The first state of ``job_id`` (from WatchJob) that satisfies ``predicate``."""

    async def go() -> job_pb2.Job:
        call = stub.WatchJob(m.WatchJobRequest(job_id=job_id))
        try:
            async for msg in call:
                if predicate(msg.job):
                    return msg.job
        finally:
            call.cancel()
        raise AssertionError(f"job {job_id} ended before the condition held")

    return await asyncio.wait_for(go(), within)


async def final(stub: Stub, job_id: str, within: float = WAIT_S) -> job_pb2.Job:
    return await watch_until(stub, job_id, lambda j: j.status in TERMINAL, within)


class Recorder:
    """Every state WatchJob sends for one job, from now until it is terminal."""

    def __init__(self, stub: Stub, job_id: str) -> None:
        self.job_id = job_id
        self.states: list[job_pb2.Job] = []
        self._stub = stub
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self._stub.WatchJob(m.WatchJobRequest(job_id=self.job_id)):
            self.states.append(msg.job)

    async def done(self, within: float = WAIT_S) -> job_pb2.Job:
        await asyncio.wait_for(self._task, within)
        assert self.states, "the watch sent nothing"
        return self.states[-1]

    def assert_never_backwards(self) -> None:
        """No step_stats entry, child count or current_step_status ever moves backwards, and
        change_seq only rises."""
        seqs = [s.change_seq for s in self.states]
        assert seqs == sorted(set(seqs)), seqs
        last: dict[str, job_pb2.StepStat] = {}
        last_current: tuple[str, int] | None = None
        for state in self.states:
            for stat in state.step_stats:
                before = last.get(stat.step_id)
                if before is not None:
                    where = f"{stat.step_name} at change_seq {state.change_seq}"
                    assert rank(stat.status) >= rank(before.status), where
                    if before.status in TERMINAL:
                        assert stat.status == before.status, where
                    old, new = counts_of(before.children), counts_of(stat.children)
                    assert all(n >= o for o, n in zip(old[2:], new[2:], strict=True)), where
                last[stat.step_id] = stat
            md = meta(state)
            current = (
                md.get("current_step_id", ""),
                STATUS_BY_NAME.get(md.get("current_step_status", ""), 0),
            )
            if last_current is not None and current[0] == last_current[0]:
                assert rank(current[1]) >= rank(last_current[1]), state.change_seq
                if last_current[1] in TERMINAL:
                    assert current[1] == last_current[1], state.change_seq
            last_current = current

    def statuses_seen(self, step_name: str) -> set[int]:
        return {
            s.status for state in self.states for s in state.step_stats if s.step_name == step_name
        }


async def assert_consistent(stub: Stub, manager: job_pb2.Job) -> None:
    """Every step_stats entry equals its step's row, and its counts equal the child rows; the
    counters agree; nothing is left live."""
    assert manager.status in TERMINAL, manager
    md = meta(manager)
    steps = await list_all(stub, parent_id=manager.id)
    assert {s.id for s in steps} == {s.step_id for s in manager.step_stats}, "a step has no entry"
    assert md["total_steps"] == len(steps)
    assert md["completed_steps"] == sum(1 for s in steps if s.status in TERMINAL) == len(steps)
    assert md["step_job_ids"] == {s.name: s.id for s in steps}
    for stat in manager.step_stats:
        row = await get(stub, stat.step_id)
        assert (stat.status, stat.error) == (row.status, row.error), stat.step_name
        assert stat.step_name == row.name and stat.step_type == row.type
        kids = await list_all(stub, parent_id=stat.step_id)
        by_status = collections.Counter(k.status for k in kids)
        from_rows = (
            by_status[S.JOB_STATUS_PENDING],
            by_status[S.JOB_STATUS_RUNNING],
            by_status[S.JOB_STATUS_COMPLETED],
            by_status[S.JOB_STATUS_FAILED],
            by_status[S.JOB_STATUS_CANCELLED],
        )
        assert counts_of(stat.children) == from_rows, stat.step_name
        assert from_rows[:2] == (0, 0), f"{stat.step_name} has live children"
        if kids:
            assert stat.child_count == len(kids), stat.step_name
    entry_by_id = {e["step_id"]: e for e in md["step_stats"]}
    for stat in manager.step_stats:
        assert STATUS_BY_NAME[entry_by_id[stat.step_id]["status"]] == stat.status
    if md.get("current_step_id"):
        current = next(s for s in manager.step_stats if s.step_id == md["current_step_id"])
        assert STATUS_BY_NAME[md["current_step_status"]] == current.status


def sim(children: int, duration_ms: int = 0, **more: Any) -> dict[str, Any]:
    return {"children": children, "duration_ms": duration_ms, **more}


async def whole_log(monitor: Any, job_id: str) -> list[job_pb2.JobLogLine]:
    """Every line of a job's log, page by page, through the client's ``read_log``
    (``monitor``: a ``stepflow_client.aio.MonitorClient``)."""
    lines: list[job_pb2.JobLogLine] = []
    after = 0
    while True:
        page = await monitor.read_log(job_id, after_seq=after)
        lines.extend(page.lines)
        if page.next_seq == after:
            return lines
        after = page.next_seq
