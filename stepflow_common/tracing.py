"""OpenTelemetry traces of both services, exported over OTLP/gRPC.

Off unless a ``serve`` command is given ``--otlp-endpoint``: then no tracer provider is
installed, no interceptor is added to a server or channel, and every hook here returns at its
first line (the API's no-op tracer is never even asked). ``setup`` turns it on for the
process: a ``TracerProvider`` named after the service, a ``BatchSpanProcessor`` sending to the
collector, and the OpenTelemetry gRPC interceptors on every server and channel made afterwards
(W3C ``traceparent`` in the call metadata). ``shutdown`` flushes what is buffered.

What the spans are, and how one job's spans from both services share one trace, is in
docs/design.md ("Tracing").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from stepflow_common.errors import InvalidArgument

T = TypeVar("T")

MONITOR_SERVICE = "stepflow-monitor"
ORCHESTRATOR_SERVICE = "stepflow-orchestrator"
TRACER_NAME = "stepflow"
# A collector that does not answer holds a graceful shutdown no longer than this.
EXPORT_TIMEOUT_S = 5.0
# How often buffered spans are sent (the SDK's default is 5 s).
EXPORT_DELAY_MS = 1000
# Probes call these every few seconds: their spans would bury the ones that matter.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")

# Span attribute names of stepflow's own spans (the RPC spans use the semantic conventions').
JOB_ID = "stepflow.job.id"
JOB_NAME = "stepflow.job.name"
JOB_STATUS = "stepflow.job.status"
STEP_ID = "stepflow.step.id"
STEP_NAME = "stepflow.step.name"
STEP_TYPE = "stepflow.step.type"
BATCH_ID = "stepflow.batch.id"
BATCH_EVENTS = "stepflow.batch.events"
COMMIT_UNITS = "stepflow.commit.units"
COMMIT_EVENTS = "stepflow.commit.events"

_provider: Any = None  # the SDK TracerProvider once ``setup`` ran; None: tracing is off
_propagator = TraceContextTextMapPropagator()
# step job id -> the W3C traceparent of its span, while the step runs (orchestrator).
_step_parents: dict[str, str] = {}
# In a StreamChildEvents batch: the span contexts a group commit links to besides the current
# span (the batch's other steps), and how many child events the batch holds.
_in_batch: ContextVar[tuple[tuple[SpanContext, ...], int]] = ContextVar(
    "stepflow_in_batch", default=((), 0)
)
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def check_endpoint(endpoint: str, flag: str = "--otlp-endpoint") -> str:
    """``endpoint`` as given ("" = off), or InvalidArgument unless it reads HOST:PORT (an
    ``http://`` or ``https://`` prefix is allowed: https means TLS to the collector)."""
    if not endpoint:
        return ""
    bare = endpoint.split("://", 1)[1] if "://" in endpoint else endpoint
    scheme = endpoint.split("://", 1)[0] if "://" in endpoint else ""
    host, _, port = bare.rstrip("/").rpartition(":")
    if scheme not in ("", "http", "https") or not host or not port.isdigit():
        raise InvalidArgument(
            f"{flag}: {endpoint!r} is not HOST:PORT of an OTLP/gRPC collector (e.g. 127.0.0.1:4317)"
        )
    return endpoint


def enabled() -> bool:
    return _provider is not None


def setup(endpoint: str, service_name: str) -> bool:
    """Trace this process to the OTLP/gRPC collector at ``endpoint``; "" leaves it off.

    Call before the servers and channels are made: they take their interceptors from here.
    """
    global _provider
    if not check_endpoint(endpoint) or _provider is not None:
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    exporter = OTLPSpanExporter(
        endpoint=endpoint,
        insecure=not endpoint.startswith("https://"),
        timeout=EXPORT_TIMEOUT_S,
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            schedule_delay_millis=EXPORT_DELAY_MS,
            export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
        )
    )
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def shutdown() -> None:
    """Send what is buffered (bounded by EXPORT_TIMEOUT_S) and stop exporting."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def _tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME, tracer_provider=_provider)


# -- gRPC interceptors -----------------------------------------------------------------------
def _traced(details: Any) -> bool:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not method.lstrip("/").startswith(UNTRACED_SERVICES)


def server_interceptors() -> list[Any]:
    """A server span per RPC, child of the caller's ``traceparent``; [] when off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_traced)]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any]:
    """A client span per call, its context sent as ``traceparent``; [] when off.

    Unary calls use the instrumentation's interceptors. Its streaming ones end their span only
    when the response iterator is closed, and a watch or stream that is cancelled may never
    be: these end it when the call itself is done, however it ended.
    """
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    unary = (aio.UnaryUnaryClientInterceptor, aio.StreamUnaryClientInterceptor)
    official = aio_client_interceptors(tracer_provider=_provider, filter_=_traced)  # type: ignore[no-untyped-call]
    return [
        *(i for i in official if isinstance(i, unary)),
        _UnaryStreamSpan(),
        _StreamStreamSpan(),
    ]


async def _streaming_call(continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
    if not _traced(details):
        return await continuation(details, request)
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    service, _, name = method.lstrip("/").partition("/")
    span = _tracer().start_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    metadata = aio.Metadata(*tuple(details.metadata or ()))
    _propagator.inject(metadata, context=trace.set_span_in_context(span))
    traced = aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )
    try:
        call = await continuation(traced, request)
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()
        raise
    call.add_done_callback(lambda done: _end_when_known(span, done))
    return call


def _end_when_known(span: trace.Span, call: Any) -> None:
    async def end() -> None:
        try:
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {await call.details()}"))
        finally:
            span.end()

    try:
        asyncio.get_running_loop().create_task(end())
    except RuntimeError:  # no loop any more (shutdown): end it as it is
        span.end()


