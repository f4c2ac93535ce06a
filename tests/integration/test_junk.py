"""Generated junk at every MonitorService RPC and at the child-event stream (hypothesis), over
a real channel to a real monitor on SQLite.

Each answer is OK or one of the documented codes, never INTERNAL or UNKNOWN, and a refused
call changes nothing: the version and change_seq of a probe job tree (a manager, its steps, a
child) are as they were. Sizes, unicode (NUL included; lone surrogates cannot be sent, as
protobuf strings must be valid UTF-8), deep nesting, unknown enum values, huge and negative
durations and counts. The monitor runs on its own event loop in a thread so that hypothesis
drives a plain synchronous client. Example counts are modest to keep this under half a minute.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from monitor_svc.lifecycle import StepTimers
from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

pytestmark = pytest.mark.timeout(120)

C = grpc.StatusCode
S = job_pb2
DOCUMENTED = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.ABORTED,
    C.ALREADY_EXISTS,
    C.RESOURCE_EXHAUSTED,
    C.OUT_OF_RANGE,
}
CALL_S = 20.0
# No timer may fire during the run: a refused call must be the only thing that could have
# changed the probe between two reads.
QUIET = StepTimers(default_wait_timeout_s=7200.0, grace_period_s=7200.0)
JUNK = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Probe:
    manager: str
    step0: str
    step1: str
    child: str

    @property
    def ids(self) -> list[str]:
        return [self.manager, self.step0, self.step1, self.child]


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('junk')) / 'junk.db'}"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, RunningMonitor] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        config = MonitorConfig(database_url=url, port=0, timers=QUIET, shutdown_grace_s=1.0)
        box["monitor"] = loop.run_until_complete(create_server(config))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="junk-monitor", daemon=True)
    thread.start()
    assert ready.wait(60), "the monitor did not start"
    yield box["monitor"].address
    asyncio.run_coroutine_threadsafe(box["monitor"].stop(grace=0.5), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    # Closed here, not left to the garbage collector: an unclosed loop (and its self-pipe)
    # would warn in whichever later test happened to collect it.
    loop.close()


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[m_grpc.MonitorServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield m_grpc.MonitorServiceStub(channel)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


@pytest.fixture(scope="module")
def probe(stub: m_grpc.MonitorServiceStub) -> Probe:
    manager = stub.CreateJob(m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="probe")).job
    steps = [
        stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_STEP,
                parent_id=manager.id,
                name=f"s{i}",
                metadata=_struct({"step_index": i}),
            )
        ).job
        for i in range(2)
    ]
    entries = [
        {"step_index": i, "step_id": s.id, "step_name": s.name, "status": "pending"}
        for i, s in enumerate(steps)
    ]
    stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(
            job_id=manager.id,
            metadata=_struct(
                {
                    "step_stats": entries,
                    "current_step_id": steps[0].id,
                    "current_step_status": "pending",
                }
            ),
        )
    )
    child = stub.CreateJob(
        m.CreateJobRequest(kind=S.JOB_KIND_CHILD, parent_id=steps[0].id, name="kid")
    ).job
    return Probe(manager.id, steps[0].id, steps[1].id, child.id)


# -- strategies ----------------------------------------------------------------------------------
BIG = [
    "x" * 70_000,
    "\U0001f600" * 20_000,
    "\x00" * 10,
    "a\x00b",
    "é" * 600,
    "",
    " ",
    "../../etc",
    "no-such-job",
]
texts = st.one_of(st.text(max_size=40), st.sampled_from(BIG))
enums = st.integers(min_value=-3, max_value=12)
int64s = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(min_value=-5, max_value=50)
)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**60), max_value=2**60),
    texts,
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
STATUSES = ["pending", "running", "spawned", "completed", "failed", "cancelled", "skipped"]


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@st.composite
def metadata(draw: st.DrawFn, probe: Probe) -> struct_pb2.Struct:
    doc: dict[str, Any] = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=4))
    extra = draw(
        st.sampled_from(
            ["none", "deep", "huge", "numbers", "step_stats", "completed", "current", "index"]
        )
    )
    if extra == "deep":
        doc["deep"] = deep(draw(st.integers(min_value=28, max_value=45)))
    elif extra == "huge":
        doc["huge"] = "h" * draw(st.sampled_from([500_000, 1_048_000, 1_100_000]))
    elif extra == "numbers":
        doc["numbers"] = [0] * draw(st.sampled_from([10_000, 95_000, 120_000]))
    elif extra == "step_stats":
        entry = {
            "step_id": draw(st.sampled_from([*probe.ids, "", "ghost"])),
            "status": draw(st.one_of(st.sampled_from(STATUSES), json_values)),
            "step_index": draw(st.one_of(int64s, json_values)),
            "child_count": draw(st.one_of(int64s, st.floats())),
            "error": draw(st.one_of(texts, json_values)),
            "step_name": draw(st.one_of(texts, json_values)),
        }
        doc["step_stats"] = draw(st.sampled_from([[entry], entry, [entry, entry], None, "x"]))
    elif extra == "completed":
        doc["completed_steps"] = draw(st.one_of(int64s, json_values))
    elif extra == "current":
        doc["current_step_status"] = draw(st.one_of(st.sampled_from(STATUSES), json_values))
        doc["current_step_id"] = draw(st.sampled_from([*probe.ids, "ghost"]))
    elif extra == "index":
        doc["step_index"] = draw(st.one_of(int64s, st.floats()))
    return _struct(doc)


@st.composite
def durations(draw: st.DrawFn) -> duration_pb2.Duration:
    seconds = draw(
        st.one_of(
            # Past the one-year limit, at it, and beyond what a timestamp can hold.
            st.sampled_from([315_360_000_000, 31_622_401, 2**62, 10**9, 31_622_400, 3600]),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.integers(min_value=-10, max_value=40_000_000),
        )
    )
    nanos = pick(draw, 0, st.integers(min_value=-(2**31), max_value=2**31 - 1))
    # A valid timeout shorter than the test would fire a deadline under the probe while a
    # later call is checked, as if that call had changed it: keep accepted ones long.
    assume(not 0 < seconds + nanos / 1e9 < 7200)
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def pick(draw: st.DrawFn, valid: Any, junk: st.SearchStrategy[Any]) -> Any:
    """Mostly the valid value, a quarter of the time junk: each request is a plausible one with
    a field or two gone wrong, so the junk reaches the rules behind the first check."""
    return draw(junk) if draw(st.integers(min_value=0, max_value=3)) == 0 else valid


UNARY = [
    "CreateJob",
    "GetJob",
    "ListJobs",
    "UpdateJobStatus",
    "UpdateJobMetadata",
    "UpdateStepStatInManager",
]


@st.composite
def unary_calls(draw: st.DrawFn, probe: Probe, rpc: str) -> Any:
    ids = st.one_of(st.sampled_from(probe.ids), texts)
    if rpc == "CreateJob":
        kind = draw(st.sampled_from([S.JOB_KIND_MANAGER, S.JOB_KIND_STEP, S.JOB_KIND_CHILD]))
        parent = {
            S.JOB_KIND_MANAGER: "",
            S.JOB_KIND_STEP: probe.manager,
            S.JOB_KIND_CHILD: draw(st.sampled_from([probe.step0, probe.step1])),
        }[kind]
        request = m.CreateJobRequest(
            request_id=pick(draw, "", texts),
            kind=pick(draw, kind, enums),
            parent_id=pick(draw, parent, ids),
            name=pick(draw, "j", texts),
            type=pick(draw, "t", texts),
            metadata=pick(draw, _struct({}), metadata(probe)),
            owner=pick(draw, "", texts),
        )
        if draw(st.integers(min_value=0, max_value=2)):
            request.timeout.CopyFrom(draw(durations()))
    elif rpc == "GetJob":
        request = m.GetJobRequest(job_id=draw(ids))
    elif rpc == "ListJobs":
        request = m.ListJobsRequest(
            parent_id=pick(draw, "", ids),
            manager_id=pick(draw, "", ids),
            kind=pick(draw, 0, enums),
            status=pick(draw, 0, enums),
            page_size=pick(draw, 0, st.integers(min_value=-(2**31), max_value=2**31 - 1)),
            page_token=pick(draw, "", texts),
            owner=pick(draw, "", texts),
        )
    elif rpc == "UpdateJobStatus":
        request = m.UpdateJobStatusRequest(
            job_id=pick(draw, draw(st.sampled_from(probe.ids)), ids),
            status=pick(draw, draw(st.integers(min_value=1, max_value=7)), enums),
            error=pick(draw, "", texts),
            end_reason=draw(
                st.one_of(
                    st.sampled_from(
                        ["", "api", "timeout", "children_terminal", "orchestrator_lost"]
                    ),
                    texts,
                )
            ),
        )
    elif rpc == "UpdateJobMetadata":
        request = m.UpdateJobMetadataRequest(
            job_id=pick(draw, draw(st.sampled_from(probe.ids)), ids),
            metadata=draw(metadata(probe)),
        )
        if draw(st.booleans()):
            request.expected_version = draw(int64s)
    else:
        request = m.UpdateStepStatInManagerRequest(
            manager_id=pick(draw, probe.manager, ids),
            step_id=pick(draw, draw(st.sampled_from([probe.step0, probe.step1])), ids),
            status=pick(draw, draw(st.integers(min_value=1, max_value=7)), enums),
        )
    return request


@st.composite
def event_batches(draw: st.DrawFn, probe: Probe) -> list[job_pb2.ChildEvent]:
    ids = st.one_of(st.sampled_from(probe.ids), texts)
    events = []
    for i in range(draw(st.integers(min_value=1, max_value=6))):
        event = job_pb2.ChildEvent(
            event_id=pick(draw, f"junk-{i}", texts),
            step_id=pick(draw, draw(st.sampled_from([probe.step0, probe.step1])), ids),
            child_id=pick(draw, draw(st.sampled_from(["", "c1", "c2", "c3"])), ids),
            kind=pick(draw, draw(st.integers(min_value=1, max_value=6)), enums),
            error=pick(draw, "", texts),
            child_count=pick(draw, draw(st.integers(min_value=0, max_value=3)), int64s),
            handed_to_monitor=draw(st.booleans()),
            name=pick(draw, "", texts),
        )
        events.append(event)
    return events


# -- the checks ----------------------------------------------------------------------------------
def probe_state(stub: m_grpc.MonitorServiceStub, probe: Probe) -> list[tuple[int, int]]:
    jobs = [stub.GetJob(m.GetJobRequest(job_id=i), timeout=CALL_S).job for i in probe.ids]
    return [(j.version, j.change_seq) for j in jobs]


def outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    return C.OK, ""


@pytest.mark.parametrize("rpc", UNARY)
@JUNK
@given(data=st.data())
def test_junk_at_every_unary_rpc_gets_a_documented_code_and_a_refusal_changes_nothing(
    stub: m_grpc.MonitorServiceStub, probe: Probe, rpc: str, data: st.DataObject
) -> None:
    request = data.draw(unary_calls(probe, rpc))
    before = probe_state(stub, probe)
    code, details = outcome(lambda: getattr(stub, rpc)(request, timeout=CALL_S))
    assert code in DOCUMENTED, f"{rpc}: {code.name} {details[:300]!r}"
    if code is not C.OK:
        assert details, f"{rpc}: {code.name} without a message"
        assert probe_state(stub, probe) == before, f"{rpc} refused ({code.name}) but changed"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_id=st.one_of(st.sampled_from(["", "x" * 200, "a b", "ghost"]), st.text(max_size=20)))
def test_junk_at_watch_job_gets_a_documented_code(
    stub: m_grpc.MonitorServiceStub, job_id: str
) -> None:
    # Ids that name no job: each watch is refused before it starts.
    code, details = outcome(
        lambda: next(iter(stub.WatchJob(m.WatchJobRequest(job_id=job_id), timeout=CALL_S)))
    )
    assert code in DOCUMENTED - {C.OK}, f"{code.name} {details[:300]!r}"


def test_watch_job_with_junk_cursors_answers_or_refuses_cleanly(
    stub: m_grpc.MonitorServiceStub, probe: Probe
) -> None:
    for after in (-(2**63), -1):
        code, _ = outcome(
            lambda a=after: next(  # type: ignore[misc]
                iter(stub.WatchJob(m.WatchJobRequest(job_id=probe.manager, after_change_seq=a)))
            )
        )
        assert code == C.INVALID_ARGUMENT
    first = next(iter(stub.WatchJob(m.WatchJobRequest(job_id=probe.manager), timeout=CALL_S)))
    assert first.job.id == probe.manager


@JUNK
@given(data=st.data())
def test_junk_on_the_event_stream_is_acknowledged_and_a_rejection_changes_nothing(
    stub: m_grpc.MonitorServiceStub, probe: Probe, data: st.DataObject
) -> None:
    events = data.draw(event_batches(probe))
    batch_id = data.draw(st.integers(min_value=0, max_value=2**64 - 1))
    before = probe_state(stub, probe)
    request = m.StreamChildEventsRequest(batch_id=batch_id, events=events)
    acks: list[m.StreamChildEventsResponse] = []
    code, details = outcome(
        lambda: acks.extend(stub.StreamChildEvents(iter([request]), timeout=CALL_S))
    )
    assert code in DOCUMENTED, f"{code.name} {details[:300]!r}"
    if code is C.OK:
        (ack,) = acks
        assert ack.batch_id == batch_id
        if len(ack.rejected) == len(events):
            assert probe_state(stub, probe) == before, "every event rejected, yet it changed"
    else:
        assert probe_state(stub, probe) == before
