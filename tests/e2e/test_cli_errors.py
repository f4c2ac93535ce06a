"""The commands as a person meets them when something is wrong, run as real subprocesses.

Each mistake ends in exactly one line on stderr that names the thing (the file, the address,
the database) and what to do, with the exit status of the one table every ``--help`` shows;
a traceback only with ``--log-level debug``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from monitor_svc.cli import build_parser as monitor_parser
from stepflow_common.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from tests.process_helpers import (
    MONITOR_SVC,
    ORCHESTRATOR_SVC,
    clean_env,
    free_port,
    monitor_process,
    orchestrator_process,
    running,
)

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "examples" / "quick.toml"
RUN_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Done:
    code: int
    stdout: str
    stderr: str

    @property
    def line(self) -> str:
        """The one line on stderr (fails the test if there are more)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.stderr}"
        assert "Traceback" not in self.stderr
        return lines[0]


def run(*argv: str | Path, env: dict[str, str] | None = None) -> Done:
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**clean_env(), **(env or {})},
        cwd=ROOT,
        check=False,
    )
    return Done(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- submit and cancel without any server --------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("examples/nope.toml", "orchestrator-svc: no job file at examples/nope.toml"),
        ("examples", "orchestrator-svc: examples is a directory; give a job file"),
    ],
)
def test_submit_names_a_missing_job_file(path: str, says: str) -> None:
    done = run(ORCHESTRATOR_SVC, "submit", path)
    assert done.code == EXIT_USAGE
    assert done.line.startswith(says), done.line


def test_submit_names_the_invalid_field(tmp_path: Path) -> None:
    job = tmp_path / "bad.toml"
    job.write_text('name = "x"\n[[steps]]\nname = "a"\ntype = "command"\ndepend_on = []\n')
    done = run(ORCHESTRATOR_SVC, "submit", job)
    assert done.code == EXIT_USAGE
    assert done.line.startswith(f"orchestrator-svc: {job}: steps[0].depend_on: unknown field")


def test_debug_log_level_shows_the_traceback() -> None:
    done = run(ORCHESTRATOR_SVC, "submit", "examples/nope.toml", "--log-level", "debug")
    assert done.code == EXIT_USAGE
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("orchestrator-svc: no job file")


def test_submit_to_nothing_says_what_it_waits_for_and_gives_up() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = run(
        ORCHESTRATOR_SVC, "submit", QUICK, "--orchestrator", address, "--connect-timeout", "2s"
    )
    assert done.code == EXIT_UNREACHABLE
    waiting, gave_up = done.stderr.strip().splitlines()
    assert waiting == f"orchestrator-svc: waiting up to 2s for the orchestrator at {address}"
    assert gave_up.startswith(f"orchestrator-svc: cannot reach the orchestrator at {address}")
    assert "--orchestrator" in gave_up


def test_submit_follow_checks_the_monitor_before_it_submits() -> None:
    """A wrong --monitor is found before anything is submitted: the job is not left running
    unseen, and running the command again makes no duplicate."""
    monitor, orchestrator = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    done = run(
        ORCHESTRATOR_SVC, "submit", QUICK, "--follow", "--monitor", monitor,
        "--orchestrator", orchestrator, "--connect-timeout", "1s",
    )  # fmt: skip
    assert done.code == EXIT_UNREACHABLE
    gave_up = done.stderr.strip().splitlines()[-1]
    assert gave_up.startswith(f"orchestrator-svc: cannot reach the monitor at {monitor}"), gave_up


@pytest.mark.parametrize("command", ["submit", "cancel"])
def test_zero_connect_timeout_fails_at_once(command: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    target = QUICK if command == "submit" else "some-job"
    done = run(
        ORCHESTRATOR_SVC, command, target, "--orchestrator", address, "--connect-timeout", "0s"
    )
    assert done.code == EXIT_UNREACHABLE
    assert f"cannot reach the orchestrator at {address}" in done.line


@pytest.mark.parametrize(("timeout", "retried"), [("0s", False), ("2s", True)])
def test_zero_connect_timeout_turns_the_channel_retry_off(timeout: str, retried: bool) -> None:
    """The channel's retry on UNAVAILABLE backs off for seconds: "fail at once" must not."""
    from orchestrator_svc import cli_client
    from orchestrator_svc.cli import build_parser

    args = build_parser().parse_args(["cancel", "some-job", "--connect-timeout", timeout])
    settings = cli_client.client_settings(args, cli_client.connect_timeout(args))
    if retried:
        assert "retry" not in settings  # the client's default policy
    else:
        assert settings["retry"] is None


def test_help_lists_the_exit_statuses_and_no_empty_defaults() -> None:
    helps: list[list[str | Path]] = [
        [MONITOR_SVC, "--help"],
        [MONITOR_SVC, "serve", "--help"],
        [MONITOR_SVC, "migrate", "--help"],
        [MONITOR_SVC, "prune", "--help"],
        [ORCHESTRATOR_SVC, "--help"],
        [ORCHESTRATOR_SVC, "serve", "--help"],
        [ORCHESTRATOR_SVC, "submit", "--help"],
        [ORCHESTRATOR_SVC, "cancel", "--help"],
    ]
    for argv in helps:
        done = run(*argv, env={"COLUMNS": "100"})
        assert done.code == EXIT_OK, done.stderr
        text = " ".join(done.stdout.split())
        assert "exit status:" in done.stdout, argv
        for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED):
            assert f"\n  {code} " in done.stdout, (argv, code)
        assert "default: ]" not in text, argv
    submit_help = " ".join(run(ORCHESTRATOR_SVC, "submit", "--help").stdout.split())
    assert "STEPFLOW_ORCHESTRATOR_REQUEST_ID" not in submit_help


