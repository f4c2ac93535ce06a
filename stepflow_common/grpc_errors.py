"""The servers' side of the error mapping: ``DomainErrorInterceptor`` wraps every handler and
answers a domain error with its status code and reason (the mapping itself, both ways, is
``stepflow_common.rpc_errors``; clients decode with ``from_rpc_error``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from grpc import aio

from stepflow_common import errors
from stepflow_common.limits import ID_PATTERN
from stepflow_common.rpc_errors import (
    CODES,
    DETAIL_PREFIX,
    REASON_KEY,
    code_for,
    error_metadata,
    from_rpc_error,
)

log = structlog.get_logger(__name__)

__all__ = [
    "CODES",
    "DETAIL_PREFIX",
    "REASON_KEY",
    "DomainErrorInterceptor",
    "code_for",
    "error_metadata",
    "from_rpc_error",
    "job_named_by",
]


async def _abort(context: aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, errors.StepflowError):
        code = code_for(exc)
        log.info("rpc refused", code=code.name, reason=str(exc))
        await context.abort(code, str(exc), trailing_metadata=error_metadata(exc))
    log.exception("rpc failed")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


class _Undecodable:
    """Stands in for a request message the deserializer refused (too deep, malformed), so the
    call can be answered INVALID_ARGUMENT instead of gRPC's bare UNKNOWN."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return deserialize


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(
            f"the request message could not be decoded ({request.reason}); check its size, "
            "nesting depth and field types"
        )


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _check_decoded(request)
        yield request


# The request fields that name the job a call is about, in the order they are looked up.
JOB_ID_FIELDS = ("job_id", "manager_id", "parent_id")


def job_named_by(request: Any) -> str:
    """The job a request names (``job_id``, else ``manager_id``, else ``parent_id``), or "".
    Only a well-formed id is taken: a client's junk must not reach every log line."""
    for name in JOB_ID_FIELDS:
        value = getattr(request, name, "")
        if value and isinstance(value, str):
            return value if ID_PATTERN.match(value) else ""
    return ""


class _Call:
    """One call's bookkeeping, the same for every call shape: ``rpc`` (and the job its
    request names) bound to every log line written while it runs, a domain error or a crash
    turned into its status, and its outcome observed exactly once, however the call ended
    (returned, refused, aborted by the handler, or cancelled by the client)."""

    __slots__ = ("_bound", "_context", "_method", "_observe", "_started")

    def __init__(
        self,
        method: str,
        context: aio.ServicerContext,
        observe: Callable[[str, str, float], None] | None,
        request: Any = None,
    ) -> None:
        self._method = method
        self._context = context
        self._observe = observe
        self._bound = {"rpc": method}
        job_id = job_named_by(request)
        if job_id:
            self._bound["job_id"] = job_id
        self._started = 0.0

    async def __aenter__(self) -> _Call:
        self._started = time.perf_counter()
        structlog.contextvars.bind_contextvars(**self._bound)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        try:
            if exc is None:
                self._finish("OK")
            elif isinstance(exc, aio.AbortError):
                self._finish(_code_name(self._context))  # the handler aborted on its own
            elif isinstance(exc, Exception):
                self._finish(_code_of(exc))
                await _abort(self._context, exc)
            else:
                self._finish("CANCELLED")  # the client left: the task is cancelled / closed
        finally:
            # Each call runs in its own task, so unbinding cannot take another call's context.
            structlog.contextvars.unbind_contextvars("rpc", "job_id")

    def _finish(self, code: str) -> None:
        if self._observe is not None:
            self._observe(self._method, code, time.perf_counter() - self._started)


class DomainErrorInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler, one wrapper per call shape, all through ``_Call``: domain errors
    mapped to their status code in one place, ``rpc`` and ``job_id`` in the log context,
    every call's code and latency observed (stream aborts included)."""

    def __init__(self, observe: Callable[[str, str, float], None] | None = None) -> None:
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        observe = self._observe
        deserialize = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                async with _Call(method, context, observe, request):
                    _check_decoded(request)
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserialize, response_serializer=serialize
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(
                request: Any, context: aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with _Call(method, context, observe, request):
                    _check_decoded(request)
                    async for item in inner_us(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=deserialize, response_serializer=serialize
            )
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator: Any, context: aio.ServicerContext) -> Any:
                async with _Call(method, context, observe):
                    return await inner_su(_checked_stream(request_iterator), context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=deserialize, response_serializer=serialize
            )
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(
                request_iterator: Any, context: aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async with _Call(method, context, observe):
                    async for item in inner_ss(_checked_stream(request_iterator), context):
                        yield item

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=deserialize, response_serializer=serialize
            )
        return handler


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, errors.StepflowError):
        return str(code_for(exc).name)
    return "INTERNAL"


def _code_name(context: aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
