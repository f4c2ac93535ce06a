"""Job definitions: the validated, plain form of a job file (TOML or JSON) or of SubmitJob's
``JobDefinition``.

Everything is checked here, before anything runs: a job that starts has a well-formed
definition, depends only on earlier steps (so there are no cycles), and, given the workers,
only names registered step types whose configs those workers accept. Every error is an
InvalidArgument whose message starts with the field, e.g.
``steps[1].depends_on: 'crawl' is not an earlier step``.
"""

from __future__ import annotations

import enum
import json
import math
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import duration_pb2, struct_pb2

from orchestrator_svc.workers.base import MAX_BACKOFF_S, RetryPolicy, Worker
from orchestrator_svc.workers.settings import describe, whole_number
from stepflow_common.durations import parse_duration
from stepflow_common.errors import InvalidArgument
from stepflow_common.job_keys import JOB_KEYS, STEP_KEYS, TOLERANCE_KEYS
from stepflow_common.limits import MAX_STEPS_PER_MANAGER
from stepflow_proto.v1 import orchestrator_service_pb2 as pb

MAX_NAME_CHARS = 512
MAX_STEPS = MAX_STEPS_PER_MANAGER
"""The monitor refuses a manager's step beyond this: a job that could not be recorded whole
is refused before it starts."""
MAX_CONFIG_DEPTH = 32
MAX_EXACT_INT = 2**53
"""Struct numbers are doubles: a larger integer would not survive SubmitJob unchanged."""
MAX_RETRIES = 100
DEFAULT_RETRY_BACKOFF_S = 1.0


_E = TypeVar("_E", bound=enum.StrEnum)


class OnError(enum.StrEnum):
    """What a failing step does to the rest of the job."""

    CONTINUE = "continue"  # go on with the next steps
    FAIL = "fail"  # start no new step, let running ones finish, skip the rest
    FATAL = "fatal"  # as fail, and cancel running steps and their children at once


class OnInterrupt(enum.StrEnum):
    """What happens to children that were live when their orchestrator was lost."""

    RERUN = "rerun"  # run each again as a new attempt of the same child
    FAIL = "fail"  # end each failed, end_reason orchestrator_lost (work that must not run twice)


class ToleranceAction(enum.StrEnum):
    """What exceeding ``max_child_failures`` does."""

    FAIL = "fail"  # act as a fatal error
    CONTINUE = "continue"  # only record it


@dataclass(frozen=True, slots=True)
class ToleranceSpec:
    max_child_failures: int
    action: ToleranceAction = ToleranceAction.FAIL


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    type: str
    config: dict[str, Any] = field(default_factory=dict)
    on_error: OnError = OnError.FAIL
    depends_on: tuple[str, ...] = ()
    wait: bool = True
    timeout_s: float | None = None
    retries: int = 0
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    on_interrupt: OnInterrupt = OnInterrupt.RERUN

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.retry_backoff_s)


@dataclass(frozen=True, slots=True)
class JobSpec:
    name: str
    timeout_s: float | None = None
    error_tolerance: ToleranceSpec | None = None
    config: dict[str, Any] = field(default_factory=dict)
    steps: tuple[StepSpec, ...] = ()

    def step_index(self, name: str) -> int:
        """0-based position of the step called ``name`` (KeyError if there is none)."""
        for index, step in enumerate(self.steps):
            if step.name == name:
                return index
        raise KeyError(name)


# -- entry points ----------------------------------------------------------------------------
def load_file(
    path: str | Path,
    *,
    known_types: Collection[str] | None = None,
    workers: Mapping[str, Worker] | None = None,
) -> JobSpec:
    """A job file, TOML or JSON by its extension. Errors are prefixed with the path; a file
    that cannot be read raises OSError as usual."""
    path = Path(path)
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    data: Any
    try:
        if suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        elif suffix == ".json":
            data = json.loads(raw, object_pairs_hook=_reject_duplicate_keys)
        else:
            raise InvalidArgument(f"unknown file type {suffix!r}: use .toml or .json")
        return from_mapping(data, known_types=known_types, workers=workers)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid JSON: {exc}") from None
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc}") from None


def from_mapping(
    data: Mapping[str, Any],
    *,
    known_types: Collection[str] | None = None,
    workers: Mapping[str, Worker] | None = None,
) -> JobSpec:
    """A parsed TOML/JSON document as a JobSpec.

    ``known_types`` rejects unregistered step types; ``workers`` does that and also has each
    step's worker validate its config. A JSON ``null`` counts as an absent optional field.
    """
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"definition: expected a table/object, got {describe(data)}")
    _reject_unknown_keys(data, JOB_KEYS, "")
    types = set(workers) if workers is not None else (set(known_types) if known_types else None)
    tolerance = data.get("error_tolerance")
    return JobSpec(
        name=_name(data.get("name"), "name"),
        timeout_s=_timeout(data.get("timeout"), "timeout"),
        error_tolerance=None if tolerance is None else _tolerance(tolerance),
        config=_config(data.get("config"), "config"),
        steps=_steps(data.get("steps"), types, workers),
    )


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
    return definition


