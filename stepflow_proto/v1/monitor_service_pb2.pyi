import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from stepflow_proto.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateJobRequest(_message.Message):
    __slots__ = ("request_id", "kind", "parent_id", "name", "type", "metadata", "timeout", "owner", "definition", "instance")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: _job_pb2.JobKind
    parent_id: str
    name: str
    type: str
    metadata: _struct_pb2.Struct
    timeout: _duration_pb2.Duration
    owner: str
    definition: _struct_pb2.Struct
    instance: str
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[_job_pb2.JobKind, str]] = ..., parent_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., owner: _Optional[str] = ..., definition: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., instance: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "include_definition")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    include_definition: bool
    def __init__(self, job_id: _Optional[str] = ..., include_definition: _Optional[bool] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("parent_id", "manager_id", "kind", "status", "created_after", "created_before", "page_size", "page_token", "owner")
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    MANAGER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    parent_id: str
    manager_id: str
    kind: _job_pb2.JobKind
    status: _job_pb2.JobStatus
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    owner: str
    def __init__(self, parent_id: _Optional[str] = ..., manager_id: _Optional[str] = ..., kind: _Optional[_Union[_job_pb2.JobKind, str]] = ..., status: _Optional[_Union[_job_pb2.JobStatus, str]] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_job_pb2.Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[_job_pb2.Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateJobStatusRequest(_message.Message):
    __slots__ = ("job_id", "status", "error", "end_reason", "owner", "instance")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: _job_pb2.JobStatus
    error: str
    end_reason: str
    owner: str
    instance: str
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[_Union[_job_pb2.JobStatus, str]] = ..., error: _Optional[str] = ..., end_reason: _Optional[str] = ..., owner: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class UpdateJobStatusResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class UpdateJobMetadataRequest(_message.Message):
    __slots__ = ("job_id", "metadata", "expected_version", "owner", "instance", "request_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    metadata: _struct_pb2.Struct
    expected_version: int
    owner: str
    instance: str
    request_id: str
    def __init__(self, job_id: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., expected_version: _Optional[int] = ..., owner: _Optional[str] = ..., instance: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateJobMetadataResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class UpdateStepStatInManagerRequest(_message.Message):
    __slots__ = ("manager_id", "step_id", "status", "owner", "instance")
    MANAGER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    manager_id: str
    step_id: str
    status: _job_pb2.JobStatus
    owner: str
    instance: str
    def __init__(self, manager_id: _Optional[str] = ..., step_id: _Optional[str] = ..., status: _Optional[_Union[_job_pb2.JobStatus, str]] = ..., owner: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class UpdateStepStatInManagerResponse(_message.Message):
    __slots__ = ("step_stat", "current_step_status_changed", "version")
    STEP_STAT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_STATUS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    step_stat: _job_pb2.StepStat
    current_step_status_changed: bool
    version: int
    def __init__(self, step_stat: _Optional[_Union[_job_pb2.StepStat, _Mapping]] = ..., current_step_status_changed: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class StreamChildEventsRequest(_message.Message):
    __slots__ = ("batch_id", "events", "owner", "traceparents", "instance", "log_lines")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENTS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LOG_LINES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    events: _containers.RepeatedCompositeFieldContainer[_job_pb2.ChildEvent]
    owner: str
    traceparents: _containers.RepeatedScalarFieldContainer[str]
    instance: str
    log_lines: _containers.RepeatedCompositeFieldContainer[_job_pb2.JobLogEntry]
    def __init__(self, batch_id: _Optional[int] = ..., events: _Optional[_Iterable[_Union[_job_pb2.ChildEvent, _Mapping]]] = ..., owner: _Optional[str] = ..., traceparents: _Optional[_Iterable[str]] = ..., instance: _Optional[str] = ..., log_lines: _Optional[_Iterable[_Union[_job_pb2.JobLogEntry, _Mapping]]] = ...) -> None: ...

class StreamChildEventsResponse(_message.Message):
    __slots__ = ("batch_id", "rejected")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedEvent]
    def __init__(self, batch_id: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectedEvent, _Mapping]]] = ...) -> None: ...

class RejectedEvent(_message.Message):
    __slots__ = ("event_id", "reason")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    reason: str
    def __init__(self, event_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_change_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_CHANGE_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_change_seq: int
    def __init__(self, job_id: _Optional[str] = ..., after_change_seq: _Optional[int] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("owner", "lease", "max_adopt", "instance", "worker_types", "running_job_ids")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    MAX_ADOPT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_TYPES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    owner: str
    lease: _duration_pb2.Duration
    max_adopt: int
    instance: str
    worker_types: _containers.RepeatedScalarFieldContainer[str]
    running_job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, owner: _Optional[str] = ..., lease: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_adopt: _Optional[int] = ..., instance: _Optional[str] = ..., worker_types: _Optional[_Iterable[str]] = ..., running_job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_expires_at", "owned_job_ids", "adopted_job_ids", "resumed_job_ids", "fenced_job_ids", "superseded_lease_remaining", "superseded_instance")
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    OWNED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    FENCED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_LEASE_REMAINING_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at: _timestamp_pb2.Timestamp
    owned_job_ids: _containers.RepeatedScalarFieldContainer[str]
    adopted_job_ids: _containers.RepeatedScalarFieldContainer[str]
    resumed_job_ids: _containers.RepeatedScalarFieldContainer[str]
    fenced_job_ids: _containers.RepeatedScalarFieldContainer[str]
    superseded_lease_remaining: _duration_pb2.Duration
    superseded_instance: str
    def __init__(self, lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owned_job_ids: _Optional[_Iterable[str]] = ..., adopted_job_ids: _Optional[_Iterable[str]] = ..., resumed_job_ids: _Optional[_Iterable[str]] = ..., fenced_job_ids: _Optional[_Iterable[str]] = ..., superseded_lease_remaining: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., superseded_instance: _Optional[str] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("owner", "instance", "job_ids", "reason")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    owner: str
    instance: str
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, owner: _Optional[str] = ..., instance: _Optional[str] = ..., job_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("orphaned_job_ids",)
    ORPHANED_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    orphaned_job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, orphaned_job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadJobLogRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "limit", "step_id", "child_id", "sources")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    limit: int
    step_id: str
    child_id: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ..., step_id: _Optional[str] = ..., child_id: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadJobLogResponse(_message.Message):
    __slots__ = ("lines", "next_seq", "complete", "last_seq")
    LINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[_job_pb2.JobLogLine]
    next_seq: int
    complete: bool
    last_seq: int
    def __init__(self, lines: _Optional[_Iterable[_Union[_job_pb2.JobLogLine, _Mapping]]] = ..., next_seq: _Optional[int] = ..., complete: _Optional[bool] = ..., last_seq: _Optional[int] = ...) -> None: ...

class FollowJobLogRequest(_message.Message):
    __slots__ = ("job_id", "after_seq", "limit", "step_id", "child_id", "sources")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    limit: int
    step_id: str
    child_id: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ..., step_id: _Optional[str] = ..., child_id: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class FollowJobLogResponse(_message.Message):
    __slots__ = ("lines", "next_seq", "complete")
    LINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[_job_pb2.JobLogLine]
    next_seq: int
    complete: bool
    def __init__(self, lines: _Optional[_Iterable[_Union[_job_pb2.JobLogLine, _Mapping]]] = ..., next_seq: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class AppendJobLogRequest(_message.Message):
    __slots__ = ("job_id", "lines")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lines: _containers.RepeatedCompositeFieldContainer[_job_pb2.JobLogEntry]
    def __init__(self, job_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[_job_pb2.JobLogEntry, _Mapping]]] = ...) -> None: ...

class AppendJobLogResponse(_message.Message):
    __slots__ = ("appended", "last_seq")
    APPENDED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    appended: int
    last_seq: int
    def __init__(self, appended: _Optional[int] = ..., last_seq: _Optional[int] = ...) -> None: ...
