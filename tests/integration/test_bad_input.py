"""Bad input: malformed, oversized and deeply nested requests, unknown enum values,
empty and over-long ids, non-object metadata values. Each gets a clear status code and a
message a person can act on, and the stored state is unchanged: every job in the database,
read back through the API, is byte-for-byte what it was before the call.

SQLite and PostgreSQL (the ``database_url`` fixture). The pure rules behind these checks are
property-tested in ``tests/unit/test_properties.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from grpc import aio

from monitor_svc.convert import MAX_EVENTS_PER_BATCH
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import manager_with_steps, struct

pytestmark = pytest.mark.timeout(60)

S = job_pb2
C = grpc.StatusCode
Stub = m_grpc.MonitorServiceStub
CALL_S = 30.0
LONG_ID = "x" * 129  # ids are 1-128 characters
HUGE_ID = "y" * 100_000


@dataclass(frozen=True)
class Tree:
    """A manager with two steps (step_stats written; the second running), one child of the
    first, and a finished manager."""

    manager: str
    step0: str
    step1: str
    child: str
    done: str


async def make_tree(stub: Stub) -> Tree:
    manager, steps = await manager_with_steps(stub, 2)
    await stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(job_id=manager.id, metadata=struct({"keep": "me"})),
        timeout=CALL_S,
    )
    child = await stub.CreateJob(
        m.CreateJobRequest(kind=S.JOB_KIND_CHILD, parent_id=steps[0].id, name="kid"),
        timeout=CALL_S,
    )
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=steps[1].id, status=S.JOB_STATUS_RUNNING), timeout=CALL_S
    )
    done, _ = await manager_with_steps(stub, 1)
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=done.id, status=S.JOB_STATUS_COMPLETED), timeout=CALL_S
    )
    return Tree(manager.id, steps[0].id, steps[1].id, child.job.id, done.id)


async def everything(stub: Stub) -> list[bytes]:
    """Every stored job as the API shows it (rows, metadata, typed step_stats, counts)."""
    jobs: list[job_pb2.Job] = []
    token = ""
    while True:
        resp = await stub.ListJobs(
            m.ListJobsRequest(page_size=1000, page_token=token), timeout=CALL_S
        )
        jobs.extend(resp.jobs)
        token = resp.next_page_token
        if not token:
            break
    full = [(await stub.GetJob(m.GetJobRequest(job_id=j.id), timeout=CALL_S)).job for j in jobs]
    return sorted(j.SerializeToString(deterministic=True) for j in [*jobs, *full])


def nested_lists(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def struct_with(key: str, value: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s[key] = value
    return s


# -- the cases: (request against the tree, expected code, words the message must contain) --------
Call = Callable[[Stub, Tree], Awaitable[object]]


@dataclass(frozen=True)
class Case:
    call: Call
    code: grpc.StatusCode
    says: tuple[str, ...]


def get_job(job_id: str) -> Call:
    return lambda stub, t: stub.GetJob(m.GetJobRequest(job_id=job_id), timeout=CALL_S)


def set_status(which: str, status: int, error: str = "") -> Call:
    return lambda stub, t: stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=getattr(t, which), status=status, error=error),  # type: ignore[arg-type]
        timeout=CALL_S,
    )


def patch(
    metadata: dict[str, Any] | Callable[[Tree], dict[str, Any]], which: str = "manager"
) -> Call:
    def call(stub: Stub, t: Tree) -> Awaitable[object]:
        value = metadata(t) if callable(metadata) else metadata
        return stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id=getattr(t, which), metadata=struct(value)),
            timeout=CALL_S,
        )

    return call


def patch_struct(value: struct_pb2.Struct) -> Call:
    return lambda stub, t: stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(job_id=t.manager, metadata=value), timeout=CALL_S
    )


def create(**fields: Any) -> Call:
    def call(stub: Stub, t: Tree) -> Awaitable[object]:
        values = {k: (getattr(t, v[1:]) if isinstance(v, str) and v.startswith("@") else v)
                  for k, v in fields.items()}  # fmt: skip
        return stub.CreateJob(m.CreateJobRequest(**values), timeout=CALL_S)

    return call


def step_stat(manager: str, step: str, status: int) -> Call:
    def call(stub: Stub, t: Tree) -> Awaitable[object]:
        resolve = {"@manager": t.manager, "@step0": t.step0, "@child": t.child}
        return stub.UpdateStepStatInManager(
            m.UpdateStepStatInManagerRequest(
                manager_id=resolve.get(manager, manager),
                step_id=resolve.get(step, step),
                status=status,  # type: ignore[arg-type]
            ),
            timeout=CALL_S,
        )

    return call


def list_jobs(**fields: Any) -> Call:
    return lambda stub, t: stub.ListJobs(m.ListJobsRequest(**fields), timeout=CALL_S)


def watch(job_id: str | None, after: int = 0) -> Call:
    async def call(stub: Stub, t: Tree) -> None:
        request = m.WatchJobRequest(job_id=t.manager if job_id is None else job_id,
                                    after_change_seq=after)  # fmt: skip
        async for _ in stub.WatchJob(request, timeout=CALL_S):
            raise AssertionError("the watch was not refused")

    return call


def negative_timeout() -> Call:
    return lambda stub, t: stub.CreateJob(
        m.CreateJobRequest(
            kind=S.JOB_KIND_STEP,
            parent_id=t.manager,
            name="neg",
            timeout=duration_pb2.Duration(seconds=-5),
        ),
        timeout=CALL_S,
    )


def entry(t: Tree, **fields: Any) -> dict[str, Any]:
    return {"step_stats": [{"step_id": t.step0, **fields}]}


INVALID_ID = ("not a valid id",)
GROUPS: dict[str, dict[str, Case]] = {
    # ids: empty, over-long, huge, and characters an id may not hold
    "ids": {
        "get-empty-id": Case(get_job(""), C.INVALID_ARGUMENT, ("job_id", "required")),
        "get-129-char-id": Case(get_job(LONG_ID), C.INVALID_ARGUMENT, INVALID_ID),
        "get-100k-char-id": Case(get_job(HUGE_ID), C.INVALID_ARGUMENT, INVALID_ID),
        "get-id-with-space": Case(get_job("a b"), C.INVALID_ARGUMENT, INVALID_ID),
        "get-id-with-newline": Case(get_job("a\nb"), C.INVALID_ARGUMENT, INVALID_ID),
        "get-id-non-ascii": Case(get_job("jöb"), C.INVALID_ARGUMENT, INVALID_ID),
        "get-id-leading-dot": Case(get_job("../etc/passwd"), C.INVALID_ARGUMENT, INVALID_ID),
        "get-unknown-id": Case(get_job("no-such-job"), C.NOT_FOUND, ("no-such-job", "not found")),
        "status-empty-id": Case(
            lambda stub, t: stub.UpdateJobStatus(
                m.UpdateJobStatusRequest(job_id="", status=S.JOB_STATUS_RUNNING), timeout=CALL_S
            ),
            C.INVALID_ARGUMENT,
            ("job_id", "required"),
        ),
        "create-long-parent-id": Case(
            create(kind=S.JOB_KIND_STEP, parent_id=LONG_ID, name="s"),
            C.INVALID_ARGUMENT,
            ("parent_id",),
        ),
        "create-long-request-id": Case(
            create(kind=S.JOB_KIND_MANAGER, request_id=LONG_ID, name="m"),
            C.INVALID_ARGUMENT,
            ("request_id",),
        ),
        "step-stat-empty-manager-id": Case(
            step_stat("", "@step0", S.JOB_STATUS_RUNNING), C.INVALID_ARGUMENT, ("manager_id",)
        ),
        "step-stat-long-step-id": Case(
            step_stat("@manager", LONG_ID, S.JOB_STATUS_RUNNING), C.INVALID_ARGUMENT, ("step_id",)
        ),
        "watch-empty-id": Case(watch(""), C.INVALID_ARGUMENT, ("job_id",)),
        "watch-long-id": Case(watch(LONG_ID), C.INVALID_ARGUMENT, INVALID_ID),
        "list-bad-parent-id": Case(list_jobs(parent_id="a b"), C.INVALID_ARGUMENT, ("parent_id",)),
    },
    # unknown and unspecified enum values
    "enums": {
        "status-unknown-enum": Case(set_status("step0", 99), C.INVALID_ARGUMENT, ("status", "99")),
        "status-unspecified": Case(
            set_status("step0", S.JOB_STATUS_UNSPECIFIED), C.INVALID_ARGUMENT, ("status",)
        ),
        "status-negative-enum": Case(set_status("step0", -1), C.INVALID_ARGUMENT, ("status",)),
        "status-spawned-on-a-manager": Case(
            set_status("manager", S.JOB_STATUS_SPAWNED), C.INVALID_ARGUMENT, ("spawned", "steps")
        ),
        "status-skipped-on-a-child": Case(
            set_status("child", S.JOB_STATUS_SKIPPED), C.INVALID_ARGUMENT, ("skipped", "steps")
        ),
        "status-of-a-finished-job": Case(
            set_status("done", S.JOB_STATUS_FAILED), C.FAILED_PRECONDITION, ("completed", "final")
        ),
        "status-backwards": Case(
            set_status("step1", S.JOB_STATUS_PENDING), C.FAILED_PRECONDITION, ("running", "back")
        ),
        "status-same-is-a-no-op": Case(set_status("child", S.JOB_STATUS_PENDING, "x"), C.OK, ()),
        "create-unknown-kind": Case(create(kind=42, name="k"), C.INVALID_ARGUMENT, ("kind",)),
        "create-unspecified-kind": Case(create(name="k"), C.INVALID_ARGUMENT, ("kind",)),
        "step-stat-unknown-enum": Case(
            step_stat("@manager", "@step0", 77), C.INVALID_ARGUMENT, ("status", "77")
        ),
        "list-unknown-status": Case(list_jobs(status=99), C.INVALID_ARGUMENT, ("status",)),
        "list-unknown-kind": Case(list_jobs(kind=42), C.INVALID_ARGUMENT, ("kind",)),
    },
    # over-long text
    "text": {
        "status-monitor-end-reason": Case(
            lambda stub, t: stub.UpdateJobStatus(
                m.UpdateJobStatusRequest(
                    job_id=t.step0, status=S.JOB_STATUS_FAILED, end_reason="children_terminal"
                ),
                timeout=CALL_S,
            ),
            C.INVALID_ARGUMENT,
            ("end_reason", "children_terminal"),
        ),
        "create-long-name": Case(
            create(kind=S.JOB_KIND_MANAGER, name="n" * 513), C.INVALID_ARGUMENT, ("name", "512")
        ),
        "create-long-type": Case(
            create(kind=S.JOB_KIND_STEP, parent_id="@manager", name="s", type="t" * 129),
            C.INVALID_ARGUMENT,
            ("type",),
        ),
    },
    # other impossible values
    "values": {
        "create-negative-timeout": Case(negative_timeout(), C.INVALID_ARGUMENT, ("timeout",)),
        "create-step-timeout-over-a-year": Case(
            create(
                kind=S.JOB_KIND_STEP,
                parent_id="@manager",
                name="forever",
                timeout=duration_pb2.Duration(seconds=10_000 * 365 * 86400),
            ),
            C.INVALID_ARGUMENT,
            ("timeout", "366 days"),
        ),
        "create-manager-with-parent": Case(
            create(kind=S.JOB_KIND_MANAGER, parent_id="@manager", name="m"),
            C.INVALID_ARGUMENT,
            ("parent",),
        ),
        "create-child-under-manager": Case(
            create(kind=S.JOB_KIND_CHILD, parent_id="@manager", name="c"),
            C.FAILED_PRECONDITION,
            ("parent",),
        ),
        "create-under-finished-job": Case(
            create(kind=S.JOB_KIND_STEP, parent_id="@done", name="late"),
            C.FAILED_PRECONDITION,
            ("completed",),
        ),
        "list-negative-page-size": Case(
            list_jobs(page_size=-1), C.INVALID_ARGUMENT, ("page_size",)
        ),
        "list-huge-page-size": Case(list_jobs(page_size=10**6), C.INVALID_ARGUMENT, ("page_size",)),
        "list-forged-page-token": Case(
            list_jobs(page_token="not-a-token"), C.INVALID_ARGUMENT, ("page_token",)
        ),
        "watch-negative-seq": Case(watch(None, -1), C.INVALID_ARGUMENT, ("after_change_seq",)),
        "metadata-stale-version": Case(
            lambda stub, t: stub.UpdateJobMetadata(
                m.UpdateJobMetadataRequest(
                    job_id=t.manager, metadata=struct({"x": 1}), expected_version=1
                ),
                timeout=CALL_S,
            ),
            C.ABORTED,
            ("version", "re-read"),
        ),
    },
    # oversized and deeply nested metadata
    "metadata-size": {
        "metadata-over-1mb": Case(
            patch({"big": "b" * (1024 * 1024 + 10)}), C.RESOURCE_EXHAUSTED, ("bytes", "limit")
        ),
        "create-metadata-over-1mb": Case(
            lambda stub, t: stub.CreateJob(
                m.CreateJobRequest(
                    kind=S.JOB_KIND_MANAGER, name="big", metadata=struct({"b": "b" * 1_100_000})
                ),
                timeout=CALL_S,
            ),
            C.RESOURCE_EXHAUSTED,
            ("bytes", "limit"),
        ),
        "message-over-16mb": Case(
            patch({"huge": "h" * (17 * 1024 * 1024)}), C.RESOURCE_EXHAUSTED, ("larger than",)
        ),
        "metadata-nested-40-deep": Case(
            patch({"deep": nested_lists(40)}), C.INVALID_ARGUMENT, ("nested", "32")
        ),
    },
    # non-object (and otherwise mistyped) values where the monitor reads the metadata
    "metadata-types": {
        "step-stats-a-string": Case(
            patch({"step_stats": "gone"}), C.INVALID_ARGUMENT, ("step_stats", "list")
        ),
        "step-stats-an-object": Case(
            patch({"step_stats": {"a": 1}}), C.INVALID_ARGUMENT, ("step_stats", "list")
        ),
        "step-stats-entry-a-number": Case(
            patch({"step_stats": [7]}), C.INVALID_ARGUMENT, ("entry", "object")
        ),
        "step-stats-entry-a-list": Case(
            patch({"step_stats": [[1, 2]]}), C.INVALID_ARGUMENT, ("entry", "object")
        ),
        "step-stats-entry-null": Case(
            patch({"step_stats": [None]}), C.INVALID_ARGUMENT, ("entry", "object")
        ),
        "step-stats-entry-without-step-id": Case(
            patch({"step_stats": [{"status": "running"}]}), C.INVALID_ARGUMENT, ("step_id",)
        ),
        "step-stats-entry-numeric-step-id": Case(
            patch({"step_stats": [{"step_id": 5}]}), C.INVALID_ARGUMENT, ("step_id",)
        ),
        "step-stats-unknown-status": Case(
            patch(lambda t: entry(t, status="finished")), C.INVALID_ARGUMENT, ("finished",)
        ),
        "step-stats-numeric-status": Case(
            patch(lambda t: entry(t, status=3)), C.INVALID_ARGUMENT, ("status",)
        ),
        "step-stats-status-null": Case(
            patch(lambda t: entry(t, status=None)), C.INVALID_ARGUMENT, ("status", "deleted")
        ),
        "step-stats-fractional-index": Case(
            patch(lambda t: entry(t, step_index=1.5)), C.INVALID_ARGUMENT, ("step_index",)
        ),
        "step-stats-negative-index": Case(
            patch(lambda t: entry(t, step_index=-1)), C.INVALID_ARGUMENT, ("step_index",)
        ),
        "step-stats-text-child-count": Case(
            patch(lambda t: entry(t, child_count="ten")), C.INVALID_ARGUMENT, ("child_count",)
        ),
        "step-stats-deleted": Case(
            patch({"keep": "changed", "step_stats": None}), C.INVALID_ARGUMENT, ("step_stats",)
        ),
        "current-step-status-unknown": Case(
            patch({"current_step_status": "finished"}), C.INVALID_ARGUMENT, ("finished",)
        ),
        "current-step-status-a-number": Case(
            patch({"current_step_status": 4}), C.INVALID_ARGUMENT, ("status",)
        ),
        "current-step-status-an-object": Case(
            patch({"current_step_status": {"s": "running"}}), C.INVALID_ARGUMENT, ("status",)
        ),
    },
}
# The one case that succeeds: asking for the status a job has is a no-op.
NO_OPS = {"status-same-is-a-no-op"}


@pytest.mark.parametrize("group", list(GROUPS))
async def test_bad_requests_get_a_clear_code_and_change_nothing(stub: Stub, group: str) -> None:
    """Each case of the group against one tree: the code, a short message naming the
    problem, and every stored job unchanged afterwards. All problems are reported at once."""
    tree = await make_tree(stub)
    problems: list[str] = []
    for name, case in GROUPS[group].items():
        before = await everything(stub)
        code, details = C.OK, ""
        try:
            await case.call(stub, tree)
        except aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        if code != case.code:
            problems.append(f"{name}: {code.name} {details[:200]!r}, expected {case.code.name}")
        elif name not in NO_OPS:
            if not details or len(details) > 500:
                problems.append(f"{name}: unclear message {details[:120]!r}")
            missing = [w for w in case.says if w.lower() not in details.lower()]
            if missing:
                problems.append(f"{name}: {details!r} does not say {missing}")
        if await everything(stub) != before:
            problems.append(f"{name}: the stored state changed")
    assert not problems, "\n".join(problems)


# -- numbers JSON cannot hold -------------------------------------------------------------------
async def test_nan_and_infinity_in_metadata_are_invalid_argument(stub: Stub) -> None:
    """A Struct may carry NaN and Infinity; JSON (the stored form) cannot: bad input, not an
    internal error."""
    tree = await make_tree(stub)
    before = await everything(stub)
    for number in (float("nan"), float("inf"), float("-inf")):
        for value in (number, [1, number], {"deep": {"er": number}}):
            with pytest.raises(aio.AioRpcError) as err:
                await patch_struct(struct_with("score", value))(stub, tree)
            assert err.value.code() == C.INVALID_ARGUMENT, (err.value.code(), err.value.details())
            assert "metadata" in (err.value.details() or "")
        with pytest.raises(aio.AioRpcError) as err:
            await stub.CreateJob(
                m.CreateJobRequest(
                    kind=S.JOB_KIND_MANAGER, name="nan", metadata=struct_with("x", number)
                ),
                timeout=CALL_S,
            )
        assert err.value.code() == C.INVALID_ARGUMENT
    assert await everything(stub) == before


# -- bytes that are not a message -----------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def struct_nested_bytes(depth: int) -> bytes:
    """A Struct nested ``depth`` levels (each level a map entry, a Value and a Struct): deeper
    than protobuf parsers accept (100), which no client library would encode."""
    inner = b""
    for _ in range(depth):
        value = _field(5, inner)  # Value.struct_value
        entry = _field(1, b"k") + _field(2, value)  # Struct.FieldsEntry
        inner = _field(1, entry)  # Struct.fields
    return inner


GARBAGE = b"\xff\xff\xff\xff\xff"
TRUNCATED = _field(1, b"abcdef")[:-3]
BAD_UTF8 = _field(1, b"\xc3\x28")  # field 1 is a string id in these requests
TOO_DEEP = _field(1, b"some-id") + _field(2, struct_nested_bytes(120))
STRING_FIRST = ("GetJob", "ListJobs", "UpdateJobStatus", "UpdateJobMetadata",
                "UpdateStepStatInManager", "WatchJob", "CreateJob")  # fmt: skip
ALL_RPCS = (*STRING_FIRST, "StreamChildEvents")
MALFORMED = [
    *[(rpc, "garbage", GARBAGE) for rpc in ALL_RPCS],
    *[(rpc, "truncated", TRUNCATED) for rpc in ALL_RPCS],
    *[(rpc, "bad-utf8", BAD_UTF8) for rpc in STRING_FIRST],
    ("UpdateJobMetadata", "metadata-nested-beyond-the-parser", TOO_DEEP),
    ("CreateJob", "metadata-nested-beyond-the-parser", _field(6, struct_nested_bytes(120))),
]


async def raw_call(channel: aio.Channel, rpc: str, data: bytes) -> None:
    """Send ``data`` as the request of ``rpc``, whatever it is; raise what the call ends with."""
    path = f"/stepflow.v1.MonitorService/{rpc}"
    ident = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if rpc == "WatchJob":
        async for _ in channel.unary_stream(path, **ident)(data, timeout=CALL_S):
            pass
    elif rpc == "StreamChildEvents":
        call = channel.stream_stream(path, **ident)(timeout=CALL_S)
        await call.write(data)
        await call.done_writing()
        while await call.read() is not aio.EOF:
            pass
    else:
        await channel.unary_unary(path, **ident)(data, timeout=CALL_S)


async def test_bytes_that_do_not_parse_are_invalid_argument(
    stub: Stub, channel: aio.Channel
) -> None:
    """Corrupt wire format, invalid UTF-8, nesting beyond protobuf's recursion limit, on every
    RPC: bytes no client library would send, answered INVALID_ARGUMENT (not gRPC's bare
    UNKNOWN), nothing stored changed."""
    await make_tree(stub)
    before = await everything(stub)
    problems: list[str] = []
    for rpc, what, data in MALFORMED:
        try:
            await raw_call(channel, rpc, data)
            problems.append(f"{rpc} {what}: accepted")
        except aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() != C.INVALID_ARGUMENT or "could not be decoded" not in details:
                problems.append(f"{rpc} {what}: {exc.code().name} {details[:150]!r}")
    assert not problems, "\n".join(problems)
    assert await everything(stub) == before


async def test_unknown_fields_are_ignored(stub: Stub, channel: aio.Channel) -> None:
    """A newer client's extra field is not an error (proto3 forward compatibility)."""
    tree = await make_tree(stub)
    raw = channel.unary_unary(
        "/stepflow.v1.MonitorService/GetJob",
        request_serializer=lambda b: b,
        response_deserializer=m.GetJobResponse.FromString,
    )
    request = m.GetJobRequest(job_id=tree.manager).SerializeToString() + _field(99, b"future")
    resp = await raw(request, timeout=CALL_S)
    assert resp.job.id == tree.manager