def to_mapping(spec: JobSpec) -> dict[str, Any]:
    """The job-file structure of ``spec`` (JSON-ready); ``from_mapping(to_mapping(s)) == s``.
    This is the form stored with the manager, so any orchestrator can continue the job."""
    data: dict[str, Any] = {"name": spec.name, "steps": []}
    if spec.timeout_s is not None:
        data["timeout"] = spec.timeout_s
    if spec.error_tolerance is not None:
        data["error_tolerance"] = {
            "max_child_failures": spec.error_tolerance.max_child_failures,
            "action": spec.error_tolerance.action.value,
        }
    if spec.config:
        data["config"] = spec.config
    for step in spec.steps:
        entry: dict[str, Any] = {
            "name": step.name,
            "type": step.type,
            "on_error": step.on_error.value,
            "wait": step.wait,
            "retries": step.retries,
            "retry_backoff": step.retry_backoff_s,
            "on_interrupt": step.on_interrupt.value,
        }
        if step.config:
            entry["config"] = step.config
        if step.depends_on:
            entry["depends_on"] = list(step.depends_on)
        if step.timeout_s is not None:
            entry["timeout"] = step.timeout_s
        data["steps"].append(entry)
    return data


def validate_config(step: StepSpec, worker: Worker, *, where: str = "config") -> None:
    """Have ``worker`` check ``step.config``; its error is re-raised under ``where``
    (``steps[0].config``), so ``children: ...`` becomes ``steps[0].config.children: ...``."""
    try:
        worker.validate_config(step.config)
    except InvalidArgument as exc:
        raise InvalidArgument(_under(where, str(exc))) from None
    except (ValueError, TypeError) as exc:  # a third-party worker's plain complaint
        raise InvalidArgument(f"{where}: {exc}") from exc


def validate_steps(spec: JobSpec, workers: Mapping[str, Worker]) -> None:
    """Every step's type is registered and its worker accepts its config (for a JobSpec that
    was loaded without ``workers``)."""
    for i, step in enumerate(spec.steps):
        _check_type(step.type, f"steps[{i}].type", set(workers))
        validate_config(step, workers[step.type], where=f"steps[{i}].config")


# -- fields ----------------------------------------------------------------------------------
def _steps(
    value: object, types: set[str] | None, workers: Mapping[str, Worker] | None
) -> tuple[StepSpec, ...]:
    if value is None:
        raise InvalidArgument("steps: required (a job needs at least one step)")
    if not isinstance(value, list | tuple):
        raise InvalidArgument(
            f"steps: expected a list of steps ([[steps]] in TOML), got {describe(value)}"
        )
    if not value:
        raise InvalidArgument("steps: a job needs at least one step")
    if len(value) > MAX_STEPS:
        raise InvalidArgument(f"steps: at most {MAX_STEPS} steps, got {len(value)}")
    steps: list[StepSpec] = []
    earlier: dict[str, int] = {}
    for i, raw in enumerate(value):
        step = _step(raw, i, earlier, value)
        if types is not None:
            _check_type(step.type, f"steps[{i}].type", types)
        if workers is not None:
            validate_config(step, workers[step.type], where=f"steps[{i}].config")
        earlier[step.name] = i
        steps.append(step)
    return tuple(steps)


def _step(
    raw: object, i: int, earlier: Mapping[str, int], all_raw: list[Any] | tuple[Any, ...]
) -> StepSpec:
    where = f"steps[{i}]"
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{where}: expected a table/object, got {describe(raw)}")
    _reject_unknown_keys(raw, STEP_KEYS, where)
    name = _name(raw.get("name"), f"{where}.name")
    if name in earlier:
        raise InvalidArgument(
            f"{where}.name: {name!r} is already the name of steps[{earlier[name]}]"
        )
    wait = raw.get("wait", True)
    if wait is None:
        wait = True
    if not isinstance(wait, bool):
        raise InvalidArgument(f"{where}.wait: expected true or false, got {describe(wait)}")
    return StepSpec(
        name=name,
        type=_name(raw.get("type"), f"{where}.type"),
        config=_config(raw.get("config"), f"{where}.config"),
        on_error=_choice(OnError, raw.get("on_error"), OnError.FAIL, f"{where}.on_error"),
        depends_on=_depends_on(
            raw.get("depends_on"), f"{where}.depends_on", name, earlier, all_raw
        ),
        wait=wait,
        timeout_s=_timeout(raw.get("timeout"), f"{where}.timeout"),
        retries=_retries(raw.get("retries"), f"{where}.retries"),
        retry_backoff_s=_retry_backoff(raw.get("retry_backoff"), f"{where}.retry_backoff"),
        on_interrupt=_choice(
            OnInterrupt, raw.get("on_interrupt"), OnInterrupt.RERUN, f"{where}.on_interrupt"
        ),
    )


def _retries(value: object, where: str) -> int:
    if value is None:
        return 0
    retries = whole_number(value, where)
    if not 0 <= retries <= MAX_RETRIES:
        raise InvalidArgument(f"{where}: must be between 0 and {MAX_RETRIES}, got {retries}")
    return retries


