"""The domain's error vocabulary. Each maps to one gRPC status code in ``grpc_errors``, and
travels with a stable ``reason`` and its data (``details``), so a client rebuilds the same
error without reading the message text."""

from __future__ import annotations

from typing import ClassVar


class StepflowError(Exception):
    """Base of every error the services report to callers."""

    reason: ClassVar[str] = "STEPFLOW_ERROR"

    def details(self) -> dict[str, str]:
        """The error's data, as sent beside the status code."""
        return {}

    @classmethod
    def rebuild(cls, message: str, details: dict[str, str]) -> StepflowError:
        """The error a client raises from a status's message and details."""
        return cls(message)


class InvalidArgument(StepflowError):
    """The request is malformed or names an impossible value."""

    reason = "INVALID_ARGUMENT"


class NotFound(StepflowError):
    """The named job (or step entry) does not exist."""

    reason = "NOT_FOUND"


class FailedPrecondition(StepflowError):
    """The job is not in a state this operation applies to."""

    reason = "FAILED_PRECONDITION"


class StatusConflict(FailedPrecondition):
    """A terminal status cannot change, and statuses never move backwards."""

    reason = "STATUS_CONFLICT"

    def __init__(self, current: str, requested: str, message: str = "") -> None:
        super().__init__(message or f"cannot change status {current} to {requested}")
        self.current = current
        self.requested = requested

    def details(self) -> dict[str, str]:
        return {"current": self.current, "requested": self.requested}

    @classmethod
    def rebuild(cls, message: str, details: dict[str, str]) -> StepflowError:
        return cls(details.get("current", ""), details.get("requested", ""), message)


# How an event stream's ack words the rejection of an event whose job another orchestrator
# owns now (or none does): an ack's rejection is a string, so it is told by this prefix; a
# refused write says so by its error's reason instead (``Fenced``).
FENCED_PREFIX = "fenced: "
STALE_CLAIM = "is stale"
"""In the monitor's refusal of a runner's claim on an attempt that has already run: the runner
reads the child's record and claims the next one."""


class Fenced(FailedPrecondition):
    """A write naming an orchestrator that no longer owns the job: another one adopted it (or
    none holds it). The writer must stop its work on that job without writing more for it."""

    reason = "FENCED"


class VersionConflict(StepflowError):
    """expected_version is stale: someone else changed the job first."""

    reason = "VERSION_CONFLICT"

    @classmethod
    def stale(cls, job_id: str, expected: int, actual: int) -> VersionConflict:
        return cls(
            f"job {job_id} is at version {actual}, not the expected {expected}; "
            "re-read it and retry"
        )


class AlreadyExists(StepflowError):
    """A job with that identity exists and differs from the request."""

    reason = "ALREADY_EXISTS"


class Unavailable(StepflowError):
    """A dependency (database, monitor) cannot be reached right now; retry later."""

    reason = "UNAVAILABLE"


class ResourceExhausted(StepflowError):
    """A limit would be passed (document size, steps per manager); nothing was changed."""

    reason = "RESOURCE_EXHAUSTED"


class Unauthenticated(StepflowError):
    """The service refused the call's credentials (a missing or wrong bearer token)."""

    reason = "UNAUTHENTICATED"


class DeadlineExceeded(StepflowError):
    """The call did not finish within its deadline; it may or may not have taken effect."""

    reason = "DEADLINE_EXCEEDED"