# -- NUL characters: valid protobuf strings that PostgreSQL text cannot store -------------------
# PostgreSQL would refuse them with a database error (retryable UNAVAILABLE, and in a child
# event a failed batch the orchestrator would resend for ever), so they are refused as bad
# input on both databases alike.
async def test_a_nul_character_in_a_text_field_is_invalid_argument(stub: Stub) -> None:
    tree = await make_tree(stub)
    before = await everything(stub)
    calls = {
        "name": lambda: stub.CreateJob(
            m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="a\x00b"), timeout=CALL_S
        ),
        "type": lambda: stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_STEP, parent_id=tree.manager, name="s", type="t\x00"
            ),
            timeout=CALL_S,
        ),
        "error": lambda: set_status("step0", S.JOB_STATUS_FAILED, "bad\x00byte")(stub, tree),
    }
    for field, call in calls.items():
        with pytest.raises(aio.AioRpcError) as err:
            await call()
        assert err.value.code() == C.INVALID_ARGUMENT, (field, err.value.details())
        assert field in (err.value.details() or ""), err.value.details()
    assert await everything(stub) == before


async def test_a_nul_character_in_metadata_round_trips(stub: Stub) -> None:
    """Metadata is stored as JSON, where a NUL is the escape \\u0000: kept as sent."""
    tree = await make_tree(stub)
    resp = await patch_struct(struct_with("k\x00ey", "va\x00lue"))(stub, tree)
    assert dict(resp.job.metadata)["k\x00ey"] == "va\x00lue"  # type: ignore[attr-defined]
    got = (await stub.GetJob(m.GetJobRequest(job_id=tree.manager), timeout=CALL_S)).job
    assert got.metadata["k\x00ey"] == "va\x00lue"


