"""``orchestrator-svc runner``: a Celery worker that runs the children of executor-celery steps
and reports them straight to the monitor.

Threads: Celery's consumer (the main thread) takes messages; each of ``--concurrency`` pool
threads holds one message at a time and hands its parcel to one asyncio loop, where the
children run (their ``run_one``, their processes) and the client's event stream reports them.
A message is acknowledged only when its task returns, after its children's ends are
committed.

For every child: claim its attempt (a RUNNING event naming this runner and the message,
committed before the work starts), run it, report its end under the same claim. The monitor
refuses a claim a copy of the message makes, and an end that is no longer current. While a
child runs, this runner looks at its record every second: a child cancelled, or claimed by
another runner after this one was cut off, is stopped here (its process killed) and its
result dropped. Every process a child starts dies with this runner, kill -9 included
(``process_guard``), and also when the runner is frozen for half a broker heartbeat: by then
the broker may give its messages to another runner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog
from celery.exceptions import Reject
from kombu import Connection, Message

from orchestrator_svc.definitions import from_mapping
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.process_guard import ProcessGuard
from orchestrator_svc.remote import broker
from orchestrator_svc.remote.parcel import BadParcel, NewerParcel, Parcel
from orchestrator_svc.workers.base import (
    _ATTEMPT,
    RetryPolicy,
    StepContext,
    Worker,
    sleep_unless_cancelled,
)
from orchestrator_svc.workers.children import ChildOutcome
from orchestrator_svc.workers.registry import load_registry
from stepflow_client._events import ChildEventEmitter
from stepflow_common import serving
from stepflow_common.errors import STALE_CLAIM, InvalidArgument, NotFound, StepflowError
from stepflow_proto.v1 import job_pb2

log = structlog.get_logger("orchestrator_svc.runner")

DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 1024
WATCH_EVERY_S = 1.0
"""A running child's record is looked at this often (cancelled? claimed by another?)."""
WATCH_AFTER_S = 0.5
"""...once it has run this long (most children end before anyone needs to look)."""
STEP_CACHE = 256
CHATTY_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")


def default_name() -> str:
    return f"runner@{socket.gethostname()}:{os.getpid()}"


class Requeue(Exception):
    """A message to give back to the broker (requeued, not acknowledged)."""


class MonitorAway(Requeue):
    """The monitor could not be reached for a message."""


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    broker: broker.BrokerSettings
    monitor: str
    monitor_security: serving.Security = field(default_factory=serving.Security)
    keepalive: serving.ClientKeepalive = field(default_factory=serving.ClientKeepalive)
    concurrency: int = DEFAULT_CONCURRENCY
    name: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise InvalidArgument(
                f"--concurrency: between 1 and {MAX_CONCURRENCY}, got {self.concurrency}"
            )
        if self.broker.heartbeat_s <= 0:
            raise InvalidArgument(
                "--broker-heartbeat: must be above 0s (without heartbeats a frozen runner "
                "would keep its children's messages)"
            )


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a runner needs of a step, read once from the job's definition."""

    step_id: str
    name: str
    type: str
    config: dict[str, Any]
    retry: RetryPolicy


@dataclass(slots=True)
class Running:
    """One child running here: its attempt, its stop signal, and whether its claim is lost."""

    child_id: str
    attempt: int
    started: float
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    lost: str = ""  # why its result is dropped ("" while its claim holds)
    # Lost because this runner itself froze: its message goes back to the broker, which gives
    # it out again (the child's next attempt), instead of being acknowledged unended.
    requeue: bool = False


