"""The unit of work the lifecycle rules run against: what they may read and write, nothing more.

``store.tx.Tx`` implements it over SQL (one group transaction shared by several units);
``lifecycle.memory`` implements it over dicts. The rules never see a connection or a table.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from monitor_svc.log_lines import LogLine
from monitor_svc.records import InstanceRecord, JobState, Lease, Progress
from stepflow_common.step_outcome import ChildTally


class UnitOfWork(Protocol):
    """Reads see this unit's own writes. A unit that raises a domain error leaves no trace."""

    @property
    def now(self) -> datetime:
        """The time of this transaction: every stamp and deadline a unit writes uses it."""
        ...

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: str) -> JobState | None:
        """A job, locked for this transaction."""
        ...

    def cached_job(self, job_id: str) -> JobState | None:
        """A job already read in this transaction (``child_states`` loads a batch's children)."""
        ...

    def job_by_request_id(self, request_id: str) -> JobState | None: ...

    def child_states(self, child_ids: Iterable[str]) -> dict[str, JobState]:
        """Load many children at once; later ``cached_job`` calls find them (or their absence)."""
        ...

    def children_of(self, step_id: str, *, live_only: bool) -> list[JobState]:
        """A job's direct children (a manager's steps, a step's children), locked."""
        ...

    def live_children_of_manager(self, manager_id: str) -> list[JobState]:
        """Every live child under a manager, whichever of its steps it belongs to, locked
        (an ended manager ends them all, even those under steps that had already ended)."""
        ...

    def put(self, state: JobState, *, status_only: bool = False) -> None:
        """Replace a job with its new state (it gets this transaction's change_seq).
        ``status_only``: only the status columns changed (a child event)."""
        ...

    def insert(self, state: JobState) -> None: ...

    def touch(self, job_id: str) -> None:
        """Give a job this transaction's change_seq without changing its row."""
        ...

    def log(self, line: LogLine) -> None:
        """Add a line to its manager's job log, written with this unit (gone if it raises).
        ``put`` writes the lines a job's change calls for (``log_lines.describe_change``)."""
        ...

    def stored_log_keys(self, manager_id: str, keys: list[str]) -> set[str]:
        """Those of ``keys`` the manager's log holds already (or this transaction adds)."""
        ...

    def metadata_write(self, job_id: str, request_id: str) -> int | None:
        """The version a keyed metadata write left the job at, if it was applied."""
        ...

    def record_metadata_write(self, job_id: str, request_id: str, version: int) -> None:
        """Remember a keyed metadata write (written with the job it changed)."""
        ...

    # -- a step's child counts and seal --------------------------------------------------------
    def progress(self, step_id: str) -> Progress | None: ...

    def working_progress(self, step_id: str, manager_id: str) -> Progress:
        """The step's progress, to change in place within this unit (created if missing)."""
        ...

    def put_progress(self, progress: Progress, *, new: bool = False) -> None: ...

    def load_manager_progress(self, manager_id: str) -> None:
        """A hint: every progress row of the manager is about to be read."""
        ...

    def tallies_for_manager(self, manager_id: str) -> dict[str, ChildTally]: ...

    # -- the clock's work ----------------------------------------------------------------------
    def due_jobs(self) -> list[str]:
        """Live jobs whose deadline is at or before ``now`` (claimed by this transaction)."""
        ...

    def due_graces(self) -> list[str]:
        """Steps whose hand-off grace period ended at or before ``now``."""
        ...

    # -- leases and the managers they hold -------------------------------------------------------
    def lease(self, owner: str) -> Lease | None:
        """An owner's lease, locked for this transaction."""
        ...

    def put_lease(self, lease: Lease) -> None:
        """Take or renew a lease (its expiry is a deadline the timer fires)."""
        ...

    def delete_lease(self, owner: str) -> None: ...

    def live_leases(self) -> list[Lease]:
        """Every lease that has not expired at ``now`` (not locked)."""
        ...

    def instance_record(self, owner: str, instance: str) -> InstanceRecord | None:
        """An orchestrator instance that has held a lease (written at once, never undone:
        call it only where the unit raises no more)."""
        ...

    def add_instance(self, record: InstanceRecord) -> None:
        """Remember a new instance of its owner (written at once, see ``instance_record``)."""
        ...

    def supersede_instances(self, owner: str, by_instance: str) -> None:
        """Mark every other instance of ``owner`` superseded by ``by_instance``, for good."""
        ...

    def live_managers(self, owner: str) -> list[JobState]:
        """The owner's unfinished managers, locked, oldest first."""
        ...

    def live_manager_ids(self, owner: str, limit: int) -> list[str]:
        """Ids of the owner's unfinished managers, oldest first (not locked)."""
        ...

    def orphans(self, limit: int) -> list[JobState]:
        """Up to ``limit`` unfinished managers orphaned by a lost lease, oldest first, locked;
        one another transaction already holds is skipped, so two monitors never hand one
        orphan to two callers."""
        ...

    def due_leases(self) -> list[str]:
        """Owners whose lease expired at or before ``now`` (claimed by this transaction)."""
        ...

    def due_orphans(self) -> list[str]:
        """Orphaned managers whose orphan deadline is at or before ``now`` (claimed)."""
        ...

    def definition_of(self, manager_id: str) -> dict[str, Any] | None:
        """The job definition stored with a manager (not part of the job as read)."""
        ...
