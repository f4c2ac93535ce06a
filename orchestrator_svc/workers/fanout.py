"""``fanout``: one child per item, each running a shell command template, a bounded number at
a time. A child fails on a non-zero exit status (or its timeout)."""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator_svc.workers.base import BaseWorker, StepContext, StepResult
from orchestrator_svc.workers.children import ChildOutcome, run_children
from orchestrator_svc.workers.settings import (
    describe,
    get_duration,
    get_int,
    get_str,
    get_str_map,
    reject_unknown_keys,
)
from orchestrator_svc.workers.shell import run_shell
from stepflow_common.errors import InvalidArgument

KEYS = frozenset({"items", "command", "concurrency", "cwd", "env", "timeout"})
PLACEHOLDER = "{item}"
ITEM_ENV = "STEPFLOW_ITEM"
ATTEMPT_ENV = "STEPFLOW_ATTEMPT"
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 1024
MAX_ITEMS = 100_000
MAX_CHILD_NAME_CHARS = 200


@dataclass(frozen=True, slots=True)
class FanoutSettings:
    items: tuple[str, ...]
    command: str
    concurrency: int
    cwd: str | None
    env: dict[str, str]
    timeout_s: float | None
    """Per child."""

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> FanoutSettings:
        reject_unknown_keys(config, KEYS)
        command = get_str(config, "command", required=True)
        assert command is not None
        return cls(
            items=_items(config),
            command=command,
            concurrency=get_int(
                config,
                "concurrency",
                default=DEFAULT_CONCURRENCY,
                minimum=1,
                maximum=MAX_CONCURRENCY,
            ),
            cwd=get_str(config, "cwd"),
            env=get_str_map(config, "env"),
            timeout_s=get_duration(config, "timeout"),
        )

    def command_for(self, item: str) -> str:
        """The template with ``{item}`` replaced by the shell-quoted item.

        Plain replacement, not ``str.format``, so the shell's own braces (``${HOME}``, awk
        programs) pass through; quoted, so an item with spaces or ``;`` stays one argument.
        """
        return self.command.replace(PLACEHOLDER, shlex.quote(item))


def _items(config: Mapping[str, Any]) -> tuple[str, ...]:
    if "items" not in config:
        raise InvalidArgument("items: required")
    raw = config["items"]
    if not isinstance(raw, list | tuple):
        raise InvalidArgument(f"items: expected a list, got {describe(raw)}")
    if len(raw) > MAX_ITEMS:
        raise InvalidArgument(f"items: at most {MAX_ITEMS} items, got {len(raw)}")
    items: list[str] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            items.append(str(item))
        elif isinstance(item, float) and math.isfinite(item):
            # A Struct turns 3 into 3.0; the command should still see "3".
            items.append(str(int(item)) if item.is_integer() else str(item))
        else:
            raise InvalidArgument(f"items[{i}]: expected a string or number, got {describe(item)}")
    return tuple(items)


class FanoutWorker(BaseWorker):
    type = "fanout"
    description = (
        "One child per item of config.items, each running config.command with {item} replaced "
        "(shell-quoted; also in $STEPFLOW_ITEM), config.concurrency at a time (default 8)."
    )
    spawns_children = True

    def validate_config(self, config: Mapping[str, Any]) -> None:
        FanoutSettings.parse(config)

    async def run(self, ctx: StepContext) -> StepResult:
        settings = FanoutSettings.parse(ctx.config)

        async def run_one(index: int, attempt: int) -> ChildOutcome:
            item = settings.items[index]
            child_id = ctx.child_id(index)
            outcome = await run_shell(
                settings.command_for(item),
                cancelled=ctx.child_cancelled(child_id),
                cwd=settings.cwd,
                env={**settings.env, ITEM_ENV: item, ATTEMPT_ENV: str(attempt)},
                timeout_s=settings.timeout_s,
                on_line=lambda source, text: ctx.log(text, source=source, child_id=child_id),
            )
            outcome.log_output(job_id=child_id, step_id=ctx.step_id, item=item)
            return ChildOutcome(outcome.status, outcome.error)

        names = [item[:MAX_CHILD_NAME_CHARS] for item in settings.items]
        count = await run_children(ctx, names, run_one, concurrency=settings.concurrency)
        return StepResult.spawned(count, cancelled=ctx.cancelled.is_set())
