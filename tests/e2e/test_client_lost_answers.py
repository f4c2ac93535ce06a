"""The client retries only what is safe, and tells the truth when a write committed but its
answer was lost: a real gRPC proxy between the client and a real monitor forwards a call, lets
the monitor commit it, and answers UNAVAILABLE instead (once), so the client's automatic retry
on UNAVAILABLE fires against a write that is already in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio

from stepflow_client.aio import MonitorClient
from tests.process_helpers import ServerProcess


class LosingProxy:
    """Forwards every unary call to ``target``; the first call of ``lose`` is committed there
    and its answer replaced by UNAVAILABLE."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.lose: set[str] = set()
        self.lost: list[str] = []
        self.server = aio.server()
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel = aio.insecure_channel(target)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        forward = self.channel.unary_unary(method)

        async def behave(request: bytes, context: aio.ServicerContext) -> bytes:
            try:
                answer: bytes = await forward(request)
            except aio.AioRpcError as exc:  # relayed as it came, with the error's reason
                context.set_trailing_metadata(exc.trailing_metadata() or ())
                await context.abort(exc.code(), exc.details() or "")
            name = method.rsplit("/", 1)[-1]
            if name in self.lose:
                self.lose.discard(name)
                self.lost.append(name)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test proxy)")
            return answer

        return grpc.unary_unary_rpc_method_handler(behave)

    async def __aenter__(self) -> LosingProxy:
        outer = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> Any:
                return outer.service(details)

        self.server.add_generic_rpc_handlers((Handler(),))
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)
        await self.channel.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Lossy:
    """A client whose answers ``proxy`` may lose, and one that talks to the monitor directly."""

    proxy: LosingProxy
    client: MonitorClient
    direct: MonitorClient


@pytest.fixture
async def lossy(monitor_proc: ServerProcess) -> AsyncIterator[Lossy]:
    async with (
        LosingProxy(monitor_proc.address) as proxy,
        MonitorClient(proxy.address) as client,
        MonitorClient(monitor_proc.address) as direct,
    ):
        yield Lossy(proxy, client, direct)


async def test_create_job_whose_answer_was_lost_creates_one_job(lossy: Lossy) -> None:
    # create_job without a request_id: one job, not two.
    lossy.proxy.lose.add("CreateJob")
    job = await lossy.client.create_job(kind="manager", name="lost-answer")
    assert lossy.proxy.lost == ["CreateJob"]
    managers = (await lossy.direct.list_jobs(kind="manager")).jobs
    assert [j.id for j in managers if j.name == "lost-answer"] == [job.id]


async def test_expected_version_write_whose_answer_was_lost_is_reported_written(
    lossy: Lossy,
) -> None:
    job = await lossy.client.create_job(kind="manager", name="cas", metadata={"n": 1})
    lossy.proxy.lose.add("UpdateJobMetadata")
    written = await lossy.client.update_job_metadata(job.id, {"n": 2}, expected_version=job.version)
    assert lossy.proxy.lost == ["UpdateJobMetadata"]
    assert written.version == job.version + 1
    stored = await lossy.direct.get_job(job.id)
    assert stored.version == job.version + 1
    assert stored.metadata["n"] == 2


async def test_update_metadata_whose_answer_was_lost_applies_fn_once(lossy: Lossy) -> None:
    job = await lossy.client.create_job(kind="manager", name="counter", metadata={"n": 0})
    for expected in range(1, 4):
        lossy.proxy.lose.add("UpdateJobMetadata")
        await lossy.client.update_metadata(job.id, lambda d: {**d, "n": d["n"] + 1})
        assert (await lossy.direct.get_job(job.id)).metadata["n"] == expected
    assert lossy.proxy.lost == ["UpdateJobMetadata"] * 3


def test_a_typo_in_a_kind_or_status_names_the_valid_values() -> None:
    from stepflow_client import _requests as r

    with pytest.raises(ValueError, match=r"'manger' is not a job kind; use one of manager, step"):
        r.kind_pb("manger")
    with pytest.raises(ValueError, match=r"'complete' is not a job status; use one of pending"):
        r.status_pb("complete")


def test_a_dict_definition_is_refused_as_a_job_file_refuses_it() -> None:
    from stepflow_client import _requests as r
    from stepflow_common.errors import InvalidArgument

    step = {"name": "b", "type": "command", "depend_on": ["a"]}
    with pytest.raises(InvalidArgument, match=r"^steps\[0\]\.depend_on: unknown field"):
        r.job_definition({"name": "x", "steps": [step]})
    with pytest.raises(InvalidArgument, match=r"^timout: unknown field"):
        r.job_definition({"name": "x", "timout": "1s", "steps": []})