async def test_a_nul_character_in_an_event_does_not_block_the_stream(stub: Stub) -> None:
    """A NUL in an event's id rejects that event alone; in its error or name (texts) it is
    stored as U+FFFD, so a terminal event is never refused for its text."""
    tree = await make_tree(stub)
    good = ev(S.CHILD_EVENT_KIND_CREATED, tree.step1, "good-child")
    texts = [
        ev(S.CHILD_EVENT_KIND_FAILED, tree.step1, "nul-1", error="x\x00y"),
        ev(S.CHILD_EVENT_KIND_CREATED, tree.step1, "nul-2", name="a\x00"),
    ]
    bad_id = ev(S.CHILD_EVENT_KIND_CREATED, tree.step1, "nul-3")
    bad_id.event_id = "id\x00"
    after = ev(S.CHILD_EVENT_KIND_COMPLETED, tree.step1, "good-child")
    (ack,) = await stream(stub, [[good, *texts, bad_id, after]])
    assert [(r.event_id, "NUL" in r.reason) for r in ack.rejected] == [("id\x00", True)]
    failed = (await stub.GetJob(m.GetJobRequest(job_id="nul-1"), timeout=CALL_S)).job
    assert (failed.status, failed.error) == (S.JOB_STATUS_FAILED, "x\ufffdy")
    named = (await stub.GetJob(m.GetJobRequest(job_id="nul-2"), timeout=CALL_S)).job
    assert named.name == "a\ufffd"
    job = (await stub.GetJob(m.GetJobRequest(job_id=tree.manager), timeout=CALL_S)).job
    stat = next(s for s in job.step_stats if s.step_id == tree.step1)
    assert (stat.children.pending, stat.children.completed, stat.children.failed) == (1, 1, 1)