# -- servers ------------------------------------------------------------------------------------
def test_serve_on_a_taken_port_says_which(taken_port: int, tmp_path: Path) -> None:
    address = f"127.0.0.1:{taken_port}"
    database = f"sqlite:///{tmp_path / 'm.db'}"
    servers: list[list[str | Path]] = [
        [MONITOR_SVC, "serve", "--port", str(taken_port), "--database-url", database],
        [ORCHESTRATOR_SVC, "serve", "--port", str(taken_port)],
    ]
    for argv in servers:
        done = run(*argv, "--log-format", "console")
        assert done.code == EXIT_UNREACHABLE
        assert f"cannot listen on {address}: Address already in use" in done.line, done.line
        assert "--port" in done.line
        # With a JSON log, the same as one JSON event.
        done = run(*argv, "--log-format", "json")
        assert done.code == EXIT_UNREACHABLE
        event = json.loads(done.line)
        assert event["level"] == "error" and event["exit_status"] == EXIT_UNREACHABLE
        assert f"cannot listen on {address}" in event["error"]


def test_a_taken_web_port_is_one_line_naming_the_flag(taken_port: int, tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'm.db'}"
    serve = [MONITOR_SVC, "serve", "--port", "0", "--database-url", database]
    done = run(*serve, "--http-port", str(taken_port), "--log-format", "console")
    assert done.code == EXIT_UNREACHABLE
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in done.line
    assert "--http-port" in done.line
    # The flag's environment variable, as for every flag.
    done = run(
        *serve, "--log-format", "console", env={"STEPFLOW_MONITOR_HTTP_PORT": str(taken_port)}
    )
    assert done.code == EXIT_UNREACHABLE and "--http-port" in done.line
    assert monitor_parser().parse_args(["serve"]).http_port == 8080
    done = run(*serve, "--http-port", "70000", "--log-format", "console")
    assert done.code == EXIT_USAGE and "--http-port" in done.line


