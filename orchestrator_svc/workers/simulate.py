"""``simulate``: children that sleep and end by a fixed pattern, for demos, tests and benchmarks.

Child k (1-based) fails when ``fail_every`` divides k, else is cancelled when ``cancel_every``
divides k, else completes. The outcome is a pure function of the config, so callers can assert
exact counts (``expected_tally``). Only a step cancellation changes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator_svc.workers.base import (
    BaseWorker,
    StepContext,
    StepResult,
    sleep_unless_cancelled,
)
from orchestrator_svc.workers.children import ChildOutcome, run_children
from orchestrator_svc.workers.settings import get_int, reject_unknown_keys
from stepflow_common.step_outcome import ChildTally

KEYS = frozenset(
    {"children", "duration_ms", "concurrency", "fail_every", "cancel_every", "log_lines"}
)
MAX_LOG_LINES = 1_000
DEFAULT_CONCURRENCY = 16
MAX_CONCURRENCY = 100_000
MAX_CHILDREN = 1_000_000
MAX_DURATION_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class SimulateSettings:
    children: int
    duration_ms: int
    concurrency: int
    fail_every: int
    cancel_every: int
    log_lines: int = 0  # lines each child writes to the job's log

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> SimulateSettings:
        reject_unknown_keys(config, KEYS)
        return cls(
            children=get_int(config, "children", minimum=0, maximum=MAX_CHILDREN),
            duration_ms=get_int(
                config, "duration_ms", default=0, minimum=0, maximum=MAX_DURATION_MS
            ),
            concurrency=get_int(
                config,
                "concurrency",
                default=DEFAULT_CONCURRENCY,
                minimum=1,
                maximum=MAX_CONCURRENCY,
            ),
            fail_every=get_int(config, "fail_every", default=0, minimum=0),
            cancel_every=get_int(config, "cancel_every", default=0, minimum=0),
            log_lines=get_int(config, "log_lines", default=0, minimum=0, maximum=MAX_LOG_LINES),
        )

    def outcome(self, number: int) -> ChildOutcome:
        """How child ``number`` (1-based) ends when the step is not cancelled."""
        if self.fail_every and number % self.fail_every == 0:
            return ChildOutcome(
                "failed", f"simulated failure (child {number}, fail_every={self.fail_every})"
            )
        if self.cancel_every and number % self.cancel_every == 0:
            return ChildOutcome(
                "cancelled",
                f"simulated cancellation (child {number}, cancel_every={self.cancel_every})",
            )
        return ChildOutcome("completed")

    def expected_tally(self) -> ChildTally:
        """The exact final counts of an uncancelled run, without running it."""
        n = self.children
        failed = n // self.fail_every if self.fail_every else 0
        cancelled = n // self.cancel_every if self.cancel_every else 0
        if self.fail_every and self.cancel_every:
            # A child hit by both fails: take the common multiples out of the cancelled ones.
            cancelled -= n // math.lcm(self.fail_every, self.cancel_every)
        return ChildTally(completed=n - failed - cancelled, failed=failed, cancelled=cancelled)


def expected_tally(config: Mapping[str, Any]) -> ChildTally:
    """Final child counts a simulate step with ``config`` reaches unless it is cancelled."""
    return SimulateSettings.parse(config).expected_tally()


class SimulateWorker(BaseWorker):
    type = "simulate"
    description = (
        "Children that sleep duration_ms and fail/cancel by a fixed pattern (config: children, "
        "duration_ms, concurrency=16, fail_every, cancel_every, log_lines per child); for "
        "demos, tests, benchmarks."
    )
    spawns_children = True

    def validate_config(self, config: Mapping[str, Any]) -> None:
        SimulateSettings.parse(config)

    async def run(self, ctx: StepContext) -> StepResult:
        settings = SimulateSettings.parse(ctx.config)
        duration_s = settings.duration_ms / 1000

        async def run_one(index: int, attempt: int) -> ChildOutcome:
            # With duration 0 there is no sleep at all: run_children yields to the loop
            # periodically, which is what keeps thousands of children a second possible.
            if duration_s > 0 and not await sleep_unless_cancelled(
                ctx.child_cancelled(ctx.child_id(index)), duration_s
            ):
                return ChildOutcome("cancelled", "step cancelled while the child was running")
            for line in range(1, settings.log_lines + 1):
                await ctx.log(
                    f"child {index + 1} attempt {attempt}: line {line}",
                    child_id=ctx.child_id(index),
                )
            return settings.outcome(index + 1)

        names = (f"{ctx.step_name}-{k}" for k in range(1, settings.children + 1))
        count = await run_children(ctx, names, run_one, concurrency=settings.concurrency)
        return StepResult.spawned(count, cancelled=ctx.cancelled.is_set())
