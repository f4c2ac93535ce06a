"""The job lifecycle: every rule of a job's life, from creation to its end, in one place.

``rules`` holds the rules as plain functions over a ``UnitOfWork`` (``uow``); the store runs
them in its SQL transactions, ``memory`` runs them over dicts (the rules' own tests);
``leases`` holds the rules of orchestrators coming and going (leases, adoption, fencing).
Neither SQL nor gRPC is imported here.
"""

from monitor_svc.lifecycle import leases
from monitor_svc.lifecycle.rules import (
    StepStatResult,
    StepTimers,
    apply_events,
    create_job,
    deadline_after,
    fire_due,
    set_status,
    update_metadata,
    update_status,
    update_step_stat,
)
from monitor_svc.lifecycle.uow import UnitOfWork

__all__ = [
    "StepStatResult",
    "StepTimers",
    "UnitOfWork",
    "apply_events",
    "create_job",
    "deadline_after",
    "fire_due",
    "leases",
    "set_status",
    "update_metadata",
    "update_status",
    "update_step_stat",
]