def _retry_backoff(value: object, where: str) -> float:
    seconds = _timeout(value, where)
    if seconds is None:
        return DEFAULT_RETRY_BACKOFF_S
    if seconds > MAX_BACKOFF_S:
        raise InvalidArgument(
            f"{where}: at most {MAX_BACKOFF_S:g}s (backoff doubles up to that cap), "
            f"got {seconds:g}s"
        )
    return seconds


def _depends_on(
    value: object,
    where: str,
    own_name: str,
    earlier: Mapping[str, int],
    all_raw: list[Any] | tuple[Any, ...],
) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidArgument(f"{where}: expected a list of step names, got {describe(value)}")
    names: list[str] = []
    for j, dep in enumerate(value):
        if not isinstance(dep, str):
            raise InvalidArgument(
                f"{where}[{j}]: expected a step name (a string), got {describe(dep)}"
            )
        if dep in names:
            raise InvalidArgument(f"{where}: {dep!r} is listed twice")
        if dep == own_name:
            raise InvalidArgument(
                f"{where}: {dep!r} is the step itself; a step may depend only on earlier steps"
            )
        if dep not in earlier:
            later = [
                k for k, s in enumerate(all_raw) if isinstance(s, Mapping) and s.get("name") == dep
            ]
            hint = (
                f"it is steps[{later[0]}]; a step may depend only on steps before it"
                if later
                else "no step has that name"
            )
            raise InvalidArgument(f"{where}: {dep!r} is not an earlier step ({hint})")
        names.append(dep)
    return tuple(names)


def _tolerance(value: object) -> ToleranceSpec:
    where = "error_tolerance"
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where}: expected a table/object, got {describe(value)}")
    _reject_unknown_keys(value, TOLERANCE_KEYS, where)
    raw_max = value.get("max_child_failures")
    if raw_max is None:
        raise InvalidArgument(f"{where}.max_child_failures: required")
    max_failures = whole_number(raw_max, f"{where}.max_child_failures")
    if max_failures < 0:
        raise InvalidArgument(f"{where}.max_child_failures: must be 0 or more, got {max_failures}")
    action = _choice(ToleranceAction, value.get("action"), ToleranceAction.FAIL, f"{where}.action")
    return ToleranceSpec(max_child_failures=max_failures, action=action)


def _name(value: object, where: str) -> str:
    if value is None:
        raise InvalidArgument(f"{where}: required")
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expected a string, got {describe(value)}")
    if not value.strip():
        raise InvalidArgument(f"{where}: must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{where}: at most {MAX_NAME_CHARS} characters, got {len(value)}")
    return value


def _timeout(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidArgument(
            f"{where}: expected a duration like '90s' or '30m', got {describe(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{where}: expected a finite duration, got {describe(value)}")
    return parse_duration(value, where)


def _choice(kind: type[_E], value: object, default: _E, where: str) -> _E:
    if value is None:
        return default
    options = ", ".join(repr(member.value) for member in kind)
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expected one of {options}, got {describe(value)}")
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgument(f"{where}: {value!r} is not one of {options}") from None


def _check_type(type_name: str, where: str, types: Collection[str]) -> None:
    if type_name not in types:
        raise InvalidArgument(
            f"{where}: unknown worker type {type_name!r} (registered: {', '.join(sorted(types))})"
        )


def _config(value: object, where: str) -> dict[str, Any]:
    """A copy of a config table, checked to be plain JSON that a Struct carries unchanged."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where}: expected a table/object, got {describe(value)}")
    plain = _plain(value, where, 0)
    assert isinstance(plain, dict)
    return plain


def _plain(value: object, where: str, depth: int) -> Any:
    if depth > MAX_CONFIG_DEPTH:
        raise InvalidArgument(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_EXACT_INT:
            raise InvalidArgument(
                f"{where}: {value} is too large to pass exactly (limit 2**53); use a string"
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(f"{where}: {value} is not a finite number")
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"{where}: keys must be strings, got {describe(key)}")
            out[key] = _plain(item, f"{where}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise InvalidArgument(
        f"{where}: a {type(value).__name__} value cannot be passed in a job definition "
        "(use a string, number, boolean, list or table)"
    )


def _reject_unknown_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            at = f"{where}.{key}" if where else str(key)
            raise InvalidArgument(f"{at}: unknown field (expected one of: {', '.join(allowed)})")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON itself allows a repeated key and keeps the last one; a job file that repeats one
    is almost certainly a mistake, so say so (TOML already refuses)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgument(f"{key}: duplicate key in JSON object")
        out[key] = value
    return out


_FIELD_PREFIX = re.compile(r"^[A-Za-z_][\w-]*(?:\[\d+\])*(?:\.[A-Za-z_][\w-]*(?:\[\d+\])*)*: ")


def _under(where: str, message: str) -> str:
    """``config`` + ``children: bad`` -> ``config.children: bad``; other text after a colon."""
    return f"{where}.{message}" if _FIELD_PREFIX.match(message) else f"{where}: {message}"


# -- protobuf --------------------------------------------------------------------------------
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
