"""The domain's error vocabulary. Each maps to one gRPC status code in ``grpc_errors``."""

from __future__ import annotations


class StepflowError(Exception):
    """Base of every error the services report to callers."""


class InvalidArgument(StepflowError):
    """The request is malformed or names an impossible value."""


class NotFound(StepflowError):
    """The named job (or step entry) does not exist."""


class FailedPrecondition(StepflowError):
    """The job is not in a state this operation applies to."""


class StatusConflict(FailedPrecondition):
    """A terminal status cannot change, and statuses never move backwards."""


class VersionConflict(StepflowError):
    """expected_version is stale: someone else changed the job first."""

    @classmethod
    def stale(cls, job_id: str, expected: int, actual: int) -> VersionConflict:
        return cls(
            f"job {job_id} is at version {actual}, not the expected {expected}; "
            "re-read it and retry"
        )


class AlreadyExists(StepflowError):
    """A job with that identity exists and differs from the request."""


class Unavailable(StepflowError):
    """A dependency (database, monitor) cannot be reached right now; retry later."""


class ResourceExhausted(StepflowError):
    """A limit would be passed (document size, steps per manager); nothing was changed."""
