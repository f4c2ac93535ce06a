"""``stepflow_client.testing``: a real monitor (and orchestrator) for another project's tests.

The first test is such a project: a temporary directory with its own conftest, job file,
Python task and the README's example, run by a real pytest in a subprocess (pytester), using
only the plugin's fixtures and the generated stubs. The others drive the context managers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc import aio

from stepflow_client.testing import ServerFailed, start_monitor
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

pytest_plugins = ["pytester"]

CALL_S = 10.0
README = Path(__file__).resolve().parents[2] / "README.md"
README_EXAMPLE_START = "# tests/test_nightly.py in your project"

CONSUMER_CONFTEST = """
pytest_plugins = ["stepflow_client.testing"]
"""

CONSUMER_TASKS = """
from pathlib import Path


def record(config):
    Path(config["out"]).write_text(config["text"])
"""

CONSUMER_TESTS = """
import grpc
from google.protobuf import struct_pb2

from orchestrator_svc.definitions import load_file, to_proto
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc


def test_our_service_records_its_steps(stepflow_monitor):
    with grpc.insecure_channel(stepflow_monitor.target) as channel:
        monitor = m_grpc.MonitorServiceStub(channel)
        manager = monitor.CreateJob(
            m.CreateJobRequest(kind=job_pb2.JOB_KIND_MANAGER, name="import")
        ).job
        step = monitor.CreateJob(
            m.CreateJobRequest(kind=job_pb2.JOB_KIND_STEP, parent_id=manager.id, name="load")
        ).job
        stats = struct_pb2.Struct()
        stats.update({"step_stats": [{"step_id": step.id, "step_name": "load",
                                      "status": "pending"}]})
        monitor.UpdateJobMetadata(m.UpdateJobMetadataRequest(job_id=manager.id, metadata=stats))

        for status in (job_pb2.JOB_STATUS_RUNNING, job_pb2.JOB_STATUS_COMPLETED):
            monitor.UpdateStepStatInManager(
                m.UpdateStepStatInManagerRequest(
                    manager_id=manager.id, step_id=step.id, status=status
                )
            )

        got = monitor.GetJob(m.GetJobRequest(job_id=manager.id)).job
        assert [(s.step_id, s.status) for s in got.step_stats] == [
            (step.id, job_pb2.JOB_STATUS_COMPLETED)
        ]


def test_our_job_file_runs_end_to_end(stepflow_orchestrator, stepflow_monitor, tmp_path):
    out = tmp_path / "out.txt"
    job = tmp_path / "job.toml"
    job.write_text(
        'name = "ours"\\n'
        "[[steps]]\\n"
        'name = "record"\\n'
        'type = "python"\\n'
        f'config = {{ callable = "tasks:record", out = "{out}", text = "done" }}\\n'
    )
    with grpc.insecure_channel(stepflow_orchestrator.target) as och, \\
            grpc.insecure_channel(stepflow_monitor.target) as mch:
        submitted = o_grpc.OrchestratorServiceStub(och).SubmitJob(
            o.SubmitJobRequest(definition=to_proto(load_file(job)))
        )
        watch = m_grpc.MonitorServiceStub(mch).WatchJob(
            m.WatchJobRequest(job_id=submitted.manager_id), timeout=60
        )
        final = [update.job for update in watch][-1]
    assert final.status == job_pb2.JOB_STATUS_COMPLETED, final
    assert out.read_text() == "done"


def test_a_failure_shows_the_monitor_log(stepflow_monitor):
    assert False, "failing on purpose"
"""


CONSUMER_OPTIONS = """
import pytest


@pytest.fixture
def stepflow_monitor_options():
    return {"grace_period": "200ms", "args": ["--orphan-timeout", "7s"]}


def test_our_flags_reach_the_monitor(stepflow_monitor):
    with open(f"/proc/{stepflow_monitor.pid}/cmdline", "rb") as cmdline:
        argv = cmdline.read().decode().split("\\0")
    assert argv[argv.index("--grace-period") + 1] == "200ms"
    assert argv[argv.index("--orphan-timeout") + 1] == "7s"
"""


def _readme_example() -> str:
    """The consumer test README.md shows, as written."""
    for match in re.finditer(r"^```python\n(.*?)^```$", README.read_text(), re.M | re.S):
        if match.group(1).startswith(README_EXAMPLE_START):
            return match.group(1)
    raise AssertionError(f"README.md has no python block starting {README_EXAMPLE_START!r}")


def _processes_in(directory: Path) -> list[str]:
    """The command lines of the processes (but this one, which pytester moved there) whose
    working directory is ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == directory:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name}: {command}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie its new parent has yet to
    reap, when the process that started it was killed)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_consumer_project_tests_against_a_real_stepflow(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONSUMER_CONFTEST)
    pytester.makepyfile(
        tasks=CONSUMER_TASKS,
        test_ours=CONSUMER_TESTS,
        test_options=CONSUMER_OPTIONS,
        test_nightly=_readme_example(),
    )

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--durations=0")

    result.assert_outcomes(passed=4, failed=1)
    # The failing test's report carries the server's log, whose start says where it listened.
    result.stdout.fnmatch_lines(
        ["*stepflow monitor log (stepflow_monitor)*", '*"event": "monitor serving"*']
    )
    # Every server the consumer's tests started has ended (they ran in its directory).
    assert _processes_in(pytester.path.resolve()) == []


def _create_manager(target: str, name: str) -> job_pb2.Job:
    with grpc.insecure_channel(target) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        return stub.CreateJob(
            m.CreateJobRequest(kind=job_pb2.JOB_KIND_MANAGER, name=name), timeout=CALL_S
        ).job


