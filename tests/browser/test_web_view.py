"""The web view in a real browser (SPEC §7), against real monitor and orchestrator processes:
counts rise live without a reload and never move backwards; a reload mid-job and after the
end shows the current state; the log follows live and survives a reload without a line
twice; the badge says ``reconnecting`` while the monitor is down and ``live`` again, with
every missed change and line, when it is back; a proxy that cuts idle connections does not
break the page; Cancel (from the keyboard) stops the job's process; a wrong token gets the
login page and no data."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from grpc import aio

from stepflow_client.aio import MonitorClient
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.browser.page_hooks import (
    Shown,
    assert_equals_job,
    assert_log_is,
    assert_moves_forward,
    shown,
)
from tests.jobs import whole_log
from tests.process_helpers import (
    TERMINAL,
    ServerProcess,
    free_port,
    monitor_process,
    orchestrator_process,
    running,
    submit_to,
    wait_job,
)

pytestmark = pytest.mark.timeout(180)

WAIT_S = 60.0
SAMPLE_S = 0.1


def crawl_job(children: int = 60, duration_ms: int = 200) -> dict[str, Any]:
    return {
        "name": "watched",
        "steps": [
            {
                "name": "crawl",
                "type": "simulate",
                "on_error": "continue",
                "config": {
                    "children": children, "duration_ms": duration_ms, "concurrency": 4,
                    "fail_every": 7, "log_lines": 1,
                },
            },
            {
                "name": "enrich",
                "type": "simulate",
                "wait": False,
                "config": {"children": 30, "duration_ms": 30, "concurrency": 6, "cancel_every": 9},
            },
            {
                "name": "say",
                "type": "command",
                "config": {"command": "for i in 1 2 3; do echo said-$i; sleep 0.2; done"},
            },
        ],
    }  # fmt: skip


@contextlib.asynccontextmanager
async def stack(
    database_url: str, tmp_path: Path, token: str = ""
) -> AsyncIterator[tuple[ServerProcess, ServerProcess, str]]:
    """A monitor with its web view on a free port and an orchestrator; with ``token``, the
    monitor requires it (and the orchestrator sends it)."""
    web_port = free_port()
    monitor_extra = ["--auth-token", token] if token else []
    monitor = monitor_process(database_url, tmp_path, http_port=web_port, extra=monitor_extra)
    orchestrator = orchestrator_process(
        monitor.address, tmp_path, extra=["--monitor-token", token] if token else []
    )
    async with running(monitor, orchestrator):
        yield monitor, orchestrator, f"http://127.0.0.1:{web_port}"


async def ended(monitor: ServerProcess, job_id: str) -> tuple[job_pb2.Job, list[int]]:
    """Once the job is terminal: its record, and the seq of every line of its log, read
    through the public client (``tests.jobs.whole_log``)."""
    final = await wait_job_end(monitor, job_id)
    async with MonitorClient(monitor.address) as client:
        return final, [line.seq for line in await whole_log(client, job_id)]


async def showing_end(
    page: Any, final: job_pb2.Job, seqs: list[int], samples: list[Shown]
) -> Shown:
    """The page once it shows the job's final state and holds its whole log."""
    return await sample_until(
        page, lambda s: s.change == final.change_seq and len(s.log) >= len(seqs), samples
    )


async def sample_until(page: Any, done: Any, samples: list[Shown], within: float = WAIT_S) -> Shown:
    """Read the page every SAMPLE_S until ``done(shown)``; every sample kept."""
    deadline = time.monotonic() + within
    while True:
        now = await shown(page)
        samples.append(now)
        if done(now):
            return now
        assert time.monotonic() < deadline, f"the page never got there: {now}"
        await asyncio.sleep(SAMPLE_S)


