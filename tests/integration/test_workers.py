"""The built-in workers and the registry, run for real against a context that records every
callback and checks each child's lifecycle as it happens."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator_svc.workers.base import (
    BaseWorker,
    ChildStatus,
    ExistingChild,
    RetryPolicy,
    StepContext,
    StepResult,
    Worker,
    sleep_unless_cancelled,
)
from orchestrator_svc.workers.children import (
    CANCELLED_BEFORE_RETRY_ERROR,
    NOT_STARTED_ERROR,
    ChildOutcome,
    run_children,
)
from orchestrator_svc.workers.command import CommandWorker
from orchestrator_svc.workers.fanout import FanoutWorker
from orchestrator_svc.workers.python_call import PythonWorker
from orchestrator_svc.workers.registry import (
    ENTRY_POINT_GROUP,
    WorkerLoadError,
    as_worker,
    load_registry,
)
from orchestrator_svc.workers.simulate import SimulateWorker, expected_tally
from stepflow_common.errors import InvalidArgument
from stepflow_common.step_outcome import ChildTally


@dataclass
class Recorder:
    """The runner's side of StepContext: records callbacks and fails on an impossible order
    (running before created, an event after the end, a child ended twice)."""

    events: list[tuple[str, ...]] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    attempts_seen: set[str] = field(default_factory=set)
    running_now: int = 0
    max_running: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    on_event: Callable[[Recorder], Awaitable[None]] | None = None

    def context(
        self,
        config: Mapping[str, Any],
        step_id: str = "step-1",
        *,
        retry: RetryPolicy | None = None,
        existing: Mapping[str, ExistingChild] | None = None,
        draining: asyncio.Event | None = None,
        attempt: int = 1,
    ) -> StepContext:
        for child_id, before in (existing or {}).items():
            self.state[child_id] = "running" if before.status == "running" else before.status
            self.attempts[child_id] = before.attempt
        return StepContext(
            step_id=step_id,
            step_name="s",
            config=config,
            child_created=self.created,
            child_running=self.running,
            child_finished=self.finished,
            cancelled=self.cancelled,
            retry=retry or RetryPolicy(),
            existing_children=existing or {},
            draining=draining,
            attempt=attempt,
        )

    async def created(self, child_id: str, name: str) -> None:
        assert child_id not in self.state, f"{child_id} created twice"
        self.state[child_id] = "pending"
        self.names[child_id] = name
        self.events.append(("created", child_id))
        await self._hook()

    async def running(self, child_id: str, attempt: int = 1) -> None:
        before = self.state.get(child_id)
        if before == "running" and child_id not in self.attempts_seen:
            self.running_now += 1  # a resumed child: running before this run began
        self.attempts_seen.add(child_id)
        expected = self.attempts.get(child_id, 0) + 1
        assert attempt == expected, f"{child_id} ran attempt {attempt} after {expected - 1}"
        self.attempts[child_id] = attempt
        if before == "running":  # a retry: the child stays running between attempts
            self.events.append(("retry", child_id, str(attempt)))
            await self._hook()
            return
        assert before == "pending", f"{child_id} ran from {before}"
        self.state[child_id] = "running"
        self.running_now += 1
        self.max_running = max(self.max_running, self.running_now)
        self.events.append(("running", child_id))
        await self._hook()

    async def finished(self, child_id: str, status: ChildStatus, error: str) -> None:
        before = self.state.get(child_id)
        assert before in ("pending", "running"), f"{child_id} ended from {before}"
        if before == "running":
            self.running_now -= 1
        self.state[child_id] = status
        self.errors[child_id] = error
        self.events.append((status, child_id))
        await self._hook()

    async def _hook(self) -> None:
        if self.on_event is not None:
            await self.on_event(self)

    def tally(self) -> ChildTally:
        counts = Counter(self.state.values())
        return ChildTally(
            pending=counts["pending"],
            running=counts["running"],
            completed=counts["completed"],
            failed=counts["failed"],
            cancelled=counts["cancelled"],
        )

    def count(self, kind: str) -> int:
        return sum(1 for event in self.events if event[0] == kind)


def cancel_when(predicate: Callable[[Recorder], bool]) -> Callable[[Recorder], Awaitable[None]]:
    async def hook(rec: Recorder) -> None:
        if predicate(rec):
            rec.cancelled.set()

    return hook


# -- retries and resume (run_children, shared by every spawning worker) ----------------------
def flaky(fail_attempts: dict[int, int]) -> Callable[[int, int], Awaitable[ChildOutcome]]:
    """Child ``index`` fails its first ``fail_attempts[index]`` attempts, then completes."""

    async def run_one(index: int, attempt: int) -> ChildOutcome:
        if attempt <= fail_attempts.get(index, 0):
            return ChildOutcome("failed", f"attempt {attempt} failed")
        return ChildOutcome("completed")

    return run_one


async def test_a_child_failing_twice_then_succeeding_is_completed_on_attempt_3() -> None:
    rec = Recorder()
    ctx = rec.context({}, retry=RetryPolicy(retries=2, backoff_s=0.001))
    count = await run_children(ctx, ["a", "b"], flaky({0: 2}), concurrency=2)
    assert count == 2
    assert rec.state == {"step-1.0": "completed", "step-1.1": "completed"}
    assert rec.attempts == {"step-1.0": 3, "step-1.1": 1}
    # One child in the counts whatever its attempts: created once, ended once.
    assert rec.count("created") == 2 and rec.count("completed") == 2
    assert [e for e in rec.events if e[0] == "retry"] == [
        ("retry", "step-1.0", "2"),
        ("retry", "step-1.0", "3"),
    ]


async def test_a_child_fails_only_when_its_last_attempt_fails() -> None:
    rec = Recorder()
    ctx = rec.context({}, retry=RetryPolicy(retries=2, backoff_s=0.001))
    await run_children(ctx, ["a"], flaky({0: 5}), concurrency=1)
    assert rec.state == {"step-1.0": "failed"} and rec.attempts == {"step-1.0": 3}
    assert rec.errors["step-1.0"] == "attempt 3 failed"
    assert rec.count("failed") == 1


async def test_no_retries_by_default() -> None:
    rec = Recorder()
    await run_children(rec.context({}), ["a"], flaky({0: 1}), concurrency=1)
    assert rec.state == {"step-1.0": "failed"} and rec.attempts == {"step-1.0": 1}


async def test_cancelled_while_waiting_to_retry_ends_the_child_cancelled() -> None:
    rec = Recorder()
    ctx = rec.context({}, retry=RetryPolicy(retries=3, backoff_s=30.0))
    first_failed = asyncio.Event()

    async def always_fails(index: int, attempt: int) -> ChildOutcome:
        first_failed.set()
        return ChildOutcome("failed", "boom")

    task = asyncio.create_task(run_children(ctx, ["a"], always_fails, concurrency=1))
    await asyncio.wait_for(first_failed.wait(), 5)
    await asyncio.sleep(0)  # now in its 30 s backoff
    rec.cancelled.set()
    await asyncio.wait_for(task, 5)
    assert rec.state == {"step-1.0": "cancelled"}
    assert rec.errors["step-1.0"] == CANCELLED_BEFORE_RETRY_ERROR


async def test_resume_creates_nothing_again_and_reruns_only_live_children() -> None:
    rec = Recorder()
    existing = {
        "step-1.0": ExistingChild("completed", attempt=1),
        "step-1.1": ExistingChild("failed", attempt=1),
        "step-1.2": ExistingChild("running", attempt=1, interruptions=1),
        "step-1.3": ExistingChild("pending"),
    }
    ctx = rec.context({}, existing=existing)
    runs: list[tuple[int, int]] = []

    async def run_one(index: int, attempt: int) -> ChildOutcome:
        runs.append((index, attempt))
        return ChildOutcome("completed")

    count = await run_children(ctx, ["a", "b", "c", "d", "e"], run_one, concurrency=2)
    assert count == 5
    # Only the child it never had is created; the ended ones are not run again.
    assert [e for e in rec.events if e[0] == "created"] == [("created", "step-1.4")]
    assert sorted(runs) == [(2, 2), (3, 1), (4, 1)]
    assert rec.state == {
        "step-1.0": "completed",
        "step-1.1": "failed",
        "step-1.2": "completed",
        "step-1.3": "completed",
        "step-1.4": "completed",
    }


async def test_an_interrupted_child_keeps_its_retries() -> None:
    """A run cut short by a lost orchestrator did not fail: it does not use up a retry."""
    rec = Recorder()
    existing = {"step-1.0": ExistingChild("running", attempt=2, interruptions=2)}
    ctx = rec.context({}, retry=RetryPolicy(retries=1, backoff_s=0.001), existing=existing)
    attempts: list[int] = []

    async def run_one(index: int, attempt: int) -> ChildOutcome:
        attempts.append(attempt)
        return ChildOutcome("failed", "boom")

    await run_children(ctx, ["a"], run_one, concurrency=1)
    assert attempts == [3, 4] and rec.state == {"step-1.0": "failed"}


async def test_resume_after_cancel_reports_only_live_children_cancelled() -> None:
    rec = Recorder()
    existing = {
        "step-1.0": ExistingChild("completed", attempt=1),
        "step-1.1": ExistingChild("pending"),
    }
    ctx = rec.context({}, existing=existing)
    rec.cancelled.set()
    count = await run_children(ctx, ["a", "b", "c"], flaky({}), concurrency=1)
    assert count == 0  # cancelled before it looked at any child
    assert rec.events == []


async def test_fanout_tells_a_command_its_attempt() -> None:
    rec = Recorder()
    config = {"items": ["x"], "command": 'test "$STEPFLOW_ATTEMPT" -ge 3'}
    await FanoutWorker().run(rec.context(config, retry=RetryPolicy(retries=4, backoff_s=0.001)))
    assert rec.state == {"step-1.0": "completed"} and rec.attempts == {"step-1.0": 3}


# -- simulate --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"children": 200, "fail_every": 25}, ChildTally(completed=192, failed=8)),
        (
            {"children": 30, "fail_every": 6, "cancel_every": 4},
            ChildTally(completed=20, failed=5, cancelled=5),
        ),
        ({"children": 10, "cancel_every": 1}, ChildTally(cancelled=10)),
        ({"children": 10, "fail_every": 1, "cancel_every": 1}, ChildTally(failed=10)),
        ({"children": 7}, ChildTally(completed=7)),
        ({"children": 0, "fail_every": 2}, ChildTally()),
        (
            {"children": 50.0, "fail_every": 10.0, "concurrency": 3.0, "duration_ms": 1.0},
            ChildTally(completed=45, failed=5),
        ),
    ],
)
async def test_simulate_counts_are_a_pure_function_of_the_config(
    config: dict[str, Any], expected: ChildTally
) -> None:
    rec = Recorder()
    result = await SimulateWorker().run(rec.context(config))
    assert result == StepResult.spawned(expected.total)
    assert rec.tally() == expected == expected_tally(config)
    assert rec.count("created") == rec.count("running") == expected.total


async def test_simulate_pattern_is_by_child_number() -> None:
    rec = Recorder()
    await SimulateWorker().run(rec.context({"children": 12, "fail_every": 6, "cancel_every": 4}))
    by_number = {int(rec.names[cid].rsplit("-", 1)[1]): status for cid, status in rec.state.items()}
    assert {n for n, s in by_number.items() if s == "failed"} == {6, 12}  # 12 is hit by both
    assert {n for n, s in by_number.items() if s == "cancelled"} == {4, 8}
    assert rec.errors["step-1.5"] == "simulated failure (child 6, fail_every=6)"
    assert list(rec.state) == [f"step-1.{i}" for i in range(12)]  # deterministic child ids


async def test_simulate_duration_zero_is_fast_and_yields_to_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    rec = Recorder()
    tick_task = asyncio.create_task(ticker())
    started = time.perf_counter()
    result = await SimulateWorker().run(rec.context({"children": 20_000, "fail_every": 100}))
    elapsed = time.perf_counter() - started
    tick_task.cancel()
    assert result.child_count == 20_000 and rec.tally().failed == 200
    assert elapsed < 5.0, f"{20_000 / elapsed:.0f} children/s"
    assert ticks > 100, "the worker starved the event loop"


async def test_simulate_keeps_to_its_concurrency() -> None:
    rec = Recorder()
    await SimulateWorker().run(rec.context({"children": 24, "duration_ms": 10, "concurrency": 4}))
    assert rec.max_running == 4
    assert rec.tally() == ChildTally(completed=24)


async def test_simulate_cancellation_ends_every_child_and_starts_no_more() -> None:
    rec = Recorder(on_event=cancel_when(lambda r: r.tally().completed == 10))
    config = {"children": 100, "duration_ms": 20, "concurrency": 5}
    started = time.perf_counter()
    result = await SimulateWorker().run(rec.context(config))
    assert time.perf_counter() - started < 2.0
    assert result.cancelled and result.ok and result.child_count == 100
    tally = rec.tally()
    assert tally.pending == tally.running == 0 and tally.total == 100
    assert 10 <= tally.completed <= 15  # at most the ones already running could finish
    assert tally.cancelled == 100 - tally.completed
    # Nothing started after the cancel: every child after the last "running" was never run.
    never_ran = [cid for cid, err in rec.errors.items() if err == NOT_STARTED_ERROR]
    assert len(never_ran) == 100 - rec.count("running")
    assert any(err == "step cancelled while the child was running" for err in rec.errors.values())


async def test_simulate_cancelled_while_creating_reports_what_it_created() -> None:
    rec = Recorder(on_event=cancel_when(lambda r: r.count("created") == 30))
    result = await SimulateWorker().run(rec.context({"children": 1000}))
    assert result.child_count == 30 and result.cancelled
    assert rec.tally() == ChildTally(cancelled=30)
    assert rec.count("running") == 0


async def test_simulate_cancelled_before_it_starts_creates_nothing() -> None:
    rec = Recorder()
    rec.cancelled.set()
    result = await SimulateWorker().run(rec.context({"children": 10, "duration_ms": 5}))
    assert result == StepResult.spawned(0, cancelled=True)
    assert rec.events == []


async def test_blocking_callbacks_hold_the_worker_back() -> None:
    """Backpressure: while a callback is blocked (monitor down), the worker does nothing else."""
    gate = asyncio.Event()

    async def hold(rec: Recorder) -> None:
        if rec.count("created") == 5:
            await gate.wait()

    rec = Recorder(on_event=hold)
    run = asyncio.create_task(SimulateWorker().run(rec.context({"children": 20})))
    await asyncio.sleep(0.05)
    assert len(rec.events) == 5 and not run.done()
    gate.set()
    assert (await run).child_count == 20
    assert rec.tally() == ChildTally(completed=20)


async def test_a_failing_callback_stops_the_step_without_stray_tasks() -> None:
    async def explode(rec: Recorder) -> None:
        if rec.count("running") == 3:
            raise ConnectionError("monitor client closed")

    rec = Recorder(on_event=explode)
    before = len(asyncio.all_tasks())
    with pytest.raises(ConnectionError):
        await SimulateWorker().run(
            rec.context({"children": 10, "duration_ms": 5, "concurrency": 4})
        )
    await asyncio.sleep(0.02)
    assert len(asyncio.all_tasks()) == before


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "children: required"),
        ({"children": -1}, "children: must be at least 0, got -1"),
        ({"children": True}, "children: expected a whole number, got True"),
        ({"children": 1, "concurrency": 0}, "concurrency: must be at least 1"),
        ({"children": 1, "duration_ms": 2.5}, "duration_ms: expected a whole number, got 2.5"),
        ({"children": 1, "extra": 1}, "extra: unknown setting"),
    ],
)
def test_simulate_validates_its_config(config: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        SimulateWorker().validate_config(config)
    assert str(info.value).startswith(message)


async def test_sleep_unless_cancelled() -> None:
    signal = asyncio.Event()
    assert await sleep_unless_cancelled(signal, 0.01)
    asyncio.get_running_loop().call_later(0.01, signal.set)
    started = time.perf_counter()
    assert not await sleep_unless_cancelled(signal, 10)
    assert time.perf_counter() - started < 1


# -- command ---------------------------------------------------------------------------------
async def run_command(config: dict[str, Any], rec: Recorder | None = None) -> StepResult:
    rec = rec or Recorder()
    result = await CommandWorker().run(rec.context(config))
    assert rec.events == []  # no children, ever
    return result


async def test_command_success() -> None:
    assert await run_command({"command": "true"}) == StepResult.success()


async def test_command_failure_reports_status_and_stderr() -> None:
    result = await run_command({"command": "echo progress; echo 'disk full' >&2; exit 3"})
    assert result == StepResult.failure("exit status 3: disk full")


async def test_command_uses_cwd_and_env(tmp_path: Path) -> None:
    command = 'test "$GREETING" = hello && test "$(pwd -P)" = "$EXPECTED" && test -n "$PATH"'
    real_dir = await asyncio.to_thread(tmp_path.resolve)  # pwd -P shows /tmp symlinks resolved
    env = {"GREETING": "hello", "EXPECTED": str(real_dir)}
    assert (await run_command({"command": command, "cwd": str(tmp_path), "env": env})).ok


async def test_command_timeout_fails_it() -> None:
    started = time.perf_counter()
    result = await run_command({"command": "sleep 30", "timeout": "200ms"})
    assert result == StepResult.failure("timed out after 0.2s")
    assert time.perf_counter() - started < 5


async def test_command_cancellation_stops_the_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    rec = Recorder()
    # The background job would outlive a shell killed on its own.
    command = f"(sleep 1; touch {marker}) & sleep 30; wait"
    task = asyncio.create_task(CommandWorker().run(rec.context({"command": command})))
    await asyncio.sleep(0.2)
    rec.cancelled.set()
    result = await asyncio.wait_for(task, 5)
    assert result == StepResult.stopped("cancelled while running")
    await asyncio.sleep(1.2)
    assert not await asyncio.to_thread(marker.exists)


async def test_command_that_cannot_start(tmp_path: Path) -> None:
    result = await run_command({"command": "true", "cwd": str(tmp_path / "absent")})
    assert not result.ok and result.error.startswith("cannot start command:")


def test_command_validates_its_config() -> None:
    worker = CommandWorker()
    with pytest.raises(InvalidArgument, match=r"^command: required$"):
        worker.validate_config({})
    with pytest.raises(InvalidArgument, match=r"^command: must not be empty$"):
        worker.validate_config({"command": " "})
    with pytest.raises(InvalidArgument, match=r"^cmd: unknown setting"):
        worker.validate_config({"command": "true", "cmd": "x"})
    worker.validate_config({"command": "true", "env": {"N": 8.0}, "timeout": 30})


# -- fanout ----------------------------------------------------------------------------------
async def test_fanout_one_child_per_item_failing_on_nonzero_exit() -> None:
    rec = Recorder()
    config = {"items": ["a", "b", "c"], "command": "test {item} != b"}
    result = await FanoutWorker().run(rec.context(config))
    assert result == StepResult.spawned(3)
    assert rec.state == {"step-1.0": "completed", "step-1.1": "failed", "step-1.2": "completed"}
    assert rec.errors["step-1.1"] == "exit status 1"
    assert list(rec.names.values()) == ["a", "b", "c"]


async def test_fanout_items_are_quoted_and_in_the_environment() -> None:
    rec = Recorder()
    items = ["two words", "semi; exit 9", "$HOME", 3.0]
    config = {"items": items, "command": 'test {item} = "$STEPFLOW_ITEM"'}
    await FanoutWorker().run(rec.context(config))
    assert rec.tally() == ChildTally(completed=4), rec.errors
    assert rec.names["step-1.3"] == "3"  # a Struct double that is a whole number


async def test_fanout_keeps_to_its_concurrency() -> None:
    rec = Recorder()
    config = {"items": list(range(8)), "command": "sleep 0.15", "concurrency": 3}
    started = time.perf_counter()
    await FanoutWorker().run(rec.context(config))
    assert rec.max_running == 3
    assert rec.tally() == ChildTally(completed=8)
    assert time.perf_counter() - started >= 0.45  # ceil(8 / 3) rounds of 0.15 s


async def test_fanout_default_concurrency_is_8() -> None:
    rec = Recorder()
    await FanoutWorker().run(rec.context({"items": list(range(12)), "command": "sleep 0.1"}))
    assert rec.max_running == 8


async def test_fanout_cancellation_kills_running_children_and_skips_the_rest() -> None:
    both_running = asyncio.Event()

    async def watch(rec: Recorder) -> None:
        if rec.count("running") == 2:
            both_running.set()

    rec = Recorder(on_event=watch)
    config = {"items": list(range(6)), "command": "sleep 30", "concurrency": 2}
    task = asyncio.create_task(FanoutWorker().run(rec.context(config)))
    await asyncio.wait_for(both_running.wait(), 5)
    await asyncio.sleep(0.2)  # both processes are up
    started = time.perf_counter()
    rec.cancelled.set()
    result = await asyncio.wait_for(task, 10)
    assert time.perf_counter() - started < 3  # SIGTERM took, no KILL_GRACE_S wait
    assert result.cancelled and result.child_count == 6
    assert rec.tally() == ChildTally(cancelled=6)
    assert sorted(rec.errors.values()) == ["cancelled while running"] * 2 + [NOT_STARTED_ERROR] * 4


async def test_fanout_child_timeout_fails_that_child() -> None:
    rec = Recorder()
    config = {"items": ["0.01", "5"], "command": "sleep {item}", "timeout": "300ms"}
    await FanoutWorker().run(rec.context(config))
    assert rec.state == {"step-1.0": "completed", "step-1.1": "failed"}
    assert rec.errors["step-1.1"] == "timed out after 0.3s"


async def test_fanout_with_no_items_spawns_nothing() -> None:
    rec = Recorder()
    assert await FanoutWorker().run(
        rec.context({"items": [], "command": "true"})
    ) == StepResult.spawned(0)
    assert rec.events == []


def test_fanout_validates_its_config() -> None:
    worker = FanoutWorker()
    with pytest.raises(InvalidArgument, match=r"^items: expected a list"):
        worker.validate_config({"items": "a,b", "command": "true"})
    with pytest.raises(
        InvalidArgument, match=r"^items\[1\]: expected a string or number, got True"
    ):
        worker.validate_config({"items": ["a", True], "command": "true"})
    with pytest.raises(InvalidArgument, match=r"^concurrency: must be at least 1"):
        worker.validate_config({"items": [], "command": "true", "concurrency": 0})


# -- drain (shutdown) -------------------------------------------------------------------------
async def test_drain_lets_running_children_finish_and_leaves_the_rest_unreported() -> None:
    """Drained (not cancelled): no child starts after it, those running finish as usual, and
    the ones never started are not reported at all, so the next owner runs them."""
    rec = Recorder()
    draining = asyncio.Event()
    release = asyncio.Event()

    async def run_one(index: int, attempt: int) -> ChildOutcome:
        if index == 2:  # the third child to start: the orchestrator is told to shut down
            draining.set()
        await release.wait()
        return ChildOutcome("completed")

    ctx = rec.context({}, draining=draining)
    names = (f"c{k}" for k in range(10))
    task = asyncio.create_task(run_children(ctx, names, run_one, concurrency=3))
    await asyncio.wait_for(draining.wait(), 5)
    release.set()
    created = await asyncio.wait_for(task, 5)
    assert created == 10
    assert rec.count("created") == 10
    assert rec.count("running") == 3
    assert rec.count("completed") == 3
    assert rec.count("cancelled") == 0
    assert rec.tally() == ChildTally(pending=7, completed=3)


async def test_drained_before_creating_creates_nothing_and_reports_nothing() -> None:
    rec = Recorder()
    draining = asyncio.Event()
    draining.set()
    ctx = rec.context({"children": 5}, draining=draining)
    result = await SimulateWorker().run(ctx)
    assert result.child_count == 0 and rec.events == []


async def test_cancel_wins_over_drain() -> None:
    """Cancelled while draining: the never-started children are reported cancelled."""
    rec = Recorder()
    draining = asyncio.Event()

    async def run_one(index: int, attempt: int) -> ChildOutcome:
        draining.set()
        rec.cancelled.set()
        return ChildOutcome("cancelled", "stopped")

    ctx = rec.context({}, draining=draining)
    await run_children(ctx, (f"c{k}" for k in range(4)), run_one, concurrency=1)
    assert rec.tally() == ChildTally(cancelled=4)


# -- python ----------------------------------------------------------------------------------
calls: list[dict[str, Any]] = []


def record_call(config: dict[str, Any]) -> str:
    calls.append(config)
    return "ignored"


def raise_value_error(config: dict[str, Any]) -> None:
    raise ValueError(f"bad input {config['n']}")


async def async_ok(config: dict[str, Any]) -> None:
    await asyncio.sleep(0.01)
    calls.append(config)


async def async_forever(config: dict[str, Any]) -> None:
    await asyncio.sleep(30)


class Namespace:
    @staticmethod
    async def nested(config: dict[str, Any]) -> None:
        raise RuntimeError("from a nested attribute")


async def run_python(target: str, **extra: Any) -> StepResult:
    rec = Recorder()
    result = await PythonWorker().run(rec.context({"callable": target, **extra}))
    assert rec.events == []
    return result


async def test_python_sync_function_gets_the_config() -> None:
    calls.clear()
    assert (await run_python(f"{__name__}:record_call", n=1)).ok
    expected = {"callable": f"{__name__}:record_call", "n": 1}
    assert calls == [expected]


async def test_python_async_function() -> None:
    calls.clear()
    assert (await run_python(f"{__name__}:async_ok")).ok
    assert len(calls) == 1


async def test_python_raising_is_a_failure() -> None:
    result = await run_python(f"{__name__}:raise_value_error", n=7)
    assert result == StepResult.failure("ValueError: bad input 7")
    result = await run_python(f"{__name__}:Namespace.nested")
    assert result == StepResult.failure("RuntimeError: from a nested attribute")


async def test_python_unresolvable_target_fails_the_step() -> None:
    result = await run_python(f"{__name__}:no_such_function")
    assert not result.ok and "has no attribute 'no_such_function'" in result.error


async def test_python_cancellation_stops_an_async_function() -> None:
    rec = Recorder()
    config = {"callable": f"{__name__}:async_forever"}
    task = asyncio.create_task(PythonWorker().run(rec.context(config)))
    await asyncio.sleep(0.05)
    rec.cancelled.set()
    assert await asyncio.wait_for(task, 2) == StepResult.stopped("cancelled while running")


def test_python_validates_its_config() -> None:
    worker = PythonWorker()
    with pytest.raises(InvalidArgument, match=r"^callable: required$"):
        worker.validate_config({})
    with pytest.raises(InvalidArgument, match="is not of the form 'module:function'"):
        worker.validate_config({"callable": "os.path.join"})
    with pytest.raises(InvalidArgument, match=r"^callable: no module named 'stepflow_nope'$"):
        worker.validate_config({"callable": "stepflow_nope:run"})
    worker.validate_config({"callable": "os.path:join", "anything": "else"})


# -- registry --------------------------------------------------------------------------------
def test_builtin_registry() -> None:
    registry = load_registry(plugins=False)
    assert sorted(registry) == ["command", "fanout", "python", "simulate"]
    for type_name, worker in registry.items():
        assert isinstance(worker, Worker) and worker.type == type_name and worker.description
    assert {t for t, w in registry.items() if w.spawns_children} == {"fanout", "simulate"}


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real installed distribution (a .dist-info on sys.path) declaring stepflow.workers."""
    module = "stepflow_test_plugin"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from orchestrator_svc.workers.base import BaseWorker, StepResult

            class EchoWorker(BaseWorker):
                type = "echo"
                description = "Says hello."

                async def run(self, ctx):
                    return StepResult.success()

            class Shouty(EchoWorker):
                type = "shout"

            shout = Shouty()

            class NotAWorker:
                pass

            class Impostor(EchoWorker):
                type = "command"
            """
        )
    )
    dist_info = tmp_path / "stepflow_test_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: stepflow-test-plugin\nVersion: 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield dist_info
    sys.modules.pop(module, None)


def declare(dist_info: Path, *lines: str) -> None:
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n"
    )


def test_entry_point_workers_are_loaded_by_class_or_instance(plugin_dir: Path) -> None:
    declare(
        plugin_dir, "echo = stepflow_test_plugin:EchoWorker", "shout = stepflow_test_plugin:shout"
    )
    registry = load_registry()
    assert {"echo", "shout"} <= set(registry)
    assert type(registry["echo"]).__name__ == "EchoWorker"
    assert "echo" not in load_registry(plugins=False)


def test_a_registered_plugin_type_is_usable_in_a_definition(plugin_dir: Path) -> None:
    from orchestrator_svc.definitions import from_mapping

    declare(plugin_dir, "echo = stepflow_test_plugin:EchoWorker")
    spec = from_mapping(
        {"name": "j", "steps": [{"name": "a", "type": "echo"}]}, workers=load_registry()
    )
    assert spec.steps[0].type == "echo"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("bad = stepflow_test_plugin:NotAWorker", "is not a Worker"),
        ("gone = stepflow_test_plugin:Missing", "cannot be loaded"),
        ("dup = stepflow_test_plugin:Impostor", "worker type 'command' is already registered"),
    ],
)
def test_broken_plugins_fail_the_load_by_name(plugin_dir: Path, line: str, problem: str) -> None:
    declare(plugin_dir, line)
    with pytest.raises(WorkerLoadError) as info:
        load_registry()
    assert f"entry point '{line.split(' = ')[0]}'" in str(info.value) and problem in str(info.value)


def test_as_worker_rejects_a_sync_run() -> None:
    class SyncRun(BaseWorker):
        type = "sync"

        def run(self, ctx: StepContext) -> StepResult:  # type: ignore[override]
            return StepResult.success()

    with pytest.raises(WorkerLoadError, match="run\\(\\) must be an async function"):
        as_worker(SyncRun)


# -- attempts seen by the work -----------------------------------------------------------------
async def test_command_tells_its_process_the_step_attempt(tmp_path: Path) -> None:
    out = tmp_path / "attempt"
    rec = Recorder()
    config = {"command": f'printf %s "$STEPFLOW_ATTEMPT" > {out}'}
    assert (await CommandWorker().run(rec.context(config, attempt=2))).ok
    assert out.read_text() == "2"


contexts: list[Any] = []


def takes_context(config: dict[str, Any], context: Any) -> None:
    contexts.append(context)


async def takes_context_by_keyword(config: dict[str, Any], *, context: Any) -> None:
    contexts.append(context)


async def test_python_callable_gets_the_attempt_when_it_takes_a_context() -> None:
    contexts.clear()
    for target in ("takes_context", "takes_context_by_keyword"):
        rec = Recorder()
        ctx = rec.context({"callable": f"{__name__}:{target}"}, step_id="st", attempt=3)
        assert (await PythonWorker().run(ctx)).ok
    assert [(c.step_id, c.step_name, c.attempt) for c in contexts] == [("st", "s", 3)] * 2
