"""The step-progress half of the unit of work (``tx.Tx``): each step's live child counts and
seal, read once per transaction, changed in place by the units, written at flush."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from monitor_svc.records import Progress
from monitor_svc.store.statements import (
    SELECT_MANAGER_PROGRESS,
    SELECT_PROGRESS,
    SELECT_PROGRESS_LOCKED,
    row_to_progress,
)
from monitor_svc.store.tx_leases import MISSING as _MISSING
from stepflow_common.step_outcome import ChildTally


class ProgressRows:
    """Step progress rows as ``Tx`` caches them (set up by ``Tx``)."""

    conn: Connection
    _lock_rows: bool
    _undo: list[tuple[str, Any, Any]]
    _progress: dict[str, Progress | None]
    _progress_dirty: set[str]
    _progress_new: set[str]
    _manager_steps: dict[str, set[str]]
    _unit_progress: set[str]
    _tallies: dict[str, tuple[int, dict[str, ChildTally]]]
    _progress_epoch: int
    _unit_writes_progress: bool

    if TYPE_CHECKING:  # ``LeaseRows``'s, on ``Tx``

        def _note_deadline(self, when: datetime) -> None: ...

    # -- progress ----------------------------------------------------------------------------
    def progress(self, step_id: str) -> Progress | None:
        if step_id in self._progress:
            return self._progress[step_id]
        stmt = SELECT_PROGRESS_LOCKED if self._lock_rows else SELECT_PROGRESS
        row = self.conn.execute(stmt, {"step_id": step_id}).first()
        progress = row_to_progress(row) if row is not None else None
        self._progress[step_id] = progress
        return progress

    def load_manager_progress(self, manager_id: str) -> None:
        """All of a manager's step progress rows into the cache, in one query per transaction."""
        if manager_id in self._manager_steps:
            return
        steps = self._manager_steps[manager_id] = set()
        for row in self.conn.execute(SELECT_MANAGER_PROGRESS, {"manager_id": manager_id}):
            steps.add(row.step_id)
            if row.step_id not in self._progress:
                self._progress[row.step_id] = row_to_progress(row)

    def tallies_for_manager(self, manager_id: str) -> dict[str, ChildTally]:
        """Live counts of a manager's steps as this transaction sees them (never changed
        after they are returned: the answers of several units share them)."""
        hit = self._tallies.get(manager_id)
        if hit is not None and hit[0] == self._progress_epoch and not self._unit_writes_progress:
            return hit[1]
        self.load_manager_progress(manager_id)
        tallies = {}
        for step_id in self._manager_steps[manager_id]:
            progress = self._progress.get(step_id)
            if progress is not None:
                tallies[step_id] = progress.tally()
        if not self._unit_writes_progress:  # its rows may still change in place
            self._tallies[manager_id] = (self._progress_epoch, tallies)
        return tallies

    def working_progress(self, step_id: str, manager_id: str) -> Progress:
        """A step's progress that the current unit may change in place: copied on the unit's
        first write (so a unit that fails can be undone), the same object after that."""
        current = self.progress(step_id)
        if current is not None and step_id in self._unit_progress:
            return current
        fresh = current.copy() if current is not None else Progress(step_id, manager_id)
        self.put_progress(fresh, new=current is None and step_id not in self._progress_new)
        self._unit_progress.add(step_id)
        return fresh

    def put_progress(self, progress: Progress, *, new: bool = False) -> None:
        self._progress_epoch += 1
        self._unit_writes_progress = True
        self._undo.append(
            ("progress", progress.step_id, self._progress.get(progress.step_id, _MISSING))
        )
        self._progress[progress.step_id] = progress
        self._progress_dirty.add(progress.step_id)
        steps = self._manager_steps.get(progress.manager_id)
        if steps is not None:
            steps.add(progress.step_id)
        if progress.grace_deadline is not None:
            self._note_deadline(progress.grace_deadline)
        if new:
            self._progress_new.add(progress.step_id)
