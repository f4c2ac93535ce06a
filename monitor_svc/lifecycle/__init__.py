"""The job lifecycle: every rule of a job's life, from creation to its end, in one place.

``rules`` holds the rules as plain functions over a ``UnitOfWork`` (``uow``): the one place a
status changes and its cascades, a child's change reaching its step, the deadlines.
``api_units`` holds the units the API calls, ``child_events`` those of the child-event stream,
``leases`` those of orchestrators coming and going (leases, instances, adoption), and
``fencing`` who may still write to a job. The store runs them in its SQL transactions;
``memory`` runs them over dicts (the rules' own tests). Neither SQL nor gRPC is imported here.
"""

from monitor_svc.lifecycle import fencing, leases, log_units, rules
from monitor_svc.lifecycle.api_units import (
    create_job,
    update_metadata,
    update_status,
    update_step_stat,
)
from monitor_svc.lifecycle.child_events import apply_events
from monitor_svc.lifecycle.rules import StepStatResult, StepTimers, deadline_after, set_status
from monitor_svc.lifecycle.uow import UnitOfWork


def fire_due(tx: UnitOfWork, timers: StepTimers) -> int:
    """The clock's work in one unit: the jobs' and hand-offs' deadlines, then the leases'."""
    return rules.fire_due(tx, timers) + leases.fire_due(tx, timers)


__all__ = [
    "StepStatResult",
    "StepTimers",
    "UnitOfWork",
    "apply_events",
    "create_job",
    "deadline_after",
    "fencing",
    "fire_due",
    "leases",
    "log_units",
    "set_status",
    "update_metadata",
    "update_status",
    "update_step_stat",
]
