"""A job definition's validated, plain form: the job, its steps, their error and interrupt
rules, and the bounds every definition is checked against."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from orchestrator_svc.workers.base import RetryPolicy
from stepflow_common.limits import MAX_STEPS_PER_MANAGER

MAX_STEPS = MAX_STEPS_PER_MANAGER
"""The monitor refuses a manager's step beyond this: a job that could not be recorded whole
is refused before it starts."""
MAX_CONFIG_DEPTH = 32
MAX_EXACT_INT = 2**53
"""Struct numbers are doubles: a larger integer would not survive SubmitJob unchanged."""
MAX_RETRIES = 100
DEFAULT_RETRY_BACKOFF_S = 1.0


class OnError(enum.StrEnum):
    """What a failing step does to the rest of the job."""

    CONTINUE = "continue"  # go on with the next steps
    FAIL = "fail"  # start no new step, let running ones finish, skip the rest
    FATAL = "fatal"  # as fail, and cancel running steps and their children at once


class OnInterrupt(enum.StrEnum):
    """What happens to children that were live when their orchestrator was lost."""

    RERUN = "rerun"  # run each again as a new attempt of the same child
    FAIL = "fail"  # end each failed, end_reason orchestrator_lost (work that must not run twice)


class Executor(enum.StrEnum):
    """Where a step's children run."""

    LOCAL = "local"  # in the orchestrator's process
    CELERY = "celery"  # as Celery tasks on the orchestrator's broker, run by runners


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
    executor: Executor = Executor.LOCAL

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