def _get(target: str, job_id: str) -> job_pb2.Job:
    with grpc.insecure_channel(target) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        return stub.GetJob(m.GetJobRequest(job_id=job_id), timeout=CALL_S).job


def test_a_restart_keeps_the_port_and_the_data() -> None:
    with start_monitor() as monitor:
        job = _create_manager(monitor.target, "survives")
        target, first_pid = monitor.target, monitor.pid
        assert monitor.database_path is not None
        assert monitor.database_url == f"sqlite:///{monitor.database_path}"

        monitor.restart()

        assert (monitor.target, monitor.running) == (target, True)
        assert monitor.pid != first_pid and _gone(first_pid)
        assert _get(monitor.target, job.id).name == "survives"
        assert monitor.log_text().count('"event": "monitor serving"') == 2


def test_two_monitors_are_independent() -> None:
    with start_monitor() as one, start_monitor() as two:
        assert one.target != two.target
        assert one.database_path != two.database_path
        job = _create_manager(one.target, "only-in-one")
        with pytest.raises(grpc.RpcError) as raised:
            _get(two.target, job.id)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert _get(one.target, job.id).name == "only-in-one"


def _web_job(web_url: str, job_id: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{web_url}/api/v1/jobs/{job_id}", timeout=CALL_S) as answer:
        document: dict[str, object] = json.loads(answer.read())
        return document


def test_each_monitor_has_a_web_view_of_its_own_kept_across_a_restart() -> None:
    with start_monitor() as one, start_monitor() as two:
        assert one.web_url != two.web_url  # neither took the default 8080 from the other
        job = _create_manager(one.target, "on-the-web")
        assert _web_job(one.web_url, job.id)["name"] == "on-the-web"
        web_url = one.web_url
        one.restart()
        assert one.web_url == web_url
        assert _web_job(one.web_url, job.id)["name"] == "on-the-web"


def test_nothing_is_left_after_the_block_even_when_it_raises(tmp_path: Path) -> None:
    seen: list[Path] = []
    kept_log = tmp_path / "logs" / "monitor.log"
    with (
        pytest.raises(RuntimeError, match="the test failed"),
        start_monitor(log_path=kept_log) as monitor,
    ):
        assert monitor.running and monitor.database_path is not None
        assert monitor.database_path.exists()
        seen.append(monitor.directory)
        raise RuntimeError("the test failed")
    assert _gone(monitor.pid)
    assert not monitor.running
    assert not seen[0].exists()
    # Only the log it was asked to keep elsewhere stays, to the server's last line.
    log = kept_log.read_text()
    assert '"event": "monitor serving"' in log
    assert '"event": "monitor stopped"' in log.splitlines()[-1]


def test_a_monitor_that_cannot_start_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monitor = start_monitor(database_url=f"sqlite:///{not_a_directory}/stepflow.db")
    with pytest.raises(ServerFailed, match="exited with status") as raised, monitor:
        pass
    assert "stepflow monitor" in str(raised.value)
    assert _gone(monitor.pid)


async def test_async_with_starts_and_stops_it() -> None:
    async with start_monitor(grace_period="200ms") as monitor:
        async with aio.insecure_channel(monitor.target) as channel:
            stub = m_grpc.MonitorServiceStub(channel)
            created = await stub.CreateJob(
                m.CreateJobRequest(kind=job_pb2.JOB_KIND_MANAGER, name="async"), timeout=CALL_S
            )
            got = await stub.GetJob(m.GetJobRequest(job_id=created.job.id), timeout=CALL_S)
        assert got.job.name == "async"
        directory = monitor.directory
    assert _gone(monitor.pid)
    assert not directory.exists()


def test_the_testing_module_loads_no_server_code() -> None:
    """The consumer's test process gets the stubs and gRPC, not the servers' storage, logging
    set-up or their modules: those live in the subprocesses."""
    code = (
        "import sys, stepflow_client.testing; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'sqlalchemy', 'structlog', 'alembic', 'monitor_svc', 'orchestrator_svc', 'rich'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_monitor_does_not_outlive_a_killed_test_process() -> None:
    """Nothing stops it in order when the test process is killed (SIGKILL, the OOM killer, a CI
    timeout): the kernel's parent-death signal does."""
    code = (
        "import sys, time\n"
        "from stepflow_client.testing import start_monitor\n"
        "monitor = start_monitor().__enter__()\n"
        "print(monitor.pid, monitor.directory, flush=True)\n"
        "time.sleep(600)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as test_process:
        try:
            assert test_process.stdout is not None
            pid, directory = test_process.stdout.readline().split(maxsplit=1)
            monitor_pid = int(pid)
            assert not _gone(monitor_pid)
        finally:
            test_process.kill()
    # Its directory is left behind: nothing is there to remove it when the test process dies.
    shutil.rmtree(directory.strip(), ignore_errors=True)
    deadline = time.monotonic() + 30.0
    while not _gone(monitor_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(monitor_pid):
        os.kill(monitor_pid, signal.SIGKILL)  # not left behind by this test either
        raise AssertionError(f"monitor {monitor_pid} outlived its test process")


def test_a_given_database_is_the_one_served(database_url: str) -> None:
    with start_monitor(database_url=database_url) as monitor:
        assert (monitor.database_url, monitor.database_path) == (database_url, None)
        job = _create_manager(monitor.target, "in-the-given-database")
    with start_monitor(database_url=database_url) as again:
        assert _get(again.target, job.id).name == "in-the-given-database"
