"""What one broker message carries: a parcel of one step's children, by index, each with the
attempt it runs as first. Nothing else: the runner reads the step's type, config and retries
from the job's definition in the monitor (once per step), so a step of 100,000 items does not
send its items 100,000 times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_PARCEL = 32
"""At most this many children per message."""
SPREAD = 256
"""A window of a step's ``concurrency`` children is cut into at least this many messages (or
one per child), so it spreads over that many runner slots; above it children travel several
to a message, which is what lets thousands of short children a second through."""


def parcel_size(concurrency: int) -> int:
    """Children per message for a step run ``concurrency`` at a time."""
    return max(1, min(MAX_PARCEL, concurrency // SPREAD))


VERSION = 1
"""The parcel format this release writes and reads; a message names it as ``v``."""


class BadParcel(ValueError):
    """A message that is not a parcel (junk on the queue, or another program's task)."""


class NewerParcel(BadParcel):
    """A parcel of a format newer than this runner's: a newer runner can run it."""


@dataclass(frozen=True, slots=True)
class Parcel:
    manager_id: str
    step_id: str
    step_index: int
    children: tuple[tuple[int, int], ...]
    """(child index, the attempt it runs as first)."""

    def to_kwargs(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "manager_id": self.manager_id,
            "step_id": self.step_id,
            "step_index": self.step_index,
            "children": [list(c) for c in self.children],
        }

    @classmethod
    def from_kwargs(cls, kwargs: object) -> Parcel:
        """The parcel a message's kwargs describe; BadParcel, saying what is wrong, if none."""
        if not isinstance(kwargs, dict):
            raise BadParcel(f"expected an object, got {type(kwargs).__name__}")
        version = kwargs.get("v", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BadParcel(f"v: expected a format version >= 1, got {version!r}")
        if version > VERSION:
            raise NewerParcel(
                f"parcel format {version} is newer than this runner's ({VERSION}): upgrade "
                "stepflow on this runner's machine"
            )
        manager_id, step_id = kwargs.get("manager_id"), kwargs.get("step_id")
        step_index, children = kwargs.get("step_index"), kwargs.get("children")
        if not isinstance(manager_id, str) or not manager_id:
            raise BadParcel("manager_id: expected a job id")
        if not isinstance(step_id, str) or not step_id:
            raise BadParcel("step_id: expected a job id")
        if not isinstance(step_index, int) or isinstance(step_index, bool) or step_index < 0:
            raise BadParcel("step_index: expected a whole number >= 0")
        if not isinstance(children, list) or not 1 <= len(children) <= MAX_PARCEL:
            raise BadParcel(f"children: expected a list of 1 to {MAX_PARCEL} [index, attempt]")
        pairs: list[tuple[int, int]] = []
        for entry in children:
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
                or entry[0] < 0
                or entry[1] < 1
            ):
                raise BadParcel("children: expected [index >= 0, attempt >= 1] pairs")
            pairs.append((entry[0], entry[1]))
        return cls(manager_id, step_id, step_index, tuple(pairs))
