"""A real stepflow for another service's tests: a monitor (and optionally an orchestrator) in a
subprocess on a free port, with a temporary SQLite database.

::

    from stepflow_client.testing import start_monitor

    with start_monitor() as monitor:
        channel = grpc.insecure_channel(monitor.target)
        ...

Each server is the real ``monitor-svc serve`` / ``orchestrator-svc serve`` command, so the code
under test shares nothing with it (no interpreter lock, loggers or event loop). It listens on a
port the kernel picked (port 0; the server's log says which), is ready once the gRPC health
service reports SERVING, and is stopped with SIGTERM, then SIGKILL, when the ``with`` block ends
however it ends; the temporary directory goes with it. Started in its own session, and (on
Linux) sent SIGTERM by the kernel if the test process dies first, so none outlives its test
(a test process killed outright leaves the directory in the system's temporary directory).

Also a pytest plugin (``pytest_plugins = ["stepflow_client.testing"]``, loaded automatically
when stepflow is installed) with the fixtures ``stepflow_monitor`` and
``stepflow_orchestrator``: a fresh monitor and database for each test, about a second of set-up,
and the servers' log added to a failing test's report.

This module is never imported by ``stepflow_client`` itself.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# The server knobs stay readable here, where they were defined before _local_server.py.
from stepflow_client._local_server import HEALTH_CALL_S as HEALTH_CALL_S
from stepflow_client._local_server import (
    HOST,
    MONITOR_PORT_EVENT,
    MONITOR_SERVICE,
    ORCHESTRATOR_PORT_EVENT,
    ORCHESTRATOR_SERVICE,
    SHUTDOWN_GRACE,
    STARTUP_TIMEOUT_S,
    LocalServer,
    ServerFailed,
)
from stepflow_client._local_server import LOG_TAIL_LINES as LOG_TAIL_LINES
from stepflow_client._local_server import POLL_S as POLL_S
from stepflow_client._local_server import STOP_TIMEOUT_S as STOP_TIMEOUT_S

__all__ = [
    "LocalMonitor",
    "LocalOrchestrator",
    "ServerFailed",
    "start_monitor",
    "start_orchestrator",
]


class LocalMonitor(LocalServer):
    """A ``monitor-svc serve`` subprocess; see ``start_monitor``."""

    kind = "monitor"
    _module = "monitor_svc"
    _python_flags = ("-P",)  # no module from the working directory shadows the server's
    _health_service = MONITOR_SERVICE
    _port_event = MONITOR_PORT_EVENT

    def __init__(
        self,
        *,
        database_url: str | None,
        grace_period: str | None,
        default_wait_timeout: str | None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self._database_url = database_url
        self._grace_period = grace_period
        self._default_wait_timeout = default_wait_timeout
        self._web_port = 0

    @property
    def web_url(self) -> str:
        """``http://127.0.0.1:PORT``: the monitor's web view and JSON API (the same after a
        restart)."""
        return f"http://{HOST}:{self.web_port}"

    @property
    def web_port(self) -> int:
        """Its web view's port: the one ``args`` gives (``--http-port``), else a free one
        picked once. 0 when ``args`` turned the web view off."""
        if not self._web_port:
            if _flag_value(self._args, "--http-port", given=True):
                return _flag_value(self._args, "--http-port")
            self._web_port = free_port()
        return self._web_port

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL it serves (by default a SQLite file in ``directory``)."""
        return self._database_url or f"sqlite:///{self.database_path}"

    @property
    def database_path(self) -> Path | None:
        """The SQLite file, when the database is the default one; None for a given URL."""
        return None if self._database_url else self.directory / "stepflow.db"

    def _serve_args(self) -> list[str]:
        args = [*super()._serve_args(), "--database-url", self.database_url]
        if not _flag_value(self._args, "--http-port", given=True):
            # A free port of its own, so monitors side by side never share the default 8080.
            args += ["--http-port", str(self.web_port)]
        if self._grace_period is not None:
            args += ["--grace-period", self._grace_period]
        if self._default_wait_timeout is not None:
            args += ["--default-wait-timeout", self._default_wait_timeout]
        return args