# One class per call shape: grpc.aio files an interceptor under the first shape it implements.
class _UnaryStreamSpan(aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await _streaming_call(continuation, details, request)


class _StreamStreamSpan(aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await _streaming_call(continuation, details, request_iterator)


# -- the orchestrator's job and step spans ---------------------------------------------------
async def _in_span(
    name: str,
    attributes: dict[str, Any],
    work: Coroutine[Any, Any, T],
    remember_step: str = "",
    outcome: Callable[[T], dict[str, Any]] | None = None,
) -> T:
    with _tracer().start_as_current_span(name, attributes=attributes) as span:
        if remember_step:
            carrier: dict[str, str] = {}
            _propagator.inject(carrier)
            _step_parents[remember_step] = carrier.get("traceparent", "")
        try:
            result = await work
            if outcome is not None:
                span.set_attributes(outcome(result))
            return result
        finally:
            if remember_step:
                _step_parents.pop(remember_step, None)


def job_run(
    work: Coroutine[Any, Any, T], manager_id: str, name: str, outcome: Callable[[T], dict[str, Any]]
) -> Coroutine[Any, Any, T]:
    """``work`` (a job's run) inside a span ``job NAME``, child of the current span (the
    SubmitJob call for a new job, none for a continued one); ``work`` itself when off."""
    if _provider is None:
        return work
    attributes = {JOB_ID: manager_id, JOB_NAME: name}
    return _in_span(f"job {name}", attributes, work, outcome=outcome)


def step_run(
    work: Coroutine[Any, Any, T], step_id: str, name: str, worker_type: str, manager_id: str
) -> Coroutine[Any, Any, T]:
    """``work`` (a step's run) inside a span ``step NAME``, child of its job's span. While it
    runs, the event batches that carry this step's events name its span (``stamp_batch``)."""
    if _provider is None:
        return work
    attributes = {STEP_ID: step_id, STEP_NAME: name, STEP_TYPE: worker_type, JOB_ID: manager_id}
    return _in_span(f"step {name}", attributes, work, remember_step=step_id)


def stamp_batch(request: Any) -> None:
    """The event stream's ``on_send`` hook: name in ``request.traceparents`` the span of each
    step whose events the batch carries (stream metadata is sent once per stream, and a
    stream carries every job's events)."""
    if not _step_parents:
        return
    seen: list[str] = []
    for event in request.events:
        parent = _step_parents.get(event.step_id)
        if parent and parent not in seen:
            seen.append(parent)
    request.traceparents.extend(seen)


# -- the monitor's event batch and group commit spans ----------------------------------------
def _remote(traceparent: str) -> SpanContext | None:
    ctx = _propagator.extract({"traceparent": traceparent})
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


def event_batch(
    work: Coroutine[Any, Any, T], traceparents: Sequence[str], batch_id: int, events: int
) -> Coroutine[Any, Any, T]:
    """``work`` (one StreamChildEvents batch) inside a span per step it carries events of,
    each the child of that step's span in the orchestrator and linked to the stream's span
    (none when the batch names no span); ``work`` itself when off."""
    if _provider is None:
        return work
    parents = [p for p in (_remote(t) for t in traceparents[:16]) if p is not None]
    return _in_batch_spans(work, parents, batch_id, events)


async def _in_batch_spans(
    work: Coroutine[Any, Any, T], parents: list[SpanContext], batch_id: int, events: int
) -> T:
    stream = trace.get_current_span().get_span_context()
    links = [Link(stream)] if stream.is_valid else []
    attributes: dict[str, Any] = {
        "rpc.system": "grpc",
        "rpc.service": "stepflow.v1.MonitorService",
        "rpc.method": "StreamChildEvents",
        BATCH_ID: batch_id,
        BATCH_EVENTS: events,
    }
    tracer = _tracer()
    spans: list[trace.Span] = [
        tracer.start_span(
            "StreamChildEvents batch",
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        for parent in parents
    ]
    token = _in_batch.set((tuple(s.get_span_context() for s in spans[1:]), events))
    try:
        if not spans:
            return await work
        with trace.use_span(spans[0], end_on_exit=False, record_exception=True):
            return await work
    finally:
        _in_batch.reset(token)
        for span in spans:
            span.end()


def link_here() -> Any:
    """What a unit of work queued for the writer records of its caller for ``commit``: the
    spans to link to, and the child events it applies (a batch's). None when off."""
    if _provider is None:
        return None
    current = trace.get_current_span().get_span_context()
    others, events = _in_batch.get()
    return ((current, *others) if current.is_valid else others), events


def commit(units: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
    """A span around one group commit of ``units`` (each with the ``trace`` its ``link_here``
    gave), linked to the spans of the calls and batches it commits."""
    if _provider is None:
        return _NO_SPAN
    return _commit_span(len(units), [unit.trace for unit in units])


@contextlib.contextmanager
def _commit_span(units: int, callers: Iterable[Any]) -> Iterator[None]:
    seen: set[tuple[int, int]] = set()
    links: list[Link] = []
    events = 0
    for caller in callers:
        contexts, applied = caller or ((), 0)
        events += applied
        for span_context in contexts:
            key = (span_context.trace_id, span_context.span_id)
            if key not in seen and len(links) < 128:
                seen.add(key)
                links.append(Link(span_context))
    attributes = {COMMIT_UNITS: units, COMMIT_EVENTS: events}
    with _tracer().start_as_current_span("group commit", attributes=attributes, links=links):
        yield
