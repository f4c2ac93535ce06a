"""The manager's metadata document: the keys both services maintain (SPEC-fixed names, kept
from the system stepflow replaces so existing UIs keep working), and the documents the
orchestrator writes with them. The monitor's rules for the same keys are in
``monitor_svc.metadata_rules``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STEP_STATS = "step_stats"
"""Array in step order, one entry per step that has started or ended."""
CURRENT_STEP = "current_step"  # 1-based position
CURRENT_STEP_ID = "current_step_id"
CURRENT_STEP_NAME = "current_step_name"
CURRENT_STEP_TYPE = "current_step_type"
CURRENT_STEP_STATUS = "current_step_status"
COMPLETED_STEPS = "completed_steps"
"""How many steps have ended (any terminal status)."""
TOTAL_STEPS = "total_steps"
STEP_JOB_IDS = "step_job_ids"
"""Step name -> step job id."""
ERROR_TOLERANCE_EXCEEDED = "error_tolerance_exceeded"
"""Set (to the message) when a job with ``action = "continue"`` goes over its tolerance."""

# The keys of one ``step_stats`` entry.
STEP_INDEX = "step_index"  # 0-based; also a step job's own metadata key (its position)
STEP_ID = "step_id"
STEP_NAME = "step_name"
STEP_TYPE = "step_type"
CHILD_COUNT = "child_count"
DOCUMENT_COUNT = "document_count"
STATUS = "status"
ERROR = "error"


def job_started(step_job_ids: Mapping[str, str]) -> dict[str, Any]:
    """The document a job starts with: its steps by name, none ended yet."""
    return {
        TOTAL_STEPS: len(step_job_ids),
        COMPLETED_STEPS: 0,
        STEP_JOB_IDS: dict(step_job_ids),
    }


def step_started(
    index: int, step_id: str, name: str, step_type: str, status: str
) -> dict[str, Any]:
    """The write that shows a step started: its ``step_stats`` entry, and the current step."""
    return {
        STEP_STATS: [
            {
                STEP_INDEX: index,
                STEP_ID: step_id,
                STEP_NAME: name,
                STEP_TYPE: step_type,
                STATUS: status,
            }
        ],
        CURRENT_STEP: index + 1,
        CURRENT_STEP_ID: step_id,
        CURRENT_STEP_NAME: name,
        CURRENT_STEP_TYPE: step_type,
        CURRENT_STEP_STATUS: status,
    }