def test_a_plugin_that_cannot_load_stops_the_orchestrator_in_one_line(tmp_path: Path) -> None:
    dist_info = tmp_path / "broken_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1\n")
    (dist_info / "entry_points.txt").write_text("[stepflow.workers]\ngone = no_such_module_x:W\n")
    done = run(
        ORCHESTRATOR_SVC,
        "serve",
        "--port",
        "0",
        "--log-format",
        "json",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert done.code == EXIT_FAILED
    event = json.loads(done.line)
    assert "entry point 'gone'" in event["error"] and "no_such_module_x" in event["error"]


# -- the database ---------------------------------------------------------------------------------
def test_a_postgres_scheme_is_refused_with_the_right_spelling() -> None:
    url = "postgres://postgres@127.0.0.1:5432/stepflow"
    for command in ("migrate", "prune"):
        done = run(MONITOR_SVC, command, "--database-url", url)
        assert done.code == EXIT_USAGE
        assert "write postgresql+psycopg://postgres@127.0.0.1:5432/stepflow" in done.line


def test_a_missing_postgresql_database_says_to_create_it(postgres_template: str | None) -> None:
    if postgres_template is None:
        pytest.skip("PostgreSQL not configured: set STEPFLOW_TEST_POSTGRES_URL")
    name = f"stepflow_absent_{uuid.uuid4().hex[:8]}"
    url = make_url(postgres_template).set(database=name).render_as_string(hide_password=False)
    serve = ["serve", "--port", "0", "--http-port", "0", "--log-format", "console"]
    for argv in (["migrate"], ["prune"], serve):
        done = run(MONITOR_SVC, *argv, "--database-url", url)
        assert done.code == EXIT_UNREACHABLE, done.stderr
        assert f"no database '{name}'; create it first (createdb" in done.line, done.line


def test_an_unwritable_sqlite_path_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "sub" / "stepflow.db"
    done = run(MONITOR_SVC, "migrate", "--database-url", f"sqlite:///{path}")
    assert done.code == EXIT_UNREACHABLE
    assert f"cannot create the SQLite database {path}" in done.line


def test_prune_before_migrate_says_to_migrate(tmp_path: Path) -> None:
    done = run(MONITOR_SVC, "prune", "--database-url", f"sqlite:///{tmp_path / 'new.db'}")
    assert done.code == EXIT_UNREACHABLE
    assert "has no stepflow schema yet" in done.line and "monitor-svc migrate" in done.line


def test_zero_durations_where_they_mean_something(database_url: str) -> None:
    assert run(MONITOR_SVC, "migrate", "--database-url", database_url).code == EXIT_OK
    done = run(MONITOR_SVC, "prune", "--older-than", "0s", "--database-url", database_url)
    assert done.code == EXIT_OK, done.stderr
    assert done.stdout.startswith("pruned 0 finished jobs")
    done = run(
        MONITOR_SVC, "serve", "--grace-period", "0s", "--http-port", "0",
        "--database-url", database_url,
    )  # fmt: skip
    assert done.code == EXIT_USAGE
    assert "--grace-period: must be greater than zero" in done.line


# -- against live services ------------------------------------------------------------------------
async def test_live_errors_and_ctrl_c_in_follow(database_url: str, tmp_path: Path) -> None:
    monitor = monitor_process(database_url, tmp_path)
    async with running(monitor, orchestrator_process(monitor.address, tmp_path)) as (
        _,
        orchestrator,
    ):
        where = ["--orchestrator", orchestrator.address]
        # A job the server finds invalid exits as one the CLI finds invalid.
        job = tmp_path / "unknown-type.toml"
        job.write_text('name = "x"\n[[steps]]\nname = "a"\ntype = "no-such-worker"\n')
        done = run(ORCHESTRATOR_SVC, "submit", job, *where)
        assert done.code == EXIT_USAGE
        assert "no-such-worker" in done.line

        done = run(ORCHESTRATOR_SVC, "cancel", "no-such-job", *where)
        assert done.code == EXIT_FAILED
        assert done.line == "orchestrator-svc: no job no-such-job"

        # A stale STEPFLOW_ORCHESTRATOR_REQUEST_ID does not make two submits the same job.
        stale = {"STEPFLOW_ORCHESTRATOR_REQUEST_ID": "stale"}
        first = run(ORCHESTRATOR_SVC, "submit", QUICK, *where, env=stale)
        second = run(ORCHESTRATOR_SVC, "submit", QUICK, *where, env=stale)
        assert first.code == second.code == EXIT_OK, first.stderr + second.stderr
        assert first.stdout.strip() != second.stdout.strip()

        # Ctrl-C while following: the job goes on; the user is told how to cancel it.
        slow = tmp_path / "slow.toml"
        slow.write_text(
            'name = "slow"\n[[steps]]\nname = "s"\ntype = "simulate"\n'
            "config = { children = 1000, duration_ms = 500, concurrency = 2 }\n"
        )
        follow = [ORCHESTRATOR_SVC, "submit", slow, "--follow", *where,
                  "--monitor", monitor.address]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *[str(a) for a in follow],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
            cwd=ROOT,
        )
        try:
            assert proc.stderr is not None
            first_line = (await proc.stderr.readline()).decode()
            assert first_line.startswith("following job "), first_line
            job_id = first_line.split()[2]
            await asyncio.sleep(0.5)  # let the view start drawing
            proc.send_signal(signal.SIGINT)
            _, rest_bytes = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
            rest = rest_bytes.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == EXIT_INTERRUPTED, rest
        assert "Traceback" not in rest
        (line,) = rest.strip().splitlines()
        assert line == (
            f"orchestrator-svc: stopped following job {job_id}; it goes on. To cancel it: "
            f"orchestrator-svc cancel {job_id} --orchestrator {orchestrator.address}"
        )
        done = run(ORCHESTRATOR_SVC, "cancel", job_id, *where)
        assert done.code == EXIT_OK, done.stderr
        assert done.stdout.strip() == f"{job_id}: cancelled"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        ((MONITOR_SVC, "serve", "--grace-period", "5"), "--grace-period"),
        ((ORCHESTRATOR_SVC, "serve", "--lease", "30"), "--lease"),
        ((ORCHESTRATOR_SVC, "submit", QUICK, "--connect-timeout", "2"), "--connect-timeout"),
    ],
)
def test_a_duration_flag_without_a_unit_is_refused(argv: tuple[str, ...], flag: str) -> None:
    done = run(*argv, "--port", str(free_port())) if "serve" in argv else run(*argv)
    assert done.code == EXIT_USAGE, done.stderr
    assert f"{flag}: '{argv[-1]}' has no unit" in done.stderr
