"""Checking a definition field by field: every error is an InvalidArgument whose message
starts with the field (``steps[1].depends_on: 'crawl' is not an earlier step``)."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from orchestrator_svc.definitions.spec import (
    DEFAULT_RETRY_BACKOFF_S,
    MAX_CONFIG_DEPTH,
    MAX_EXACT_INT,
    MAX_RETRIES,
    MAX_STEPS,
    Executor,
    JobSpec,
    OnError,
    OnInterrupt,
    StepSpec,
    ToleranceAction,
    ToleranceSpec,
)
from orchestrator_svc.workers.base import MAX_BACKOFF_S, Worker
from orchestrator_svc.workers.settings import describe, whole_number
from stepflow_common.durations import parse_duration
from stepflow_common.errors import InvalidArgument
from stepflow_common.job_keys import STEP_KEYS, TOLERANCE_KEYS
from stepflow_common.limits import MAX_NAME_CHARS

_E = TypeVar("_E", bound=enum.StrEnum)


def parse_steps(
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
            check_type(step.type, f"steps[{i}].type", types)
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
    reject_unknown_keys(raw, STEP_KEYS, where)
    name = parse_name(raw.get("name"), f"{where}.name")
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
        type=parse_name(raw.get("type"), f"{where}.type"),
        config=parse_config(raw.get("config"), f"{where}.config"),
        on_error=_choice(OnError, raw.get("on_error"), OnError.FAIL, f"{where}.on_error"),
        depends_on=_depends_on(
            raw.get("depends_on"), f"{where}.depends_on", name, earlier, all_raw
        ),
        wait=wait,
        timeout_s=parse_timeout(raw.get("timeout"), f"{where}.timeout"),
        retries=_retries(raw.get("retries"), f"{where}.retries"),
        retry_backoff_s=_retry_backoff(raw.get("retry_backoff"), f"{where}.retry_backoff"),
        on_interrupt=_choice(
            OnInterrupt, raw.get("on_interrupt"), OnInterrupt.RERUN, f"{where}.on_interrupt"
        ),
        executor=_choice(Executor, raw.get("executor"), Executor.LOCAL, f"{where}.executor"),
    )


def _retries(value: object, where: str) -> int:
    if value is None:
        return 0
    retries = whole_number(value, where)
    if not 0 <= retries <= MAX_RETRIES:
        raise InvalidArgument(f"{where}: must be between 0 and {MAX_RETRIES}, got {retries}")
    return retries


def _retry_backoff(value: object, where: str) -> float:
    seconds = parse_timeout(value, where)
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


def parse_tolerance(value: object) -> ToleranceSpec:
    where = "error_tolerance"
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where}: expected a table/object, got {describe(value)}")
    reject_unknown_keys(value, TOLERANCE_KEYS, where)
    raw_max = value.get("max_child_failures")
    if raw_max is None:
        raise InvalidArgument(f"{where}.max_child_failures: required")
    max_failures = whole_number(raw_max, f"{where}.max_child_failures")
    if max_failures < 0:
        raise InvalidArgument(f"{where}.max_child_failures: must be 0 or more, got {max_failures}")
    action = _choice(ToleranceAction, value.get("action"), ToleranceAction.FAIL, f"{where}.action")
    return ToleranceSpec(max_child_failures=max_failures, action=action)


def parse_name(value: object, where: str) -> str:
    if value is None:
        raise InvalidArgument(f"{where}: required")
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: expected a string, got {describe(value)}")
    if not value.strip():
        raise InvalidArgument(f"{where}: must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{where}: at most {MAX_NAME_CHARS} characters, got {len(value)}")
    return value


def parse_timeout(value: object, where: str) -> float | None:
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


def check_type(type_name: str, where: str, types: Collection[str]) -> None:
    if type_name not in types:
        raise InvalidArgument(
            f"{where}: unknown worker type {type_name!r} (registered: {', '.join(sorted(types))})"
        )


def parse_config(value: object, where: str) -> dict[str, Any]:
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


def reject_unknown_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            at = f"{where}.{key}" if where else str(key)
            raise InvalidArgument(f"{at}: unknown field (expected one of: {', '.join(allowed)})")


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON itself allows a repeated key and keeps the last one; a job file that repeats one
    is almost certainly a mistake, so say so (TOML already refuses)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgument(f"{key}: duplicate key in JSON object")
        out[key] = value
    return out


_FIELD_PREFIX = re.compile(r"^[A-Za-z_][\w-]*(?:\[\d+\])*(?:\.[A-Za-z_][\w-]*(?:\[\d+\])*)*: ")


def under_field(where: str, message: str) -> str:
    """``config`` + ``children: bad`` -> ``config.children: bad``; other text after a colon."""
    return f"{where}.{message}" if _FIELD_PREFIX.match(message) else f"{where}: {message}"


def validate_config(step: StepSpec, worker: Worker, *, where: str = "config") -> None:
    """Have ``worker`` check ``step.config``; its error is re-raised under ``where``
    (``steps[0].config``), so ``children: ...`` becomes ``steps[0].config.children: ...``."""
    try:
        worker.validate_config(step.config)
    except InvalidArgument as exc:
        raise InvalidArgument(under_field(where, str(exc))) from None
    except (ValueError, TypeError) as exc:  # a third-party worker's plain complaint
        raise InvalidArgument(f"{where}: {exc}") from exc


def validate_steps(spec: JobSpec, workers: Mapping[str, Worker]) -> None:
    """Every step's type is registered and its worker accepts its config (for a JobSpec that
    was loaded without ``workers``)."""
    for i, step in enumerate(spec.steps):
        check_type(step.type, f"steps[{i}].type", set(workers))
        validate_config(step, workers[step.type], where=f"steps[{i}].config")
