"""The keys a job definition may hold (the job file, and the same structure given to the Python
client as a dict): one table, so the client refuses what a job file refuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stepflow_common.errors import InvalidArgument

JOB_KEYS = ("name", "timeout", "error_tolerance", "config", "steps")
STEP_KEYS = (
    "name",
    "type",
    "config",
    "on_error",
    "depends_on",
    "wait",
    "timeout",
    "retries",
    "retry_backoff",
    "on_interrupt",
    "executor",
)
TOLERANCE_KEYS = ("max_child_failures", "action")
RUNNERS_TYPE = "executor:celery"
"""Declared beside its worker types by an orchestrator with a broker: a job with a step of
``executor = "celery"`` needs it, so only such an orchestrator adopts the job."""


def reject_unknown_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """``where.key: unknown field (expected one of: …)`` for the first key not in ``allowed``."""
    for key in data:
        if key not in allowed:
            at = f"{where}.{key}" if where else str(key)
            raise InvalidArgument(f"{at}: unknown field (expected one of: {', '.join(allowed)})")