class _OneChild:
    """The ``dispatch`` of a runner's StepContext: ``run_children`` runs the one child (index,
    attempt) this runner claimed, with the worker's own ``run_one``, and nothing else."""

    def __init__(self, index: int, attempt: int) -> None:
        self.index = index
        self.attempt = attempt
        self.outcome: ChildOutcome | None = None

    async def __call__(
        self,
        ctx: StepContext,
        names: Iterable[str],
        run_one: Callable[[int, int], Awaitable[Any]],
        concurrency: int,
    ) -> int:
        token = _ATTEMPT.set(self.attempt)
        try:
            self.outcome = await run_one(self.index, self.attempt)
        except Exception as exc:
            self.outcome = ChildOutcome("failed", f"{type(exc).__name__}: {exc}")
        finally:
            _ATTEMPT.reset(token)
        return 1


class Runtime:
    """The asyncio side of a runner: its loop thread, its stream, its children."""

    def __init__(self, config: RunnerConfig, workers: dict[str, Worker]) -> None:
        self.config = config
        self.name = config.name or default_name()
        self.workers = workers
        self.loop = asyncio.new_event_loop()
        self.guard = ProcessGuard()
        self._thread = threading.Thread(target=self._run_loop, name="stepflow-runner", daemon=True)
        self._ready = threading.Event()
        self._steps: dict[str, StepInfo] = {}
        self._running: dict[str, Running] = {}
        self._rejections: dict[str, str] = {}
        self._stopping = threading.Event()
        # Written by the guard thread: its last renewal, and when it last found a gap.
        self._renewed_at = time.monotonic()
        self._froze_at = 0.0
        self.emitter: ChildEventEmitter
        self.monitor: MonitorClient

    # -- the loop thread -----------------------------------------------------------------------
    def start(self) -> None:
        self.guard.start()
        self._thread.start()
        self._ready.wait()
        threading.Thread(target=self._keep_guard, name="stepflow-guard", daemon=True).start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        with self.guard.active():
            self.loop.run_until_complete(self._open())
            self._ready.set()
            self.loop.run_forever()

    async def _open(self) -> None:
        def channel() -> Any:
            return serving.channel(
                self.config.monitor, self.config.monitor_security, self.config.keepalive
            )

        self._channel = channel()
        self.monitor = MonitorClient(self._channel)
        self.emitter = ChildEventEmitter(channel_factory=channel, on_rejected=self._rejected)
        self.emitter.start()
        self._watch = asyncio.create_task(self._watch_claims(), name="watch-claims")

    def _keep_guard(self) -> None:
        """The reaper kills this runner's processes once this renewal stops (the process frozen,
        or killed): within half a heartbeat, before the broker gives its messages to another
        runner. A plain thread, so a busy event loop does not count as frozen."""
        window = self.config.broker.heartbeat_s / 2
        last = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            if now - last > window:
                self._froze_at = now
                self.loop.call_soon_threadsafe(self._froze, now - last)
            self.guard.lease_until(now + window)
            last = self._renewed_at = now
            self._stopping.wait(max(window / 4, 0.05))
        self.guard.no_deadline()

    def _was_frozen(self, running: Running) -> bool:
        """Whether this runner froze while ``running`` ran (found by the guard, or about to be:
        after a freeze every thread wakes at once, and this one may come first)."""
        window = self.config.broker.heartbeat_s / 2
        return running.started < self._froze_at or time.monotonic() - self._renewed_at > window

    def _froze(self, gap_s: float) -> None:
        """This runner did not run for ``gap_s`` (stopped, or starved): the reaper has killed
        its children's processes, and the broker may have given their messages to another
        runner. What it held is stopped and given back; the monitor's claims sort out who
        runs each child next."""
        log.warning("this runner was frozen; its children stop here", frozen_s=round(gap_s, 1))
        for running in self._running.values():
            if not running.lost:
                running.lost = (
                    f"this runner was frozen {gap_s:.1f}s, past half its broker heartbeat"
                )
                running.requeue = True
                running.cancel.set()

    def call(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` on the loop from another thread and wait for its result; the processes
        it starts are this runner's (``process_guard``: the context is the calling thread's,
        so the guard is made current here)."""

        async def guarded() -> Any:
            with self.guard.active():
                return await coro

        future: Future[Any] = asyncio.run_coroutine_threadsafe(guarded(), self.loop)
        return future.result()

    def stop(self) -> None:
        self._stopping.set()

        async def close() -> None:
            self._watch.cancel()
            await self.emitter.close()
            await self._channel.close()

        if self.loop.is_running():
            self.call(close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    # -- a message -----------------------------------------------------------------------------
    async def run_parcel(self, kwargs: object, claim_id: str, redelivered: bool) -> None:
        """Run one message's children; return once their ends are committed.

        The parcel's children are claimed together (one commit), then run one after another
        in this slot; each shows ``running`` from its claim. A child cancelled, or claimed by
        another runner, before its turn is skipped."""
        try:
            parcel = Parcel.from_kwargs(kwargs)
        except NewerParcel as exc:
            # Back to the queue, for a newer runner (after its delivery limit, a dead letter).
            log.error("message from a newer stepflow; given back", claim_id=claim_id, why=str(exc))
            raise Requeue(str(exc)) from exc
        except BadParcel as exc:
            log.error(
                "message is not a parcel of children; dropped", claim_id=claim_id, why=str(exc)
            )
            return
        try:
            step = await self._step(parcel)
        except (NotFound, InvalidArgument) as exc:
            log.warning("message for a job the monitor does not have; dropped", why=str(exc))
            return
        except StepflowError as exc:
            # The monitor did not answer (it retries for two minutes first): the message goes
            # back to the broker for later, not acknowledged with its children never run.
            raise MonitorAway(str(exc)) from exc
        worker = self.workers.get(step.type)
        wanted: list[tuple[int, int, int]] = []  # (index, attempt, interruptions)
        for index, attempt in parcel.children:
            if redelivered:
                found = await self._attempt_after_loss(f"{step.step_id}.{index}", attempt)
                if found is not None:
                    wanted.append((index, *found))
            else:
                wanted.append((index, attempt, 0))
        claims = [
            (
                index,
                attempt,
                interruptions,
                self._claim_event(step.step_id, index, attempt, claim_id),
            )
            for index, attempt, interruptions in wanted
        ]
        refused = await self._claims(claims)
        # A claim refused as stale: the message came back without the broker saying so (or the
        # child ran meanwhile); the child's record says which attempt is next.
        for i, (index, attempt, _, event) in enumerate(claims):
            if STALE_CLAIM in refused[i]:
                found = await self._attempt_after_loss(event.child_id, attempt)
                if found is not None:
                    again = self._claim_event(step.step_id, index, found[0], claim_id)
                    claims[i] = (index, found[0], found[1], again)
                    (refused[i],) = await self._claims([claims[i]])
        now = time.monotonic()
        held: list[tuple[int, Running, int]] = []
        for (index, attempt, interruptions, event), why in zip(claims, refused, strict=True):
            if why:
                log.info("claim refused; child not run here", child_id=event.child_id, why=why)
                continue
            running = Running(event.child_id, attempt, now)
            self._running[event.child_id] = running
            held.append((index, running, interruptions))
        try:
            for index, running, interruptions in held:
                if running.lost:
                    await self._log_lost(step.step_id, running)
                    continue
                await self._run_child(step, worker, index, running, claim_id, interruptions)
        finally:
            for _, running, _ in held:
                self._running.pop(running.child_id, None)
                running.done.set()
        await self.emitter.flush()
        if any(running.requeue for _, running, _ in held):
            raise Requeue("this runner froze while it ran the message's children")

    async def _step(self, parcel: Parcel) -> StepInfo:
        cached = self._steps.get(parcel.step_id)
        if cached is not None:
            return cached
        manager = await self.monitor.get_job(parcel.manager_id, include_definition=True)
        spec = from_mapping(manager.definition or {})
        if not 0 <= parcel.step_index < len(spec.steps):
            raise NotFound(f"job {parcel.manager_id} has no step {parcel.step_index}")
        step_spec = spec.steps[parcel.step_index]
        info = StepInfo(
            parcel.step_id, step_spec.name, step_spec.type, dict(step_spec.config), step_spec.retry
        )
        if len(self._steps) >= STEP_CACHE:
            self._steps.pop(next(iter(self._steps)))
        self._steps[parcel.step_id] = info
        return info

    async def _attempt_after_loss(self, child_id: str, attempt: int) -> tuple[int, int] | None:
        """A redelivered message: the attempt to claim for ``child_id`` (and the runs its lost
        runners add to its last attempt), or None when it has ended."""
        mine = self._running.get(child_id)
        if mine is not None:
            # This runner was cut off from the broker and got its own message back: the run
            # it still has is stopped first (its end would be refused).
            mine.lost = "its message came back to this runner after a lost connection"
            mine.cancel.set()
            await mine.done.wait()
        child = await self.monitor.get_job(child_id)
        status = child.status
        if status is None or status.terminal:
            return None
        return max(attempt, child.attempt + 1), child.interruptions + 1

    async def _run_child(
        self,
        step: StepInfo,
        worker: Worker | None,
        index: int,
        running: Running,
        claim_id: str,
        interruptions: int,
    ) -> None:
        """Run a claimed child (its retries too, each claimed first); send its end."""
        child_id, attempt = running.child_id, running.attempt
        if worker is None:
            error = (
                f"runner {self.name} has no worker type {step.type!r}: install the plugin "
                "that provides it on the runner's machine"
            )
            await self._end(step.step_id, child_id, attempt, claim_id, "failed", error)
            return
        last = max(attempt, step.retry.last_attempt(interruptions))
        while True:
            running.started = time.monotonic()
            outcome = await self._run_once(step, worker, index, attempt, running)
            if not running.lost and self._was_frozen(running):
                running.lost = "this runner was frozen while the child ran"
                running.requeue = True
            if running.lost:
                await self._log_lost(step.step_id, running)
                return
            if outcome.status == "failed" and attempt < last:
                if not await sleep_unless_cancelled(
                    running.cancel, step.retry.delay_before(attempt + 1)
                ):
                    await self._log_lost(step.step_id, running)
                    return
                attempt += 1
                event = self._claim_event(step.step_id, index, attempt, claim_id)
                (why,) = await self._claims([(index, attempt, 0, event)])
                if why:
                    log.info("retry's claim refused", child_id=child_id, why=why)
                    return
                running.attempt = attempt
                continue
            await self._end(
                step.step_id, child_id, attempt, claim_id, outcome.status, outcome.error
            )
            return

    async def _log_lost(self, step_id: str, running: Running) -> None:
        """Say, here and in the job's log, that this runner stopped the child's attempt and
        dropped its result (it would not count)."""
        why = running.lost or "cancelled"
        log.warning(
            "child stopped here and its result dropped",
            child_id=running.child_id,
            attempt=running.attempt,
            why=why,
        )
        await self.emitter.log(
            step_id,
            f"runner {self.name} stopped attempt {running.attempt} and dropped its result: {why}",
            child_id=running.child_id,
            attempt=running.attempt,
            level="warning",
        )

    async def _run_once(
        self, step: StepInfo, worker: Worker, index: int, attempt: int, running: Running
    ) -> ChildOutcome:
        one = _OneChild(index, attempt)

        async def nothing(*_: Any) -> None:
            return None

        async def write_log(
            message: str,
            /,
            *,
            source: str = "log",
            level: str = "info",
            child_id: str = "",
            attempt: int = 0,
        ) -> None:
            if not running.lost:
                await self.emitter.log(
                    step.step_id,
                    message,
                    child_id=child_id,
                    attempt=attempt,
                    source=source,
                    level=level,
                )

        ctx = StepContext(
            step_id=step.step_id,
            step_name=step.name,
            config=step.config,
            child_created=nothing,
            child_running=nothing,
            child_finished=nothing,
            cancelled=running.cancel,
            child_cancel=lambda _child_id: running.cancel,
            retry=RetryPolicy(0, step.retry.backoff_s),
            write_log=write_log,
            dispatch=one,
        )
        try:
            await worker.run(ctx)
        except Exception as exc:
            if one.outcome is None:
                return ChildOutcome("failed", f"{type(exc).__name__}: {exc}")
        if one.outcome is None:
            return ChildOutcome(
                "failed",
                f"worker type {step.type!r} does not run its children through run_children, "
                "so they cannot run on a runner",
            )
        return one.outcome

    # -- the monitor ---------------------------------------------------------------------------
    def _claim_event(
        self, step_id: str, index: int, attempt: int, claim_id: str
    ) -> job_pb2.ChildEvent:
        return job_pb2.ChildEvent(
            kind=job_pb2.CHILD_EVENT_KIND_RUNNING,
            step_id=step_id,
            child_id=f"{step_id}.{index}",
            attempt=attempt,
            runner=self.name,
            claim_id=claim_id,
        )

    async def _claims(self, claims: list[tuple[int, int, int, job_pb2.ChildEvent]]) -> list[str]:
        """Send the claims and wait for their commit: per claim, "" if it was accepted, else
        why it was refused."""
        seq = 0
        for *_, event in claims:
            seq = await self.emitter.send(event)
        if claims:
            await self.emitter.flush(through=seq)
        return [self._rejections.pop(event.event_id, "") for *_, event in claims]

    async def _end(
        self, step_id: str, child_id: str, attempt: int, claim_id: str, status: str, error: str
    ) -> None:
        kind = {
            "completed": job_pb2.CHILD_EVENT_KIND_COMPLETED,
            "failed": job_pb2.CHILD_EVENT_KIND_FAILED,
            "cancelled": job_pb2.CHILD_EVENT_KIND_CANCELLED,
        }[status]
        await self.emitter.send(
            job_pb2.ChildEvent(
                kind=kind,
                step_id=step_id,
                child_id=child_id,
                attempt=attempt,
                error=error,
                runner=self.name,
                claim_id=claim_id,
            )
        )

    def _rejected(self, event: job_pb2.ChildEvent, reason: str) -> None:
        if event.kind == job_pb2.CHILD_EVENT_KIND_RUNNING:
            self._rejections[event.event_id] = reason
        elif event.child_id:
            log.warning("end refused by the monitor", child_id=event.child_id, why=reason)

    async def _watch_claims(self) -> None:
        """Stop each child whose claim no longer holds: cancelled, or claimed by another."""
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            now = time.monotonic()
            due = [r for r in self._running.values() if now - r.started >= WATCH_AFTER_S]
            if due:
                await asyncio.gather(*(self._check(r) for r in due), return_exceptions=True)

    async def _check(self, running: Running) -> None:
        try:
            child = await self.monitor.get_job(running.child_id)
        except StepflowError:
            return
        status = child.status
        if child.runner != self.name or child.attempt != running.attempt:
            why = f"attempt {child.attempt} of the child is claimed by runner {child.runner or '?'}"
        elif status is not None and status.terminal:
            why = f"the child is {status} ({child.end_reason or 'ended'})"
        else:
            return
        if not running.lost:
            running.lost = why
            running.cancel.set()

    # -- dead letters --------------------------------------------------------------------------
    async def fail_dead_letter(self, body: object, claim_id: str, deliveries: int) -> None:
        """A message the broker gave up on: its children fail ``runner_lost``."""
        kwargs = body[1] if isinstance(body, list | tuple) and len(body) >= 2 else body
        try:
            parcel = Parcel.from_kwargs(kwargs)
        except BadParcel as exc:
            log.error("dead letter is not a parcel of children; dropped", why=str(exc))
            return
        error = (
            f"its message was dead-lettered after {deliveries} deliveries: the runner running "
            "it was lost each time"
        )
        for index, _attempt in parcel.children:
            await self.emitter.send(
                job_pb2.ChildEvent(
                    kind=job_pb2.CHILD_EVENT_KIND_FAILED,
                    step_id=parcel.step_id,
                    child_id=f"{parcel.step_id}.{index}",
                    error=error,
                    runner=self.name,
                    claim_id=claim_id,
                    runner_lost=True,
                )
            )
        await self.emitter.flush()
        log.warning(
            "dead-lettered children failed runner_lost",
            step_id=parcel.step_id,
            children=len(parcel.children),
        )


class DeadLetters(threading.Thread):
    """Consumes ``NAME.dead``: each message fails its children (``Runtime.fail_dead_letter``)."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(name="stepflow-dead-letters", daemon=True)
        self.runtime = runtime
        self._stop = threading.Event()

    def run(self) -> None:
        settings = self.runtime.config.broker
        _, dead = broker.queues(settings.queue)
        while not self._stop.is_set():
            try:
                with (
                    Connection(settings.url, heartbeat=settings.heartbeat_s) as connection,
                    connection.Consumer(
                        [dead], callbacks=[self._on_message], accept=["json"], prefetch_count=1
                    ),
                ):
                    tick = min(1.0, settings.heartbeat_s / 4)
                    while not self._stop.is_set():
                        try:
                            connection.drain_events(timeout=tick)
                        except TimeoutError:
                            connection.heartbeat_check(rate=2)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("dead-letter consumer lost its connection; again", error=str(exc))
                self._stop.wait(1.0)

    def _on_message(self, body: object, message: Message) -> None:
        headers = message.headers or {}
        claim_id = str(headers.get("id") or message.properties.get("correlation_id") or "")
        # The broker dead-letters a message once it is past the queue's delivery limit.
        deliveries = broker.DELIVERY_LIMIT + 1
        self.runtime.call(self.runtime.fail_dead_letter(body, claim_id, deliveries))
        message.ack()

    def stop(self) -> None:
        self._stop.set()


def run(config: RunnerConfig, *, log_level: str = "info") -> int:
    """Run the runner until SIGTERM / Ctrl-C (Celery's warm shutdown: no new message, the
    running children finish). Returns the process exit status."""
    for name in CHATTY_LOGGERS:
        # Two lines per message ("received", "succeeded") say nothing a child's own events do
        # not, and cost a runner more than the message itself.
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    app = broker.make_app(config.broker, concurrency=config.concurrency)
    problems = broker.unsafe_settings(app)
    if problems:
        raise InvalidArgument("refusing to run children with " + "; ".join(problems))
    with app.connection_for_write() as connection:
        broker.connect(connection, config.broker.url)
        broker.declare(connection, config.broker.queue)
    workers = load_registry()
    runtime = Runtime(config, workers)
    runtime.start()

    @app.task(name=broker.TASK_NAME, bind=True)  # type: ignore[untyped-decorator]
    def run_children(self: Any, **kwargs: Any) -> None:
        request = self.request
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        try:
            runtime.call(runtime.run_parcel(kwargs, request.id or "", redelivered))
        except Requeue as exc:
            raise Reject(str(exc), requeue=True) from exc

    dead_letters = DeadLetters(runtime)
    dead_letters.start()
    log.info(
        "runner started",
        name=runtime.name,
        queue=config.broker.queue,
        concurrency=config.concurrency,
        workers=sorted(workers),
        monitor=config.monitor,
    )
    worker = app.Worker(
        pool_cls="threads",
        concurrency=config.concurrency,
        queues=[config.broker.queue],
        loglevel=logging.getLevelName(log_level.upper()),
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        optimization="fair",
    )
    try:
        worker.start()
    finally:
        dead_letters.stop()
        runtime.stop()
    return int(worker.exitcode or 0)
