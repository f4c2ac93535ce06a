"""The client retries only what is safe, and tells the truth when a write committed but its
answer was lost: a real gRPC proxy between the client and a real monitor forwards a call, lets
the monitor commit it, and answers UNAVAILABLE instead (once), so the client's automatic retry
on UNAVAILABLE fires against a write that is already in."""

from __future__ import annotations

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


async def test_create_job_whose_answer_was_lost_creates_one_job(
    monitor_proc: ServerProcess,
) -> None:
    direct = MonitorClient(monitor_proc.address)
    async with LosingProxy(monitor_proc.address) as proxy:
        client = MonitorClient(proxy.address)
        try:
            # create_job without a request_id: one job, not two.
            proxy.lose.add("CreateJob")
            job = await client.create_job(kind="manager", name="lost-answer")
            assert proxy.lost == ["CreateJob"]
            named = [
                j for j in (await direct.list_jobs(kind="manager")).jobs if j.name == "lost-answer"
            ]
            assert [j.id for j in named] == [job.id]
        finally:
            await client.close()
            await direct.close()


async def test_expected_version_write_whose_answer_was_lost_is_reported_written(
    monitor_proc: ServerProcess,
) -> None:
    direct = MonitorClient(monitor_proc.address)
    async with LosingProxy(monitor_proc.address) as proxy:
        client = MonitorClient(proxy.address)
        try:
            job = await client.create_job(kind="manager", name="cas", metadata={"n": 1})
            proxy.lose.add("UpdateJobMetadata")
            written = await client.update_job_metadata(
                job.id, {"n": 2}, expected_version=job.version
            )
            assert proxy.lost == ["UpdateJobMetadata"]
            assert written.version == job.version + 1
            stored = await direct.get_job(job.id)
            assert stored.version == job.version + 1
            assert stored.metadata["n"] == 2
        finally:
            await client.close()
            await direct.close()


async def test_update_metadata_whose_answer_was_lost_applies_fn_once(
    monitor_proc: ServerProcess,
) -> None:
    direct = MonitorClient(monitor_proc.address)
    async with LosingProxy(monitor_proc.address) as proxy:
        client = MonitorClient(proxy.address)
        try:
            job = await client.create_job(kind="manager", name="counter", metadata={"n": 0})
            for expected in range(1, 4):
                proxy.lose.add("UpdateJobMetadata")
                await client.update_metadata(job.id, lambda d: {**d, "n": d["n"] + 1})
                assert (await direct.get_job(job.id)).metadata["n"] == expected
            assert proxy.lost == ["UpdateJobMetadata"] * 3
        finally:
            await client.close()
            await direct.close()


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
