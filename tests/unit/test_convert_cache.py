"""The response converter reuses converted metadata only while the value is the same object."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import json_format

from monitor_svc.records import JobState, JobView
from monitor_svc.wire.answers import job_answer, job_pb
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally
from stepflow_proto.v1 import monitor_service_pb2 as m


def manager(metadata: dict[str, object], version: int = 1) -> JobState:
    return JobState(
        id="m-cache",
        kind=Kind.MANAGER,
        parent_id=None,
        manager_id="m-cache",
        name="m",
        type="",
        status=Status.RUNNING,
        error="",
        end_reason="",
        metadata=metadata,
        version=version,
        change_seq=version,
        step_index=None,
        timeout_s=None,
        deadline=None,
        created_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
        request_id=None,
        owner="",
    )


def entries(status: str) -> list[dict[str, object]]:
    return [{"step_id": "s1", "step_index": 0, "status": status}]


def test_a_shared_value_is_reused_and_a_new_one_converted_afresh() -> None:
    stats = entries("running")
    first = job_pb(JobView(manager({"step_stats": stats, "a": 1}), {"s1": ChildTally(1, 2)}))
    # Same list object, another key changed: the converted list is reused, the key is new.
    second = job_pb(JobView(manager({"step_stats": stats, "a": 2}, 2), {"s1": ChildTally(1, 2)}))
    assert json_format.MessageToDict(second.metadata) == {"step_stats": stats, "a": 2.0}
    assert second.step_stats == first.step_stats
    # Equal content in a new object, and new counts: both converted afresh.
    third = job_pb(
        JobView(manager({"step_stats": entries("completed")}, 3), {"s1": ChildTally(0, 0, 3)})
    )
    assert third.step_stats[0].status == 4  # JOB_STATUS_COMPLETED
    assert third.step_stats[0].children.completed == 3
    assert "a" not in third.metadata.fields
    # Same list, other live counts: the typed view follows the counts.
    fourth = job_pb(JobView(manager({"step_stats": stats}, 4), {"s1": ChildTally(0, 1, 2)}))
    assert fourth.step_stats[0].children.completed == 2
    assert fourth.step_stats[0].status == 2  # JOB_STATUS_RUNNING


def test_a_serialized_answer_parses_as_the_job_with_its_metadata_and_step_stats() -> None:
    stats = [
        {"step_id": "s1", "step_index": 0, "status": "completed", "step_name": "a"},
        {"step_id": "s2", "step_index": 1, "status": "running"},
    ]
    view = JobView(manager({"step_stats": stats, "note": "é", "n": 3}, 7), {"s2": ChildTally(1, 2)})
    answer = m.UpdateJobMetadataResponse.FromString(job_answer(view))
    assert answer.job.id == "m-cache" and answer.job.version == 7
    assert json_format.MessageToDict(answer.job.metadata) == {
        "step_stats": stats,
        "note": "é",
        "n": 3.0,
    }
    assert [s.step_id for s in answer.job.step_stats] == ["s1", "s2"]
    assert answer.job.step_stats[1].children.running == 2
    assert not answer.job.step_stats[0].HasField("children")
    # Another write of one entry: the other entry's bytes are reused, the answer follows.
    moved = [stats[0], {**stats[1], "status": "completed"}]
    again = m.GetJobResponse.FromString(
        job_answer(JobView(manager({"step_stats": moved, "n": 3}, 8), {"s2": ChildTally(0, 0, 3)}))
    )
    assert [s.status for s in again.job.step_stats] == [4, 4]  # JOB_STATUS_COMPLETED
    assert again.job.step_stats[1].children.completed == 3
    assert set(again.job.metadata.fields) == {"step_stats", "n"}


def test_a_job_without_metadata_has_no_metadata_field() -> None:
    job = job_pb(JobView(manager({})))
    assert not job.HasField("metadata")
    assert not job.step_stats
