"""A job file (TOML or JSON), or its parsed structure, as a ``JobSpec``; and back."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from orchestrator_svc.definitions.fields import (
    parse_config,
    parse_name,
    parse_steps,
    parse_timeout,
    parse_tolerance,
    reject_duplicate_keys,
    reject_unknown_keys,
)
from orchestrator_svc.definitions.spec import Executor, JobSpec
from orchestrator_svc.workers.base import Worker
from orchestrator_svc.workers.settings import describe
from stepflow_common.errors import InvalidArgument
from stepflow_common.job_keys import JOB_KEYS


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
            data = json.loads(raw, object_pairs_hook=reject_duplicate_keys)
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
    reject_unknown_keys(data, JOB_KEYS, "")
    types = set(workers) if workers is not None else (set(known_types) if known_types else None)
    tolerance = data.get("error_tolerance")
    return JobSpec(
        name=parse_name(data.get("name"), "name"),
        timeout_s=parse_timeout(data.get("timeout"), "timeout"),
        error_tolerance=None if tolerance is None else parse_tolerance(tolerance),
        config=parse_config(data.get("config"), "config"),
        steps=parse_steps(data.get("steps"), types, workers),
    )


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
        if step.executor is not Executor.LOCAL:
            entry["executor"] = step.executor.value
        if step.config:
            entry["config"] = step.config
        if step.depends_on:
            entry["depends_on"] = list(step.depends_on)
        if step.timeout_s is not None:
            entry["timeout"] = step.timeout_s
        data["steps"].append(entry)
    return data