class LocalOrchestrator(LocalServer):
    """An ``orchestrator-svc serve`` subprocess; see ``start_orchestrator``."""

    kind = "orchestrator"
    _module = "orchestrator_svc"
    _health_service = ORCHESTRATOR_SERVICE
    _port_event = ORCHESTRATOR_PORT_EVENT

    def __init__(
        self, *, monitor_target: str, owner: str, lease: str | None, **common: Any
    ) -> None:
        super().__init__(**common)
        self.monitor_target = monitor_target
        self.owner = owner
        self._lease = lease

    def _serve_args(self) -> list[str]:
        args = [*super()._serve_args(), "--monitor", self.monitor_target, "--owner", self.owner]
        if self._lease is not None:
            args += ["--lease", self._lease]
        return args


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _flag_value(args: Sequence[str], flag: str, *, given: bool = False) -> int:
    """The integer a flag is given in ``args`` (``--flag N`` or ``--flag=N``; 0 if absent);
    with ``given``, 1 when the flag is there at all."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return 1 if given else int(args[i + 1])
        if arg.startswith(flag + "="):
            return 1 if given else int(arg.split("=", 1)[1])
    return 0


def start_monitor(
    *,
    database_url: str | None = None,
    grace_period: str | None = None,
    default_wait_timeout: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    log_level: str = "info",
    shutdown_grace: str = SHUTDOWN_GRACE,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> LocalMonitor:
    """A real monitor for a test: ``with start_monitor() as monitor:`` starts it, waits until
    it is SERVING at ``monitor.target``, and stops it and removes its files when the block
    ends.

    ``database_url``: where it keeps the jobs (default: a new SQLite file in a temporary
    directory, ``monitor.database_path``); a PostgreSQL database must exist, it is migrated.
    ``grace_period`` and ``default_wait_timeout`` (durations such as ``"500ms"``): the
    monitor's ``--grace-period`` and ``--default-wait-timeout`` (server defaults when None).
    ``args``: more ``monitor-svc serve`` flags, e.g. ``["--orphan-timeout", "2s"]``.
    ``env``: extra environment (``STEPFLOW_*`` variables of this process are not passed on).
    ``log_path``: keep the server's JSON log there (default: in the temporary directory).
    """
    return LocalMonitor(
        database_url=database_url,
        grace_period=grace_period,
        default_wait_timeout=default_wait_timeout,
        args=args,
        env=env,
        cwd=None,
        log_path=log_path,
        log_level=log_level,
        shutdown_grace=shutdown_grace,
        startup_timeout=startup_timeout,
    )


def start_orchestrator(
    monitor: LocalMonitor | str,
    *,
    owner: str | None = None,
    lease: str | None = None,
    python_path: Sequence[str | os.PathLike[str]] = (),
    cwd: str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    log_level: str = "info",
    shutdown_grace: str = SHUTDOWN_GRACE,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> LocalOrchestrator:
    """A real orchestrator using ``monitor`` (a ``LocalMonitor`` or a ``HOST:PORT``), for
    ``with``; SERVING (so connected to the monitor) at ``orchestrator.target`` inside the block.

    It runs the built-in workers (``command``, ``fanout``, ``simulate``, ``python``) and every
    ``stepflow.workers`` plugin installed in this environment. A ``python`` step's
    ``module:function`` is imported in the orchestrator's process: from ``cwd`` (default: this
    process's working directory), ``python_path`` (put first on its ``PYTHONPATH``) or the
    installed packages. ``owner``: its ``--owner`` (default: a new name, kept across a
    ``restart()`` so it resumes its jobs). The other options are ``start_monitor``'s.
    """
    target = monitor.target if isinstance(monitor, LocalMonitor) else monitor
    extra_env = dict(env or {})
    if python_path:
        paths = [os.fspath(Path(p).resolve()) for p in python_path]
        inherited = extra_env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        extra_env["PYTHONPATH"] = os.pathsep.join([*paths, *([inherited] if inherited else [])])
    return LocalOrchestrator(
        monitor_target=target,
        owner=owner or f"stepflow-testing-{uuid.uuid4().hex[:8]}",
        lease=lease,
        args=args,
        env=extra_env,
        cwd=cwd if cwd is not None else os.getcwd(),
        log_path=log_path,
        log_level=log_level,
        shutdown_grace=shutdown_grace,
        startup_timeout=startup_timeout,
    )


# -- the pytest plugin ---------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the context managers above do not need pytest
    pass
else:

    @pytest.fixture
    def stepflow_monitor_options() -> dict[str, Any]:
        """Keyword arguments for ``start_monitor`` behind ``stepflow_monitor``; override this
        fixture to change them (e.g. ``{"grace_period": "200ms"}``)."""
        return {}

    @pytest.fixture
    def stepflow_monitor(stepflow_monitor_options: dict[str, Any]) -> Iterator[LocalMonitor]:
        """A monitor with a fresh SQLite database of its own, for this test only."""
        with start_monitor(**stepflow_monitor_options) as monitor:
            yield monitor

    @pytest.fixture
    def stepflow_orchestrator_options() -> dict[str, Any]:
        """Keyword arguments for ``start_orchestrator`` behind ``stepflow_orchestrator``."""
        return {}

    @pytest.fixture
    def stepflow_orchestrator(
        stepflow_monitor: LocalMonitor,
        stepflow_orchestrator_options: dict[str, Any],
        pytestconfig: pytest.Config,
    ) -> Iterator[LocalOrchestrator]:
        """An orchestrator using ``stepflow_monitor``; ``python`` steps import from the
        project's root directory (pytest's rootdir) and the installed packages."""
        options = {"cwd": pytestconfig.rootpath, **stepflow_orchestrator_options}
        with start_orchestrator(stepflow_monitor, **options) as orchestrator:
            yield orchestrator

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        """A failing test's report ends with the log of each stepflow server it used."""
        report: pytest.TestReport = yield
        if report.failed:
            funcargs = getattr(item, "funcargs", {})
            for name, value in funcargs.items():
                if isinstance(value, LocalServer) and value.log_text():
                    report.sections.append(
                        (f"stepflow {value.kind} log ({name})", value.log_tail())
                    )
        return report
