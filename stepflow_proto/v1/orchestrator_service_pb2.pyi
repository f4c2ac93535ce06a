import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from stepflow_proto.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OnError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_ERROR_UNSPECIFIED: _ClassVar[OnError]
    ON_ERROR_CONTINUE: _ClassVar[OnError]
    ON_ERROR_FAIL: _ClassVar[OnError]
    ON_ERROR_FATAL: _ClassVar[OnError]

class ErrorToleranceAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_TOLERANCE_ACTION_UNSPECIFIED: _ClassVar[ErrorToleranceAction]
    ERROR_TOLERANCE_ACTION_FAIL: _ClassVar[ErrorToleranceAction]
    ERROR_TOLERANCE_ACTION_CONTINUE: _ClassVar[ErrorToleranceAction]

class OnInterrupt(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_INTERRUPT_UNSPECIFIED: _ClassVar[OnInterrupt]
    ON_INTERRUPT_RERUN: _ClassVar[OnInterrupt]
    ON_INTERRUPT_FAIL: _ClassVar[OnInterrupt]

class Executor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTOR_UNSPECIFIED: _ClassVar[Executor]
    EXECUTOR_LOCAL: _ClassVar[Executor]
    EXECUTOR_CELERY: _ClassVar[Executor]
ON_ERROR_UNSPECIFIED: OnError
ON_ERROR_CONTINUE: OnError
ON_ERROR_FAIL: OnError
ON_ERROR_FATAL: OnError
ERROR_TOLERANCE_ACTION_UNSPECIFIED: ErrorToleranceAction
ERROR_TOLERANCE_ACTION_FAIL: ErrorToleranceAction
ERROR_TOLERANCE_ACTION_CONTINUE: ErrorToleranceAction
ON_INTERRUPT_UNSPECIFIED: OnInterrupt
ON_INTERRUPT_RERUN: OnInterrupt
ON_INTERRUPT_FAIL: OnInterrupt
EXECUTOR_UNSPECIFIED: Executor
EXECUTOR_LOCAL: Executor
EXECUTOR_CELERY: Executor

class ErrorTolerance(_message.Message):
    __slots__ = ("max_child_failures", "action")
    MAX_CHILD_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    max_child_failures: int
    action: ErrorToleranceAction
    def __init__(self, max_child_failures: _Optional[int] = ..., action: _Optional[_Union[ErrorToleranceAction, str]] = ...) -> None: ...

class StepDefinition(_message.Message):
    __slots__ = ("name", "type", "config", "on_error", "depends_on", "wait", "timeout", "retries", "retry_backoff", "on_interrupt", "executor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRY_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    ON_INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    config: _struct_pb2.Struct
    on_error: OnError
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    wait: bool
    timeout: _duration_pb2.Duration
    retries: int
    retry_backoff: _duration_pb2.Duration
    on_interrupt: OnInterrupt
    executor: Executor
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., on_error: _Optional[_Union[OnError, str]] = ..., depends_on: _Optional[_Iterable[str]] = ..., wait: _Optional[bool] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retries: _Optional[int] = ..., retry_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., on_interrupt: _Optional[_Union[OnInterrupt, str]] = ..., executor: _Optional[_Union[Executor, str]] = ...) -> None: ...

class JobDefinition(_message.Message):
    __slots__ = ("name", "timeout", "error_tolerance", "config", "steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    timeout: _duration_pb2.Duration
    error_tolerance: ErrorTolerance
    config: _struct_pb2.Struct
    steps: _containers.RepeatedCompositeFieldContainer[StepDefinition]
    def __init__(self, name: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error_tolerance: _Optional[_Union[ErrorTolerance, _Mapping]] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[StepDefinition, _Mapping]]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("definition", "request_id")
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    definition: JobDefinition
    request_id: str
    def __init__(self, definition: _Optional[_Union[JobDefinition, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("manager_id",)
    MANAGER_ID_FIELD_NUMBER: _ClassVar[int]
    manager_id: str
    def __init__(self, manager_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _job_pb2.Job
    def __init__(self, job: _Optional[_Union[_job_pb2.Job, _Mapping]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("type", "description", "spawns_children")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SPAWNS_CHILDREN_FIELD_NUMBER: _ClassVar[int]
    type: str
    description: str
    spawns_children: bool
    def __init__(self, type: _Optional[str] = ..., description: _Optional[str] = ..., spawns_children: _Optional[bool] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...
