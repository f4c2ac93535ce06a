"""Step workers: the Worker contract (``base``), the built-ins, and the registry that adds
third-party workers from the ``stepflow.workers`` entry-point group."""

from orchestrator_svc.workers.base import (
    BaseWorker,
    CancelSignal,
    ChildStatus,
    StepContext,
    StepResult,
    Worker,
)

__all__ = ["BaseWorker", "CancelSignal", "ChildStatus", "StepContext", "StepResult", "Worker"]