# -- bad events on the stream --------------------------------------------------------------
_ids = itertools.count(1)


def ev(kind: int, step_id: str, child_id: str = "", **kw: Any) -> job_pb2.ChildEvent:
    return job_pb2.ChildEvent(
        event_id=f"bad-{next(_ids)}",
        kind=kind,
        step_id=step_id,
        child_id=child_id,
        **kw,  # type: ignore[arg-type]
    )


async def stream(
    stub: Stub, batches: list[list[job_pb2.ChildEvent]]
) -> list[m.StreamChildEventsResponse]:
    call = stub.StreamChildEvents(timeout=CALL_S)
    for i, batch in enumerate(batches, start=1):
        await call.write(m.StreamChildEventsRequest(batch_id=i, events=batch))
    await call.done_writing()
    acks = []
    while (ack := await call.read()) is not aio.EOF:
        acks.append(ack)
    return acks


async def test_bad_events_are_rejected_by_name_and_the_rest_of_the_batch_applies(
    stub: Stub,
) -> None:
    tree = await make_tree(stub)
    step = tree.step1
    good = [
        ev(S.CHILD_EVENT_KIND_CREATED, step, "g1"),
        ev(S.CHILD_EVENT_KIND_RUNNING, step, "g1"),
        ev(S.CHILD_EVENT_KIND_CREATED, step, "g2"),
    ]
    bad = {
        "unknown kind": ev(77, step, "q1"),
        "unspecified kind": ev(S.CHILD_EVENT_KIND_UNSPECIFIED, step, "q2"),
        "no child_id": ev(S.CHILD_EVENT_KIND_RUNNING, step, ""),
        "long child_id": ev(S.CHILD_EVENT_KIND_CREATED, step, LONG_ID),
        "child_id with space": ev(S.CHILD_EVENT_KIND_CREATED, step, "a b"),
        "no step_id": ev(S.CHILD_EVENT_KIND_CREATED, "", "q3"),
        "long step_id": ev(S.CHILD_EVENT_KIND_CREATED, HUGE_ID, "q4"),
        "unknown step": ev(S.CHILD_EVENT_KIND_CREATED, "no-such-step", "q5"),
        "step is a manager": ev(S.CHILD_EVENT_KIND_CREATED, tree.manager, "q6"),
        "step is a child": ev(S.CHILD_EVENT_KIND_CREATED, tree.child, "q7"),
        "negative seal": ev(S.CHILD_EVENT_KIND_SEALED, step, child_count=-3),
        "child of another step": ev(S.CHILD_EVENT_KIND_COMPLETED, step, tree.child),
    }
    events = [good[0], *bad.values(), good[1], good[2]]
    (ack,) = await stream(stub, [events])
    rejected = {r.event_id: r.reason for r in ack.rejected}
    assert set(rejected) == {e.event_id for e in bad.values()}, rejected
    for what, e in bad.items():
        assert rejected[e.event_id].strip(), f"{what}: no reason"
        assert len(rejected[e.event_id]) < 300, f"{what}: {rejected[e.event_id][:80]}..."
    job = (await stub.GetJob(m.GetJobRequest(job_id=tree.manager), timeout=CALL_S)).job
    stat = next(s for s in job.step_stats if s.step_id == step)
    assert (stat.children.pending, stat.children.running, stat.children.failed) == (1, 1, 0)
    # The stream is not blocked: the next batch on a new stream applies too.
    (ack,) = await stream(stub, [[ev(S.CHILD_EVENT_KIND_COMPLETED, step, "g2")]])
    assert not ack.rejected


async def test_a_batch_over_the_limit_ends_the_stream_and_applies_nothing_of_it(stub: Stub) -> None:
    tree = await make_tree(stub)
    first = [ev(S.CHILD_EVENT_KIND_CREATED, tree.step1, "before")]
    over = [
        ev(S.CHILD_EVENT_KIND_CREATED, tree.step1, f"o{i}") for i in range(MAX_EVENTS_PER_BATCH + 1)
    ]
    call = stub.StreamChildEvents(timeout=CALL_S)
    await call.write(m.StreamChildEventsRequest(batch_id=1, events=first))
    ack = await call.read()
    assert ack.batch_id == 1
    before = await everything(stub)
    await call.write(m.StreamChildEventsRequest(batch_id=2, events=over))
    with pytest.raises(aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == C.RESOURCE_EXHAUSTED
    assert str(MAX_EVENTS_PER_BATCH) in (err.value.details() or "")
    assert await everything(stub) == before
