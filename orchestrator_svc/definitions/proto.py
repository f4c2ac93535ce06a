"""SubmitJob's ``JobDefinition`` as a ``JobSpec`` (with the same checks as a file), and back."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from orchestrator_svc.definitions.mapping import from_mapping
from orchestrator_svc.definitions.spec import (
    DEFAULT_RETRY_BACKOFF_S,
    MAX_EXACT_INT,
    Executor,
    JobSpec,
    OnError,
    OnInterrupt,
    ToleranceAction,
)
from orchestrator_svc.workers.base import Worker
from stepflow_common.errors import InvalidArgument
from stepflow_proto.v1 import orchestrator_service_pb2 as pb


def from_proto(
    definition: pb.JobDefinition,
    *,
    known_types: Collection[str] | None = None,
    workers: Mapping[str, Worker] | None = None,
) -> JobSpec:
    """SubmitJob's JobDefinition as a JobSpec, with the same checks as a file.

    Struct numbers are doubles; whole ones become ints again, so a worker (or a third-party
    one that checks ``isinstance(x, int)``) sees the same config as from a file.
    """
    data: dict[str, Any] = {"name": definition.name, "steps": []}
    if definition.HasField("timeout"):
        data["timeout"] = _duration_s(definition.timeout, "timeout")
    if definition.HasField("error_tolerance"):
        tolerance = definition.error_tolerance
        data["error_tolerance"] = {
            "max_child_failures": tolerance.max_child_failures,
            "action": _enum_from_pb(
                _ACTION_FROM_PB, tolerance.action, "error_tolerance.action", "ErrorToleranceAction"
            ),
        }
    if definition.HasField("config"):
        data["config"] = _from_struct(definition.config)
    for i, step_pb in enumerate(definition.steps):
        where = f"steps[{i}]"
        step: dict[str, Any] = {
            "name": step_pb.name,
            "type": step_pb.type,
            "on_error": _enum_from_pb(
                _ON_ERROR_FROM_PB, step_pb.on_error, f"{where}.on_error", "OnError"
            ),
            "depends_on": list(step_pb.depends_on),
        }
        if step_pb.HasField("config"):
            step["config"] = _from_struct(step_pb.config)
        if step_pb.HasField("wait"):
            step["wait"] = step_pb.wait
        if step_pb.HasField("timeout"):
            step["timeout"] = _duration_s(step_pb.timeout, f"{where}.timeout")
        if step_pb.retries:
            step["retries"] = step_pb.retries
        if step_pb.HasField("retry_backoff"):
            step["retry_backoff"] = _duration_s(step_pb.retry_backoff, f"{where}.retry_backoff")
        step["on_interrupt"] = _enum_from_pb(
            _ON_INTERRUPT_FROM_PB, step_pb.on_interrupt, f"{where}.on_interrupt", "OnInterrupt"
        )
        step["executor"] = _enum_from_pb(
            _EXECUTOR_FROM_PB, step_pb.executor, f"{where}.executor", "Executor"
        )
        data["steps"].append(step)
    return from_mapping(data, known_types=known_types, workers=workers)


def to_proto(spec: JobSpec) -> pb.JobDefinition:
    """The JobDefinition SubmitJob takes; ``from_proto(to_proto(s)) == s``."""
    definition = pb.JobDefinition(name=spec.name)
    if spec.timeout_s is not None:
        definition.timeout.CopyFrom(_duration_pb(spec.timeout_s))
    if spec.error_tolerance is not None:
        definition.error_tolerance.max_child_failures = spec.error_tolerance.max_child_failures
        definition.error_tolerance.action = _ACTION_TO_PB[spec.error_tolerance.action]
    if spec.config:
        definition.config.update(spec.config)
    for step in spec.steps:
        step_pb = definition.steps.add(
            name=step.name,
            type=step.type,
            on_error=_ON_ERROR_TO_PB[step.on_error],
            depends_on=step.depends_on,
            wait=step.wait,
        )
        if step.config:
            step_pb.config.update(step.config)
        if step.timeout_s is not None:
            step_pb.timeout.CopyFrom(_duration_pb(step.timeout_s))
        step_pb.retries = step.retries
        if step.retry_backoff_s != DEFAULT_RETRY_BACKOFF_S:
            step_pb.retry_backoff.CopyFrom(_duration_pb(step.retry_backoff_s))
        step_pb.on_interrupt = _ON_INTERRUPT_TO_PB[step.on_interrupt]
        if step.executor is not Executor.LOCAL:
            step_pb.executor = _EXECUTOR_TO_PB[step.executor]
    return definition


_ON_ERROR_TO_PB = {
    OnError.CONTINUE: pb.ON_ERROR_CONTINUE,
    OnError.FAIL: pb.ON_ERROR_FAIL,
    OnError.FATAL: pb.ON_ERROR_FATAL,
}
_ON_ERROR_FROM_PB: dict[int, str | None] = {
    pb.ON_ERROR_UNSPECIFIED: None,  # means fail
    **{number: member.value for member, number in _ON_ERROR_TO_PB.items()},
}
_ON_INTERRUPT_TO_PB = {
    OnInterrupt.RERUN: pb.ON_INTERRUPT_RERUN,
    OnInterrupt.FAIL: pb.ON_INTERRUPT_FAIL,
}
_ON_INTERRUPT_FROM_PB: dict[int, str | None] = {
    pb.ON_INTERRUPT_UNSPECIFIED: None,  # means rerun
    **{number: member.value for member, number in _ON_INTERRUPT_TO_PB.items()},
}
_ACTION_TO_PB = {
    ToleranceAction.FAIL: pb.ERROR_TOLERANCE_ACTION_FAIL,
    ToleranceAction.CONTINUE: pb.ERROR_TOLERANCE_ACTION_CONTINUE,
}
_ACTION_FROM_PB: dict[int, str | None] = {
    pb.ERROR_TOLERANCE_ACTION_UNSPECIFIED: None,  # means fail
    **{number: member.value for member, number in _ACTION_TO_PB.items()},
}


def _enum_from_pb(
    table: Mapping[int, str | None], number: int, where: str, enum_name: str
) -> str | None:
    """Proto3 enums are open: a newer client can send a number this build does not know."""
    if number not in table:
        raise InvalidArgument(f"{where}: unknown {enum_name} value {number}")
    return table[number]


def _duration_s(duration: duration_pb2.Duration, where: str) -> float:
    seconds, nanos = duration.seconds, duration.nanos
    if abs(nanos) >= 1_000_000_000 or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        raise InvalidArgument(f"{where}: not a valid google.protobuf.Duration")
    return seconds + nanos / 1e9


def _duration_pb(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _from_value(value) for key, value in struct.fields.items()}


def _from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _from_struct(value.struct_value)
    if kind == "list_value":
        return [_from_value(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) <= MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


_EXECUTOR_TO_PB = {
    Executor.LOCAL: pb.EXECUTOR_LOCAL,
    Executor.CELERY: pb.EXECUTOR_CELERY,
}
_EXECUTOR_FROM_PB: dict[int, str | None] = {
    pb.EXECUTOR_UNSPECIFIED: None,  # means local
    **{number: member.value for member, number in _EXECUTOR_TO_PB.items()},
}
