"""``python``: call ``module:function`` with the step's config. Returning is success, raising is
failure. No children."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator_svc.workers import python_output
from orchestrator_svc.workers.base import BaseWorker, StepContext, StepResult
from orchestrator_svc.workers.settings import get_str
from stepflow_common.errors import InvalidArgument

TARGET_PATTERN = re.compile(
    r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$"
)
CANCEL_GRACE_S = 5.0
"""How long a cancelled coroutine function gets to clean up before the step returns anyway."""
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a callable that accepts a second argument (or a ``context`` keyword) is given."""

    step_id: str
    step_name: str
    attempt: int
    """1 on the first run; higher when the step runs again after its orchestrator was lost."""


def wants_context(function: Callable[..., Any]) -> bool:
    """Whether ``function`` takes a context: a ``context`` parameter, a second positional
    parameter, or ``*args``."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.name == "context" for p in parameters):
        return True
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    return len(positional) >= 2 or var_positional


def parse_target(value: str) -> tuple[str, str]:
    """``"pkg.mod:obj.attr"`` -> (module, attribute path)."""
    match = TARGET_PATTERN.match(value.strip())
    if match is None:
        raise InvalidArgument(f"callable: {value!r} is not of the form 'module:function'")
    return match.group(1), match.group(2)


def resolve(value: str) -> Callable[..., Any]:
    """Import the module and follow the attribute path; InvalidArgument if that fails."""
    module_name, attr_path = parse_target(value)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"callable: cannot import {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidArgument(
                f"callable: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise InvalidArgument(f"callable: {value!r} is not callable")
    return target  # type: ignore[no-any-return]


class PythonWorker(BaseWorker):
    type = "python"
    description = (
        "Calls config.callable ('module:function', sync or async) with the step's config (and "
        "a context with the step's attempt, if it takes a second argument or `context`); "
        "returning is success, raising is failure. No children."
    )
    spawns_children = False

    def validate_config(self, config: Mapping[str, Any]) -> None:
        """Checks the module can be found without running it: the import (and any side effects
        it has) happens when the step runs, not when the job is submitted."""
        value = get_str(config, "callable", required=True)
        assert value is not None
        module_name, _ = parse_target(value)
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError) as exc:
            raise InvalidArgument(f"callable: cannot find module {module_name!r}: {exc}") from None
        if spec is None:
            raise InvalidArgument(f"callable: no module named {module_name!r}")

    async def run(self, ctx: StepContext) -> StepResult:
        value = get_str(ctx.config, "callable", required=True)
        assert value is not None
        try:
            function = resolve(value)
        except InvalidArgument as exc:
            return StepResult.failure(str(exc))
        context = CallContext(ctx.step_id, ctx.step_name, ctx.attempt)
        async with python_output.captured(ctx):
            call = asyncio.ensure_future(_call(function, dict(ctx.config), context))
            cancel_seen = asyncio.ensure_future(ctx.cancelled.wait())
            try:
                await asyncio.wait({call, cancel_seen}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cancel_seen.cancel()
                interrupted = not call.done()
                if interrupted:
                    call.cancel()
                    await asyncio.wait({call}, timeout=CANCEL_GRACE_S)
        if interrupted or call.cancelled():
            return StepResult.stopped("cancelled while running")
        error = call.exception()
        if error is not None:
            return StepResult.failure(f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])
        return StepResult.success()


async def _call(function: Callable[..., Any], config: dict[str, Any], context: CallContext) -> None:
    args: tuple[Any, ...] = (config,)
    kwargs: dict[str, Any] = {}
    if wants_context(function):
        named = "context" in inspect.signature(function).parameters
        if named:
            kwargs["context"] = context
        else:
            args = (config, context)
    if inspect.iscoroutinefunction(function):
        result = await function(*args, **kwargs)
    else:
        # A thread keeps a blocking function from stalling every other step. Python cannot
        # stop a thread: on cancellation the step returns and the call runs on unobserved.
        result = await asyncio.to_thread(function, *args, **kwargs)
    if inspect.isawaitable(result):  # e.g. an object whose __call__ is async
        await result
