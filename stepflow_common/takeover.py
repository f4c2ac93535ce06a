"""What both services agree on when an orchestrator is lost and another continues its jobs."""

from __future__ import annotations

MAX_INTERRUPTIONS = 3
"""A child (or a step without children) interrupted this often fails instead of running again."""

LOST_WHILE_RUNNING = "its orchestrator was lost while it ran"
"""The error of a child or step that ends ``orchestrator_lost`` because it was interrupted."""

MAX_OWNED_IDS = 10_000
"""The monitor lists at most this many of an orchestrator's jobs in a heartbeat's answer; an
orchestrator that gets this many knows the list is cut (``fenced_job_ids`` still says which of
the jobs it runs are no longer its own)."""