def totals_of(final: job_pb2.Job) -> dict[str, int]:
    return {s.step_id: s.child_count for s in final.step_stats if s.child_count}


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_counts_rise_live_and_a_reload_shows_the_current_state(
    browser: Any, database_url: str, tmp_path: Path
) -> None:
    async with stack(database_url, tmp_path) as (monitor, orchestrator, web):
        context = await browser.new_context()
        listing = await context.new_page()
        await listing.goto(web + "/")
        await listing.wait_for_selector("[data-live][data-state=live]")
        manager_id = await submit_to(orchestrator, crawl_job(), uuid.uuid4().hex)
        # The job list shows the new job without a reload.
        await listing.wait_for_selector(f'tr[data-job-id="{manager_id}"]', timeout=10_000)

        page = await context.new_page()
        await page.goto(f"{web}/jobs/{manager_id}")
        samples: list[Shown] = []
        partial = await sample_until(
            page,
            lambda s: s.steps and 0 < s.steps[0]["counts"].get("completed", 0) < 40,
            samples,
        )
        assert partial.fresh == "live"
        # More children finish while the page stays open: no reload.
        await sample_until(
            page,
            lambda s: (
                s.steps[0]["counts"].get("completed", 0) > partial.steps[0]["counts"]["completed"]
            ),
            samples,
        )
        async with MonitorClient(monitor.address) as client:
            before_reload = await client.get_job(manager_id)
        await page.reload()
        after = await sample_until(page, lambda s: s.change > 0, samples)
        # The first state after a reload is at least as new as the job was before it.
        assert after.change >= before_reload.change_seq
        final, log_seqs = await ended(monitor, manager_id)
        done = await showing_end(page, final, log_seqs, samples)
        assert_equals_job(done, final)
        assert_log_is(done, log_seqs)
        assert_moves_forward(samples, totals_of(final))
        # A reload after the end shows the end, and the whole log once.
        await page.reload()
        again = await showing_end(page, final, log_seqs, [])
        assert_equals_job(again, final)
        assert_log_is(again, log_seqs)
        # The list, refreshed at most once a second, follows too.
        await listing.wait_for_selector(
            f'tr[data-job-id="{manager_id}"][data-status="completed"]', timeout=10_000
        )
        await context.close()


TERMINAL_WORDS = {"completed", "failed", "cancelled"}


async def test_the_log_follows_live_and_survives_a_reload_without_duplicates(
    browser: Any, tmp_path: Path
) -> None:
    job = {
        "name": "talker",
        "steps": [{
            "name": "talk", "type": "command",
            "config": {"command": "for i in $(seq 1 12); do echo line-$i; sleep 0.25; done"},
        }],
    }  # fmt: skip
    async with stack(f"sqlite:///{tmp_path / 'w.db'}", tmp_path) as (monitor, orch, web):
        manager_id = await submit_to(orch, job, uuid.uuid4().hex)
        page = await browser.new_page()
        await page.goto(f"{web}/jobs/{manager_id}")
        await page.wait_for_selector("text=line-3", timeout=20_000)
        mid = await shown(page)
        assert "line-12" not in (await page.text_content("[data-log]") or "")
        await page.reload()
        await page.wait_for_selector("text=line-12", timeout=20_000)
        _, seqs = await ended(monitor, manager_id)
        final = await sample_until(page, lambda s: len(s.log) >= len(seqs), [])
        assert_log_is(final, seqs)
        assert set(mid.log) <= set(final.log)
        # A page of a job that does not exist says so, and stops asking.
        await page.goto(f"{web}/jobs/no-such-job")
        await page.wait_for_selector("[data-job-status]:text('not found')")
        assert await page.text_content("[data-live]") == "not found"
        await page.goto(f"{web}/jobs/{manager_id}")
        await sample_until(page, lambda s: len(s.log) >= len(seqs), [])
        for i in range(1, 13):  # each printed line once on the page
            assert (
                await page.locator(".msg", has_text=f"line-{i}")
                .filter(has_text=re.compile(f"^line-{i}$"))
                .count()
                == 1
            )


async def wait_job_end(monitor: ServerProcess, job_id: str) -> job_pb2.Job:
    async with aio.insecure_channel(monitor.address) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        return await wait_job(stub, job_id, lambda j: j.status in TERMINAL, WAIT_S)


async def test_the_badge_says_reconnecting_while_the_monitor_is_down_and_nothing_is_missed(
    browser: Any, tmp_path: Path
) -> None:
    async with stack(f"sqlite:///{tmp_path / 'w.db'}", tmp_path) as (monitor, orch, web):
        manager_id = await submit_to(
            orch, crawl_job(children=50, duration_ms=150), uuid.uuid4().hex
        )
        page = await browser.new_page()
        await page.goto(f"{web}/jobs/{manager_id}")
        samples: list[Shown] = []
        await sample_until(
            page, lambda s: s.steps and s.steps[0]["counts"].get("completed", 0) > 2, samples
        )
        monitor.stop()
        down = await sample_until(page, lambda s: s.fresh == "reconnecting", samples, within=30)
        await asyncio.sleep(1.0)  # the orchestrator goes on meanwhile; the page hears nothing
        monitor.start()
        await monitor.wait_serving()
        back = await sample_until(
            page, lambda s: s.fresh == "live" and s.change > down.change, samples
        )
        assert back.change > down.change
        final, seqs = await ended(monitor, manager_id)
        done = await showing_end(page, final, seqs, samples)
        assert_equals_job(done, final)
        assert_log_is(done, seqs)
        assert_moves_forward(samples, totals_of(final))


