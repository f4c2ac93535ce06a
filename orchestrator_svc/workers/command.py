"""``command``: one shell command; the step is its exit status. No children."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator_svc.workers.base import BaseWorker, StepContext, StepResult
from orchestrator_svc.workers.fanout import ATTEMPT_ENV
from orchestrator_svc.workers.settings import (
    get_duration,
    get_str,
    get_str_map,
    reject_unknown_keys,
)
from orchestrator_svc.workers.shell import run_shell

KEYS = frozenset({"command", "cwd", "env", "timeout"})


@dataclass(frozen=True, slots=True)
class CommandSettings:
    command: str
    cwd: str | None
    env: dict[str, str]
    timeout_s: float | None

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> CommandSettings:
        reject_unknown_keys(config, KEYS)
        command = get_str(config, "command", required=True)
        assert command is not None
        return cls(
            command=command,
            cwd=get_str(config, "cwd"),
            env=get_str_map(config, "env"),
            timeout_s=get_duration(config, "timeout"),
        )


class CommandWorker(BaseWorker):
    type = "command"
    description = (
        "Runs one shell command (config: command, cwd, env, timeout; the step's attempt in "
        "$STEPFLOW_ATTEMPT); no children."
    )
    spawns_children = False

    def validate_config(self, config: Mapping[str, Any]) -> None:
        CommandSettings.parse(config)

    async def run(self, ctx: StepContext) -> StepResult:
        settings = CommandSettings.parse(ctx.config)
        outcome = await run_shell(
            settings.command,
            cancelled=ctx.cancelled,
            cwd=settings.cwd,
            env={**settings.env, ATTEMPT_ENV: str(ctx.attempt)},
            timeout_s=settings.timeout_s,
            on_line=lambda source, text: ctx.log(text, source=source),
        )
        outcome.log_output(job_id=ctx.step_id, step=ctx.step_name)
        if outcome.status == "completed":
            return StepResult.success()
        if outcome.status == "cancelled":
            return StepResult.stopped(outcome.error)
        return StepResult.failure(outcome.error)
