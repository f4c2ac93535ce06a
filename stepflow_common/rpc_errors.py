"""The one mapping between domain errors and gRPC status codes, both ways, with nothing but
``grpc`` beside it: servers encode with it (``grpc_errors``), the Python client decodes with it
(``stepflow_client``), and neither pulls in the other's dependencies."""

from __future__ import annotations

import grpc

from stepflow_common import errors

CODES: dict[type[errors.StepflowError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.StatusConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.VersionConflict: grpc.StatusCode.ABORTED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_FROM_CODE: dict[grpc.StatusCode, type[errors.StepflowError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ABORTED: errors.VersionConflict,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}


def code_for(exc: errors.StepflowError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


# Trailing metadata beside the status code: the error's stable reason, and its details.
REASON_KEY = "stepflow-error"
DETAIL_PREFIX = "stepflow-error-"
_BY_REASON: dict[str, type[errors.StepflowError]] = {
    cls.reason: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.FailedPrecondition,
        errors.StatusConflict,
        errors.Fenced,
        errors.VersionConflict,
        errors.AlreadyExists,
        errors.Unavailable,
        errors.ResourceExhausted,
    )
}


def error_metadata(exc: errors.StepflowError) -> tuple[tuple[str, str], ...]:
    details = ((DETAIL_PREFIX + k, v) for k, v in exc.details().items())
    return ((REASON_KEY, exc.reason), *details)


def from_rpc_error(exc: grpc.RpcError) -> errors.StepflowError:
    """The domain error a failed call carries: by its reason when the server sent one, else
    by its status code."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else str(exc)) or code.name
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    sent = {str(k): str(v) for k, v in (trailing or ())}
    cls = _BY_REASON.get(sent.get(REASON_KEY, ""))
    if cls is None:
        return _FROM_CODE.get(code, errors.StepflowError)(message)
    details = {k[len(DETAIL_PREFIX) :]: v for k, v in sent.items() if k.startswith(DETAIL_PREFIX)}
    return cls.rebuild(message, details)