class IdleCuttingProxy:
    """A TCP proxy that cuts every connection idle for ``idle_s`` (as a load balancer with a
    short idle timeout does), and counts the cuts."""

    def __init__(self, upstream_port: int, idle_s: float) -> None:
        self.upstream_port = upstream_port
        self.idle_s = idle_s
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> IdleCuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        last = [time.monotonic()]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    last[0] = time.monotonic()
                    dst.write(data)
                    await dst.drain()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.1)
                if time.monotonic() - last[0] > self.idle_s:
                    self.cuts += 1
                    break
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()


async def test_a_proxy_cutting_idle_connections_does_not_break_the_page(
    browser: Any, tmp_path: Path
) -> None:
    job = {
        "name": "quiet",
        "steps": [
            {
                "name": "first", "type": "command",
                "config": {"command": "echo before; sleep 5; echo after"},
            },
            {"name": "second", "type": "simulate", "config": {"children": 10, "duration_ms": 50}},
        ],
    }  # fmt: skip
    async with stack(f"sqlite:///{tmp_path / 'w.db'}", tmp_path) as (monitor, orch, web):
        web_port = int(web.rsplit(":", 1)[1])
        async with IdleCuttingProxy(web_port, idle_s=2.0) as proxy:
            manager_id = await submit_to(orch, job, uuid.uuid4().hex)
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{proxy.port}/jobs/{manager_id}")
            final, seqs = await ended(monitor, manager_id)
            done = await showing_end(page, final, seqs, [])
            assert proxy.cuts >= 1  # the proxy did cut the page's stream while the job was quiet
            assert_equals_job(done, final)
            assert_log_is(done, seqs)
            assert done.fresh == "live"


async def test_cancel_from_the_keyboard_stops_the_running_job_and_its_process(
    browser: Any, tmp_path: Path
) -> None:
    marker = f"{time.time_ns() % 10**6}.{uuid.uuid4().int % 997 + 1}"  # a unique sleep length
    job = {
        "name": "long",
        "steps": [{"name": "wait", "type": "command", "config": {"command": f"sleep {marker}"}}],
    }
    async with stack(f"sqlite:///{tmp_path / 'w.db'}", tmp_path) as (monitor, orch, web):
        manager_id = await submit_to(orch, job, uuid.uuid4().hex)
        page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        await page.goto(f"{web}/jobs/{manager_id}")
        await sample_until(page, lambda s: s.steps and s.steps[0]["status"] == "running", [])
        assert _processes(marker), "the step's command is running"
        width = await page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, "the page fits a phone's width"
        cancel = page.locator("[data-cancel]")
        await cancel.focus()
        await page.keyboard.press("Enter")
        done = await sample_until(page, lambda s: s.status == "cancelled", [])
        assert done.steps[0]["status"] == "cancelled"
        final = await wait_job_end(monitor, manager_id)
        assert final.status == job_pb2.JOB_STATUS_CANCELLED
        deadline = time.monotonic() + 5
        while _processes(marker) and time.monotonic() < deadline:  # noqa: ASYNC110 - a process
            await asyncio.sleep(0.1)
        assert not _processes(marker), "the cancelled step's process is gone within 5 s"
        assert await page.is_hidden("[data-cancel]")


