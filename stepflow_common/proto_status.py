"""The one map between the domain's ``Kind``/``Status`` and their protobuf enums, for every
edge of both services (servicers, clients, tests)."""

from __future__ import annotations

from stepflow_common.status import LIVE, TERMINAL, Kind, Status
from stepflow_proto.v1 import job_pb2

KIND_TO_PB: dict[Kind, job_pb2.JobKind] = {
    Kind.MANAGER: job_pb2.JOB_KIND_MANAGER,
    Kind.STEP: job_pb2.JOB_KIND_STEP,
    Kind.CHILD: job_pb2.JOB_KIND_CHILD,
}
KIND_FROM_PB: dict[int, Kind] = {v: k for k, v in KIND_TO_PB.items()}
STATUS_TO_PB: dict[Status, job_pb2.JobStatus] = {
    Status.PENDING: job_pb2.JOB_STATUS_PENDING,
    Status.RUNNING: job_pb2.JOB_STATUS_RUNNING,
    Status.SPAWNED: job_pb2.JOB_STATUS_SPAWNED,
    Status.COMPLETED: job_pb2.JOB_STATUS_COMPLETED,
    Status.FAILED: job_pb2.JOB_STATUS_FAILED,
    Status.CANCELLED: job_pb2.JOB_STATUS_CANCELLED,
    Status.SKIPPED: job_pb2.JOB_STATUS_SKIPPED,
}
STATUS_FROM_PB: dict[int, Status] = {v: k for k, v in STATUS_TO_PB.items()}
TERMINAL_PB = frozenset(STATUS_TO_PB[s] for s in TERMINAL)
LIVE_PB = frozenset(STATUS_TO_PB[s] for s in LIVE)
