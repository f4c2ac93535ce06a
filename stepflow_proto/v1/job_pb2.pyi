import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_MANAGER: _ClassVar[JobKind]
    JOB_KIND_STEP: _ClassVar[JobKind]
    JOB_KIND_CHILD: _ClassVar[JobKind]

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    JOB_STATUS_PENDING: _ClassVar[JobStatus]
    JOB_STATUS_RUNNING: _ClassVar[JobStatus]
    JOB_STATUS_SPAWNED: _ClassVar[JobStatus]
    JOB_STATUS_COMPLETED: _ClassVar[JobStatus]
    JOB_STATUS_FAILED: _ClassVar[JobStatus]
    JOB_STATUS_CANCELLED: _ClassVar[JobStatus]
    JOB_STATUS_SKIPPED: _ClassVar[JobStatus]

class ChildEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHILD_EVENT_KIND_UNSPECIFIED: _ClassVar[ChildEventKind]
    CHILD_EVENT_KIND_CREATED: _ClassVar[ChildEventKind]
    CHILD_EVENT_KIND_RUNNING: _ClassVar[ChildEventKind]
    CHILD_EVENT_KIND_COMPLETED: _ClassVar[ChildEventKind]
    CHILD_EVENT_KIND_FAILED: _ClassVar[ChildEventKind]
    CHILD_EVENT_KIND_CANCELLED: _ClassVar[ChildEventKind]
    CHILD_EVENT_KIND_SEALED: _ClassVar[ChildEventKind]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_MANAGER: JobKind
JOB_KIND_STEP: JobKind
JOB_KIND_CHILD: JobKind
JOB_STATUS_UNSPECIFIED: JobStatus
JOB_STATUS_PENDING: JobStatus
JOB_STATUS_RUNNING: JobStatus
JOB_STATUS_SPAWNED: JobStatus
JOB_STATUS_COMPLETED: JobStatus
JOB_STATUS_FAILED: JobStatus
JOB_STATUS_CANCELLED: JobStatus
JOB_STATUS_SKIPPED: JobStatus
CHILD_EVENT_KIND_UNSPECIFIED: ChildEventKind
CHILD_EVENT_KIND_CREATED: ChildEventKind
CHILD_EVENT_KIND_RUNNING: ChildEventKind
CHILD_EVENT_KIND_COMPLETED: ChildEventKind
CHILD_EVENT_KIND_FAILED: ChildEventKind
CHILD_EVENT_KIND_CANCELLED: ChildEventKind
CHILD_EVENT_KIND_SEALED: ChildEventKind

class ChildCounts(_message.Message):
    __slots__ = ("pending", "running", "completed", "failed", "cancelled")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int
    def __init__(self, pending: _Optional[int] = ..., running: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class StepStat(_message.Message):
    __slots__ = ("step_index", "step_id", "step_name", "step_type", "child_count", "document_count", "status", "error", "children")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHILD_COUNT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    step_id: str
    step_name: str
    step_type: str
    child_count: int
    document_count: int
    status: JobStatus
    error: str
    children: ChildCounts
    def __init__(self, step_index: _Optional[int] = ..., step_id: _Optional[str] = ..., step_name: _Optional[str] = ..., step_type: _Optional[str] = ..., child_count: _Optional[int] = ..., document_count: _Optional[int] = ..., status: _Optional[_Union[JobStatus, str]] = ..., error: _Optional[str] = ..., children: _Optional[_Union[ChildCounts, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "parent_id", "manager_id", "name", "type", "status", "error", "end_reason", "metadata", "version", "change_seq", "step_stats", "created_at", "started_at", "finished_at", "deadline", "owner", "attempt", "interruptions", "definition", "runner")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    MANAGER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGE_SEQ_FIELD_NUMBER: _ClassVar[int]
    STEP_STATS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTIONS_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    RUNNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobKind
    parent_id: str
    manager_id: str
    name: str
    type: str
    status: JobStatus
    error: str
    end_reason: str
    metadata: _struct_pb2.Struct
    version: int
    change_seq: int
    step_stats: _containers.RepeatedCompositeFieldContainer[StepStat]
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    owner: str
    attempt: int
    interruptions: int
    definition: _struct_pb2.Struct
    runner: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., parent_id: _Optional[str] = ..., manager_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., error: _Optional[str] = ..., end_reason: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., version: _Optional[int] = ..., change_seq: _Optional[int] = ..., step_stats: _Optional[_Iterable[_Union[StepStat, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner: _Optional[str] = ..., attempt: _Optional[int] = ..., interruptions: _Optional[int] = ..., definition: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., runner: _Optional[str] = ...) -> None: ...

class ChildEvent(_message.Message):
    __slots__ = ("event_id", "step_id", "child_id", "kind", "error", "child_count", "handed_to_monitor", "occurred_at", "name", "attempt", "runner", "claim_id", "runner_lost")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHILD_COUNT_FIELD_NUMBER: _ClassVar[int]
    HANDED_TO_MONITOR_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RUNNER_FIELD_NUMBER: _ClassVar[int]
    CLAIM_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNER_LOST_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    step_id: str
    child_id: str
    kind: ChildEventKind
    error: str
    child_count: int
    handed_to_monitor: bool
    occurred_at: _timestamp_pb2.Timestamp
    name: str
    attempt: int
    runner: str
    claim_id: str
    runner_lost: bool
    def __init__(self, event_id: _Optional[str] = ..., step_id: _Optional[str] = ..., child_id: _Optional[str] = ..., kind: _Optional[_Union[ChildEventKind, str]] = ..., error: _Optional[str] = ..., child_count: _Optional[int] = ..., handed_to_monitor: _Optional[bool] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., name: _Optional[str] = ..., attempt: _Optional[int] = ..., runner: _Optional[str] = ..., claim_id: _Optional[str] = ..., runner_lost: _Optional[bool] = ...) -> None: ...

class JobLogLine(_message.Message):
    __slots__ = ("seq", "time", "step_id", "child_id", "attempt", "source", "level", "message", "truncated")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: _timestamp_pb2.Timestamp
    step_id: str
    child_id: str
    attempt: int
    source: str
    level: str
    message: str
    truncated: bool
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step_id: _Optional[str] = ..., child_id: _Optional[str] = ..., attempt: _Optional[int] = ..., source: _Optional[str] = ..., level: _Optional[str] = ..., message: _Optional[str] = ..., truncated: _Optional[bool] = ...) -> None: ...

class JobLogEntry(_message.Message):
    __slots__ = ("key", "step_id", "child_id", "attempt", "source", "level", "message", "time")
    KEY_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    key: str
    step_id: str
    child_id: str
    attempt: int
    source: str
    level: str
    message: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, key: _Optional[str] = ..., step_id: _Optional[str] = ..., child_id: _Optional[str] = ..., attempt: _Optional[int] = ..., source: _Optional[str] = ..., level: _Optional[str] = ..., message: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
