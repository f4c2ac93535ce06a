"""Worker types by name: the built-ins plus third-party workers from the ``stepflow.workers``
entry-point group.

A third-party package declares, in its pyproject.toml::

    [project.entry-points."stepflow.workers"]
    thumbnail = "acme_workers.thumbnail:ThumbnailWorker"   # a class or an instance

A plugin that cannot be loaded, is not a Worker, or reuses a type fails the load with
WorkerLoadError: an orchestrator that silently lacked a worker, or ran another worker's code
for a step, would fail jobs far from the cause.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib import metadata

import structlog

from orchestrator_svc.workers.base import Worker
from orchestrator_svc.workers.command import CommandWorker
from orchestrator_svc.workers.fanout import FanoutWorker
from orchestrator_svc.workers.python_call import PythonWorker
from orchestrator_svc.workers.simulate import SimulateWorker

ENTRY_POINT_GROUP = "stepflow.workers"

log = structlog.get_logger(__name__)


class WorkerLoadError(RuntimeError):
    """A ``stepflow.workers`` entry point is broken; the message names it."""


def builtin_workers() -> list[Worker]:
    return [CommandWorker(), FanoutWorker(), SimulateWorker(), PythonWorker()]


def load_registry(*, plugins: bool = True) -> dict[str, Worker]:
    """Every worker by type, built-ins first; ``plugins=False`` skips the entry points."""
    registry: dict[str, Worker] = {}
    for worker in builtin_workers():
        registry[worker.type] = worker
    if not plugins:
        return registry
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name!r} ({ep.value})"
        try:
            loaded = ep.load()
        except Exception as exc:
            raise WorkerLoadError(f"{where} cannot be loaded: {exc}") from exc
        worker = as_worker(loaded, where)
        if worker.type in registry:
            raise WorkerLoadError(f"{where}: worker type {worker.type!r} is already registered")
        registry[worker.type] = worker
        log.info("worker_plugin_loaded", type=worker.type, entry_point=ep.name, value=ep.value)
    return registry


def as_worker(obj: object, where: str = "worker") -> Worker:
    """``obj`` as a Worker: an instance as is, a class instantiated without arguments."""
    if inspect.isclass(obj):
        cls = obj
        try:
            obj = cls()
        except Exception as exc:
            raise WorkerLoadError(f"{where}: cannot instantiate {cls.__name__}: {exc}") from exc
    if not isinstance(obj, Worker):
        raise WorkerLoadError(
            f"{where}: {obj!r} is not a Worker "
            "(needs type, description, spawns_children, validate_config, async run)"
        )
    if not isinstance(obj.type, str) or not obj.type:
        raise WorkerLoadError(f"{where}: its type must be a non-empty string, got {obj.type!r}")
    if not inspect.iscoroutinefunction(obj.run):
        raise WorkerLoadError(f"{where}: run() must be an async function")
    _check_takes_one(where, "run", obj.run, "async def run(self, ctx)")
    _check_takes_one(where, "validate_config", obj.validate_config, "validate_config(self, config)")
    version = getattr(obj, "interface_version", None)
    if version is not None and version not in SUPPORTED_INTERFACE_VERSIONS:
        raise WorkerLoadError(
            f"{where}: interface_version {version!r} is not supported here (supported: "
            f"{', '.join(map(str, SUPPORTED_INTERFACE_VERSIONS))}); upgrade stepflow or the plugin"
        )
    return obj


SUPPORTED_INTERFACE_VERSIONS = (1, 2)
"""The worker interface's shapes this release runs: 1, ``run_one(index)`` as first documented;
2, ``run_one(index, attempt)`` (retries). Both are kept; a plugin may declare its own with a
class attribute ``interface_version``."""


def _check_takes_one(where: str, name: str, method: Callable[..., object], shape: str) -> None:
    """Refuse, at load time, a method that cannot be called with its one argument."""
    try:
        inspect.signature(method).bind(None)
    except TypeError:
        raise WorkerLoadError(
            f"{where}: {name}{inspect.signature(method)} cannot be called as {shape}; "
            f"change its signature to {shape}"
        ) from None
    except ValueError:
        return  # no signature to read (a builtin): it is called as documented
