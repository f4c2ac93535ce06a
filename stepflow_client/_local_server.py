"""One server subprocess of the test kit (``stepflow_client.testing``): started on a port the
kernel picks (read from its log), ready on SERVING, stopped with SIGTERM then SIGKILL, and
never left running after the interpreter exits."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepflow_common.subprocesses import die_with_parent, server_env
from stepflow_proto.v1 import monitor_service_pb2, orchestrator_service_pb2

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
"""Longest wait for SERVING; a cold start (imports, migrations) takes about a second."""
STOP_TIMEOUT_S = 10.0
"""How long SIGTERM gets before SIGKILL."""
SHUTDOWN_GRACE = "0.5s"
"""What in-flight calls (an open WatchJob, say) get on SIGTERM: short, tests wait for it."""
POLL_S = 0.02
HEALTH_CALL_S = 1.0
LOG_TAIL_LINES = 40

MONITOR_SERVICE = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name
ORCHESTRATOR_SERVICE = orchestrator_service_pb2.DESCRIPTOR.services_by_name[
    "OrchestratorService"
].full_name
# The event each server logs once it has bound its port, with the port in it.
MONITOR_PORT_EVENT = "monitor serving"
ORCHESTRATOR_PORT_EVENT = "orchestrator started; connecting to the monitor"


class ServerFailed(RuntimeError):
    """A server did not start (or restart); the message carries the tail of its log."""


# Servers still running, stopped at interpreter exit if their owner never did.
_RUNNING: weakref.WeakSet[LocalServer] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_RUNNING):
        server.close()


class LocalServer:
    """One stepflow server subprocess: started on a free port, stopped for good on exit.

    Usable as ``with``, or ``async with`` (which waits for it and stops it in a worker
    thread, so the event loop goes on). ``stop()`` and ``start()`` (or ``restart()``) in
    between keep the port and the temporary directory (so the database), which ``close()``
    removes; a restart fails (ServerFailed) if something else took the port meanwhile.
    """

    kind = "server"
    _module = ""
    _python_flags: tuple[str, ...] = ()
    _health_service = ""
    _port_event = ""

    def __init__(
        self,
        *,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
        log_path: str | os.PathLike[str] | None,
        log_level: str,
        shutdown_grace: str,
        startup_timeout: float,
    ) -> None:
        self._args = list(args)
        self._env = dict(env or {})
        self._cwd = Path(cwd) if cwd is not None else None
        self._log_path = Path(log_path) if log_path is not None else None
        self._log_level = log_level
        self._shutdown_grace = shutdown_grace
        self._startup_timeout = startup_timeout
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0  # 0 until the first start has reported the one it bound
        self._log_offset = 0  # where the current run's output starts in the log

    # -- what a test uses ------------------------------------------------------------------
    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"the {self.kind} has not been started")
        return self._port

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT``, for ``grpc.insecure_channel`` (the same after a restart)."""
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The current process's id (a restart gives a new one)."""
        if self._proc is None:
            raise RuntimeError(f"the {self.kind} has not been started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def directory(self) -> Path:
        """The temporary directory (database, log), made by ``start()``, removed by
        ``close()``."""
        if self._tmp is None:
            raise RuntimeError(f"the {self.kind} has no directory: not started, or closed")
        return self._tmp

    @property
    def log_path(self) -> Path:
        """The server's output (JSON lines), across restarts."""
        return self._log_path if self._log_path is not None else self.directory / "server.log"

    def log_text(self) -> str:
        """Everything the server wrote ('' once ``close()`` removed it)."""
        if self._tmp is None and self._log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self) -> None:
        """Start the server and return once it reports SERVING; ServerFailed if it exits or
        is not SERVING within the start-up timeout (it is stopped then).

        On Linux the server gets SIGTERM when the thread that started it ends, so start it
        from a thread that lives as long as it should (``async with`` starts it from the
        event loop's thread and only waits for it in a worker thread)."""
        self._spawn()
        self._await_ready()

    def _spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"the {self.kind} is already running (pid {self.pid})")
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"stepflow-{self.kind}-"))
        argv = [
            sys.executable, *self._python_flags, "-m", self._module, "serve",
            *self._serve_args(),
            *self._args,
            # Last, so they win: the port (the same on a restart) and a log to read it from.
            "--host", HOST,
            "--port", str(self._port),
            "--log-format", "json",
            "--log-level", self._log_level,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(self._env),
                cwd=self._cwd,
                start_new_session=True,  # a Ctrl-C reaches the test, which stops it in order
                preexec_fn=die_with_parent,
            )
        _RUNNING.add(self)

    def _await_ready(self) -> None:
        try:
            self._wait_ready(time.monotonic() + self._startup_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a graceful stop), SIGKILL after ``timeout``; the exit status (None if it
        never started). The port and the database are kept for ``start()``."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a test may have frozen it (SIGSTOP)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _RUNNING.discard(self)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        _RUNNING.discard(self)

    def restart(self) -> None:
        """Stop (gracefully) and start again on the same port with the same database."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove the temporary directory (the database and the log with
        it, unless ``log_path`` put the log elsewhere)."""
        try:
            self.stop()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        try:
            self._spawn()  # from this thread, which outlives the worker threads
            await asyncio.to_thread(self._await_ready)
        except BaseException:
            await asyncio.to_thread(self.close)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        where = self.target if self._port else "not started"
        return f"<{type(self).__name__} {where} running={self.running}>"

    # -- start-up --------------------------------------------------------------------------
    def _serve_args(self) -> list[str]:
        return ["--shutdown-grace", self._shutdown_grace]

    def _fail(self, why: str) -> ServerFailed:
        return ServerFailed(f"the stepflow {self.kind} {why}; its log ends:\n{self.log_tail()}")

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise self._fail(f"exited with status {self._proc.returncode} while starting")

    def _wait_ready(self, deadline: float) -> None:
        if not self._port:
            self._port = self._wait_port(deadline)
        self._wait_serving(deadline)

    def _wait_port(self, deadline: float) -> int:
        """The port the server reports in its log once bound (it was asked for port 0)."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            pending = b""
            while True:
                pending += log.read()
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    port = port_in(line, self._port_event)
                    if port:
                        return port
                self._check_alive()
                if time.monotonic() > deadline:
                    raise self._fail(f"did not report its port within {self._startup_timeout:g}s")
                time.sleep(POLL_S)

    def _wait_serving(self, deadline: float) -> None:
        last = "no answer"
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=self._health_service)
            while True:
                self._check_alive()
                try:
                    answer = health.Check(request, timeout=HEALTH_CALL_S)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                except grpc.RpcError as exc:
                    last = exc.code().name
                if time.monotonic() > deadline:
                    raise self._fail(
                        f"was not SERVING within {self._startup_timeout:g}s (last: {last})"
                    )
                time.sleep(POLL_S)


def port_in(line: bytes, event: str) -> int:
    try:
        record = json.loads(line)
    except ValueError:
        return 0
    if not isinstance(record, dict) or record.get("event") != event:
        return 0
    port = record.get("port")
    return port if isinstance(port, int) else 0