def _processes(marker: str) -> list[str]:
    found = subprocess.run(
        ["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True, check=False
    )
    return found.stdout.split()


async def test_a_wrong_token_gets_the_login_page_and_no_data(browser: Any, tmp_path: Path) -> None:
    token = "browser-token"
    job = {
        "name": "secret-job-name",
        "steps": [{"name": "s", "type": "command", "config": {"command": "true"}}],
    }
    async with stack(f"sqlite:///{tmp_path / 'w.db'}", tmp_path, token) as (_, orch, web):
        manager_id = await submit_to(orch, job, uuid.uuid4().hex)
        page = await browser.new_page()
        await page.goto(f"{web}/jobs/{manager_id}")
        assert await page.is_visible("[data-login]")
        await page.fill("#token", "not-the-token")
        await page.press("#token", "Enter")
        await page.wait_for_selector("[data-login-error]")
        content = await page.content()
        assert "secret-job-name" not in content
        assert await page.query_selector("[data-job-status]") is None
        await page.fill("#token", token)
        await page.press("#token", "Enter")
        await page.wait_for_selector("[data-job-status]:not(:empty)")
        await page.wait_for_function(
            "() => document.querySelector('[data-job-name]').textContent === 'secret-job-name'"
        )


SET_HIDDEN = """(hidden) => {
  Object.defineProperty(document, 'hidden', {value: hidden, configurable: true});
  Object.defineProperty(document, 'visibilityState',
    {value: hidden ? 'hidden' : 'visible', configurable: true});
  document.dispatchEvent(new Event('visibilitychange'));
}"""


async def test_a_tab_in_the_background_gives_its_stream_back_and_resumes_exactly(
    browser: Any, tmp_path: Path
) -> None:
    job = {
        "name": "background",
        "steps": [{
            "name": "talk", "type": "command",
            "config": {"command": "for i in $(seq 1 16); do echo tick-$i; sleep 0.25; done"},
        }],
    }  # fmt: skip
    async with stack(f"sqlite:///{tmp_path / 'w.db'}", tmp_path) as (monitor, orch, web):
        manager_id = await submit_to(orch, job, uuid.uuid4().hex)
        page = await browser.new_page()
        await page.goto(f"{web}/jobs/{manager_id}")
        await page.wait_for_selector("text=tick-2", timeout=20_000)
        await page.evaluate(SET_HIDDEN, True)
        async with aiohttp.ClientSession(web) as http:
            deadline = time.monotonic() + 10
            while True:  # the monitor's shared watch of the job ends with the page's stream
                async with http.get("/healthz") as resp:
                    if (await resp.json())["watched_jobs"] == 0:
                        break
                assert time.monotonic() < deadline, "the hidden page kept its stream"
                await asyncio.sleep(0.1)
        hidden_at = await shown(page)
        await asyncio.sleep(1.0)  # lines are printed meanwhile; the page does not hear them
        await page.evaluate(SET_HIDDEN, False)
        final, seqs = await ended(monitor, manager_id)
        done = await showing_end(page, final, seqs, [])
        assert len(hidden_at.log) < len(seqs)
        assert_equals_job(done, final)
        assert_log_is(done, seqs)


async def test_a_take_over_watched_live_counts_stay_exact_and_never_fall(
    browser: Any, tmp_path: Path
) -> None:
    """A bad day watched from a browser: handed-off steps, failing children and a take-over
    (kill -9 of the owner), watched live and reloaded mid-job and after the end."""
    web_port = free_port()
    monitor = monitor_process(
        f"sqlite:///{tmp_path / 'w.db'}", tmp_path, http_port=web_port,
        extra=["--orphan-timeout", "30s"],
    )  # fmt: skip
    lease = ["--lease", "1.5s"]
    first = orchestrator_process(
        monitor.address, tmp_path, name="first", owner="first", extra=lease
    )
    second = orchestrator_process(
        monitor.address, tmp_path, name="second", owner="second", extra=lease
    )
    async with running(monitor, first, second):
        manager_id = await submit_to(
            first, crawl_job(children=80, duration_ms=150), uuid.uuid4().hex
        )
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{web_port}/jobs/{manager_id}")
        samples: list[Shown] = []
        await sample_until(
            page, lambda s: s.steps and s.steps[0]["counts"].get("completed", 0) > 8, samples
        )
        first.kill()  # kill -9 mid-step
        await page.wait_for_function(
            "() => document.querySelector('[data-job-owner]').textContent.startsWith('second')",
            timeout=30_000,
        )
        await page.reload()
        final, seqs = await ended(monitor, manager_id)
        done = await showing_end(page, final, seqs, samples)
        assert final.owner.startswith("second")
        assert_equals_job(done, final)
        assert_log_is(done, seqs)
        assert_moves_forward(samples, totals_of(final))
        await page.reload()
        again = await sample_until(page, lambda s: s.change == final.change_seq, [])
        assert_equals_job(again, final)


async def test_the_job_list_shows_the_newest_live_and_pages_back(
    browser: Any, tmp_path: Path
) -> None:
    web_port = free_port()
    monitor = monitor_process(f"sqlite:///{tmp_path / 'w.db'}", tmp_path, http_port=web_port)
    async with running(monitor), aio.insecure_channel(monitor.address) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        for i in range(55):
            await stub.CreateJob(m.CreateJobRequest(kind=job_pb2.JOB_KIND_MANAGER, name=f"j{i}"))
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{web_port}/")
        await page.wait_for_function(
            "() => document.querySelectorAll('tr[data-job-id]').length == 50"
        )
        names = await page.eval_on_selector_all(
            "tr[data-job-id] a", "els => els.map(e => e.textContent)"
        )
        assert names == [f"j{i}" for i in range(54, 4, -1)]  # newest first
        await page.click("[data-list-more]")
        await page.wait_for_function(
            "() => document.querySelectorAll('tr[data-job-id]').length == 55"
        )
        names = await page.eval_on_selector_all(
            "tr[data-job-id] a", "els => els.map(e => e.textContent)"
        )
        assert names == [f"j{i}" for i in range(54, -1, -1)]
        assert await page.is_hidden("[data-list-more]")
        # A new job appears at the top, live; the older page stays below.
        await stub.CreateJob(m.CreateJobRequest(kind=job_pb2.JOB_KIND_MANAGER, name="newest"))
        await page.wait_for_function(
            "() => document.querySelector('tr[data-job-id] a').textContent === 'newest'"
        )
