"""Services as subprocesses on free ports, for the demo and for tests that drive real
processes: start one, wait until its health service reports SERVING, stop them all cleanly
(SIGTERM, then SIGKILL), with the tail of each one's log when something goes wrong."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.markup import escape

from stepflow_common.subprocesses import die_with_parent, server_env

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0  # first start imports everything and migrates the database
STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL after this long
LOG_TAIL_LINES = 20


class ServiceError(RuntimeError):
    """A service did not start, or died; the message carries its log's tail."""


@dataclass(slots=True)
class ServiceProcess:
    """A service running as a subprocess: the demo's, and the end-to-end tests'."""

    name: str
    health_service: str  # the gRPC service name its health check reports on
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    serving: bool = False  # it reported SERVING; before that it has no SIGTERM handler yet

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, SIGKILL after ``timeout_s``; the exit status (0 = clean)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return -signal.SIGKILL
        return self.process.returncode


def start_service(
    name: str,
    health_service: str,
    command: Sequence[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """Run ``command --host 127.0.0.1 --port <free port>``, its output in ``log_dir/NAME.log``.

    The environment is this one without any ``STEPFLOW_*`` variable (every flag reads one, so
    a token, TLS files or another database exported in the shell would change the service),
    plus ``env``. The service gets its own session, so a Ctrl-C in the terminal reaches only
    this process, which stops the services in order; and on Linux the kernel sends it SIGTERM
    if this process dies without stopping it.
    """
    port = free_port()
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--host", HOST, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env(env),
            cwd=log_dir,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    return ServiceProcess(name, health_service, port, process, log)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_serving(service: ServiceProcess, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll the health service until ``service`` reports SERVING, or fail with its log."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise ServiceError(
                    f"the {service.name} exited with status {service.process.returncode} "
                    f"while starting:\n{service.log_tail()}"
                )
            try:
                response = stub.Check(
                    health_pb2.HealthCheckRequest(service=service.health_service), timeout=1.0
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    service.serving = True
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.1)
    raise ServiceError(
        f"the {service.name} did not report SERVING within {timeout_s:.0f}s "
        f"(last: {last}):\n{service.log_tail()}"
    )


def stop_all(services: list[ServiceProcess], console: Console) -> bool:
    """SIGTERM each service, last started first; True when all exited cleanly (status 0)."""
    clean = True
    with signals_ignored():
        for service in reversed(services):
            code = service.stop()
            # Stopped while starting: it dies of the SIGTERM, which is the stop asked for.
            if code != 0 and not (code == -signal.SIGTERM and not service.serving):
                clean = False
                console.print(
                    f"[red]the {service.name} exited with status {code}:[/]\n"
                    f"{escape(service.log_tail())}"
                )
    if services and clean:
        console.print("both services stopped cleanly")
    return clean


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ctrl-C again while the services stop must not leave one running."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
