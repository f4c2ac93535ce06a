"""``orchestrator-svc``: serve the OrchestratorService, submit a job file, cancel a job."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator

from grpc import aio

from orchestrator_svc import definitions
from orchestrator_svc.convert import job_from_pb
from orchestrator_svc.records import Job
from orchestrator_svc.server import DEFAULT_MONITOR, DEFAULT_PORT, OrchestratorConfig, serve
from orchestrator_svc.workers.registry import WorkerLoadError
from stepflow_client import aio as client
from stepflow_common import cli, logs, metrics, serving, tracing
from stepflow_common.cli import add_flag, add_log_level, add_server_flags, security_from
from stepflow_common.durations import parse_flag_duration
from stepflow_common.errors import InvalidArgument, NotFound, StepflowError
from stepflow_common.proto_status import STATUS_FROM_PB
from stepflow_common.status import Status
from stepflow_proto.v1 import job_pb2

PROG = "orchestrator-svc"
COMMAND = "orchestrator"
DEFAULT_ORCHESTRATOR = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_CONNECT_TIMEOUT = "10s"
CONNECT_NOTICE_S = 1.0  # a wait longer than this is announced on stderr
CALL_TIMEOUT_S = 30.0
MIN_LEASE_S = 1.0  # the monitor refuses shorter leases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
        description="stepflow orchestrator: runs multi-step jobs and streams their child events "
        "to the monitor.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser(
        "serve",
        help="run the OrchestratorService gRPC server",
        description="Run the OrchestratorService gRPC server (health and reflection on): it runs "
        "submitted jobs step by step and streams every child event to the monitor. It holds a "
        "lease in the monitor, renewed every --lease/3: at start it resumes the unfinished jobs "
        "this instance (--owner) left behind, and it adopts the jobs of orchestrators whose "
        "lease lapsed. SIGTERM or Ctrl-C stops it gracefully: no new children start, running "
        "ones get --shutdown-grace to finish, and the lease is released so another "
        "orchestrator continues its jobs at once.",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    add_flag(serve_p, COMMAND, "--host", "127.0.0.1", "address to listen on")
    add_flag(serve_p, COMMAND, "--port", DEFAULT_PORT, "port to listen on", type_=int)
    add_flag(serve_p, COMMAND, "--monitor", DEFAULT_MONITOR, "the monitor's HOST:PORT")
    add_flag(
        serve_p,
        COMMAND,
        "--owner",
        "",
        "this instance's stable name; its unfinished jobs are resumed when it starts",
        shown_default="orchestrator@HOSTNAME:PORT",
    )
    add_flag(serve_p, COMMAND, "--monitor-token", "", "bearer token to send to the monitor")
    add_flag(
        serve_p, COMMAND, "--monitor-tls-ca", "", "PEM CA to verify the monitor's TLS certificate"
    )
    add_flag(
        serve_p,
        COMMAND,
        "--monitor-tls-cert",
        "",
        "PEM client certificate for mutual TLS with the monitor (with --monitor-tls-key)",
    )
    add_flag(serve_p, COMMAND, "--monitor-tls-key", "", "PEM private key for --monitor-tls-cert")
    add_flag(
        serve_p,
        COMMAND,
        "--shutdown-grace",
        "10s",
        "time in-flight calls and running children get on SIGTERM (0s: stop at once)",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--lease",
        "30s",
        "this long after its last heartbeat, its jobs are no longer its own and another "
        "orchestrator adopts them (heartbeats every lease/3)",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--keepalive-time",
        "30s",
        "ping the monitor after this long without traffic (at least the monitor's "
        "--keepalive-permit)",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--keepalive-timeout",
        "10s",
        "a ping unanswered this long drops the connection to the monitor (it is re-dialled)",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--monitor-wait-log-every",
        "10s",
        "while the monitor is unreachable, say so this often",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--metrics-port",
        0,
        "serve Prometheus /metrics on this port (0 = off)",
        type_=int,
    )
    add_server_flags(serve_p, COMMAND)

    submit_p = sub.add_parser(
        "submit",
        help="submit a job file (TOML or JSON)",
        description="Submit a job definition file (TOML or JSON) to the orchestrator and print "
        "the manager id. With --follow, show live per-step progress from the monitor until the "
        "job ends, then its step table; the exit status is 0 if the job completed, 3 if not. "
        "Ctrl-C stops following (exit status 130); the job goes on.",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    submit_p.add_argument("file", help="job definition file (.toml or .json)")
    submit_p.add_argument(
        "--follow", action="store_true", help="show live per-step progress until it ends"
    )
    add_flag(
        submit_p, COMMAND, "--orchestrator", DEFAULT_ORCHESTRATOR, "the orchestrator's HOST:PORT"
    )
    add_flag(
        submit_p, COMMAND, "--monitor", DEFAULT_MONITOR, "the monitor's HOST:PORT (for --follow)"
    )
    add_flag(
        submit_p,
        COMMAND,
        "--request-id",
        "",
        "idempotency key: the same key again returns the same job (never read from the "
        "environment, where one stale value would make every submit the same)",
        env=False,
        shown_default="a new one",
    )
    add_flag(submit_p, COMMAND, "--auth-token", "", "bearer token for both services")
    cli.add_client_tls_flags(submit_p, COMMAND, "the orchestrator's and the monitor's")
    _client_flags(submit_p)

    cancel_p = sub.add_parser(
        "cancel",
        help="cancel a job (manager, step or child)",
        description="Cancel a job (manager, step or child) and everything under it, through the "
        "orchestrator; prints the job's new status.",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    cancel_p.add_argument("job_id")
    add_flag(
        cancel_p, COMMAND, "--orchestrator", DEFAULT_ORCHESTRATOR, "the orchestrator's HOST:PORT"
    )
    add_flag(cancel_p, COMMAND, "--reason", "", "why (recorded as the job's error)")
    add_flag(cancel_p, COMMAND, "--auth-token", "", "bearer token")
    cli.add_client_tls_flags(cancel_p, COMMAND, "the orchestrator's")
    _client_flags(cancel_p)
    return parser


def _client_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        COMMAND,
        "--connect-timeout",
        DEFAULT_CONNECT_TIMEOUT,
        "how long to wait for a service that is not answering yet (0s: fail at once)",
    )
    add_log_level(parser, COMMAND, "warning")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.log_level == "debug"
    if args.command == "serve":
        logs.configure(args.log_format, args.log_level)
        return cli.run(PROG, lambda: _serve(args), debug=debug, log_as="orchestrator")
    logs.configure("console", args.log_level)
    if args.command == "submit":
        return cli.run(PROG, lambda: asyncio.run(_submit(args)), debug=debug)
    return cli.run(PROG, lambda: asyncio.run(_cancel(args)), debug=debug)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _serve_config(args)
        cli.check_listen(args.host, args.port)
        metrics.serve_only("orchestrator")
        if asyncio.run(serve(config)) != 0:
            # The monitor refused this orchestrator (the reason is already logged).
            return cli.EXIT_FAILED
    except InvalidArgument as exc:
        raise cli.CliError(str(exc), cli.EXIT_USAGE) from exc
    except WorkerLoadError as exc:
        raise cli.CliError(f"{exc}; fix or uninstall that plugin package", cli.EXIT_FAILED) from exc
    except serving.CannotListen as exc:
        raise cli.CliError(
            f"{exc}; stop whatever uses the port or choose another --port", cli.EXIT_UNREACHABLE
        ) from exc
    return cli.EXIT_OK


def _serve_config(args: argparse.Namespace) -> OrchestratorConfig:
    cli.check_tls(
        args.monitor_tls_ca,
        args.monitor_tls_cert,
        args.monitor_tls_key,
        ("--monitor-tls-ca", "--monitor-tls-cert", "--monitor-tls-key"),
    )
    return OrchestratorConfig(
        host=args.host,
        port=args.port,
        monitor=args.monitor,
        owner=args.owner,
        security=security_from(args),
        monitor_security=serving.Security(
            auth_token=args.monitor_token,
            tls_ca=args.monitor_tls_ca,
            tls_cert=args.monitor_tls_cert,
            tls_key=args.monitor_tls_key,
        ),
        shutdown_grace_s=parse_flag_duration(
            args.shutdown_grace, "--shutdown-grace", allow_zero=True
        ),
        lease_s=_lease(args.lease),
        metrics_port=args.metrics_port,
        keepalive=serving.ClientKeepalive(
            time_s=parse_flag_duration(args.keepalive_time, "--keepalive-time"),
            timeout_s=parse_flag_duration(args.keepalive_timeout, "--keepalive-timeout"),
        ),
        monitor_wait_log_s=parse_flag_duration(
            args.monitor_wait_log_every, "--monitor-wait-log-every"
        ),
        otlp_endpoint=tracing.check_endpoint(args.otlp_endpoint),
    )


def _lease(value: str) -> float:
    lease_s = parse_flag_duration(value, "--lease")
    if lease_s < MIN_LEASE_S:
        raise InvalidArgument(f"--lease: at least {MIN_LEASE_S:g}s, got {value}")
    return lease_s


def _load_job(path: str) -> definitions.JobSpec:
    """The job file, or one line saying what is wrong with it."""
    try:
        return definitions.load_file(path)
    except IsADirectoryError:
        raise cli.CliError(
            f"{path} is a directory; give a job file (.toml or .json)", cli.EXIT_USAGE
        ) from None
    except FileNotFoundError:
        raise cli.CliError(f"no job file at {path}", cli.EXIT_USAGE) from None
    except OSError as exc:
        raise cli.CliError(f"cannot read {path}: {exc.strerror or exc}", cli.EXIT_USAGE) from None
    except InvalidArgument as exc:
        message = str(exc)
        if not message.startswith(path):
            message = f"{path}: {message}"
        raise cli.CliError(message, cli.EXIT_USAGE) from None


async def _connect(
    channel: aio.Channel,
    service: str,
    address: str,
    flag: str,
    timeout_s: float,
    args: argparse.Namespace | None = None,
) -> None:
    """Wait until ``channel`` is connected, saying so when it takes a moment.

    With a zero timeout nothing is awaited: the call itself then fails at once if nothing
    answers.
    """
    if timeout_s <= 0:
        return
    notice_s = min(CONNECT_NOTICE_S, timeout_s)
    try:
        await asyncio.wait_for(channel.channel_ready(), notice_s)
        return
    except TimeoutError:
        pass
    if timeout_s > notice_s:
        print(
            f"{PROG}: waiting up to {timeout_s:g}s for the {service} at {address}",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.channel_ready(), timeout_s - notice_s)
            return
    hint = ""
    if args is not None and args.tls_ca and not args.tls_cert:
        # A service that requires client certificates closes the connection at the handshake,
        # which looks the same as nothing listening.
        hint = "; if it requires client certificates, give --tls-cert and --tls-key"
    raise cli.CliError(
        f"cannot reach the {service} at {address} (nothing answered within {timeout_s:g}s); "
        f"is it running there? Point {flag} at it{hint}",
        cli.EXIT_UNREACHABLE,
    )


def _client_settings(args: argparse.Namespace, connect_s: float) -> client.ClientSettings:
    """The connection settings submit and cancel share (checked: CliError when a TLS file is
    missing or a certificate comes without its key).

    ``--connect-timeout 0s`` means "fail at once if nothing answers", so the channel's retry
    on UNAVAILABLE, whose backoff would wait seconds, is off for it.
    """
    cli.check_tls(args.tls_ca, args.tls_cert, args.tls_key, ("--tls-ca", "--tls-cert", "--tls-key"))
    settings: client.ClientSettings = {
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "token": args.auth_token,
        "timeout": CALL_TIMEOUT_S,
    }
    if connect_s <= 0:
        settings["retry"] = None
    return settings


def _refused(exc: StepflowError, service: str, address: str, flag: str) -> cli.CliError:
    """A failed call as the command's one line (by its gRPC status, which the error wraps)."""
    cause = exc.__cause__
    if isinstance(cause, aio.AioRpcError):
        return cli.rpc_error(cause, service, address, flag)
    return cli.CliError(str(exc), cli.EXIT_FAILED)


def _connect_timeout(args: argparse.Namespace) -> float:
    try:
        return parse_flag_duration(args.connect_timeout, "--connect-timeout", allow_zero=True)
    except StepflowError as exc:  # a bad flag: usage, as a server's flags are
        raise cli.CliError(str(exc), cli.EXIT_USAGE) from exc


async def _submit(args: argparse.Namespace) -> int:
    spec = _load_job(args.file)
    connect_s = _connect_timeout(args)
    settings = _client_settings(args, connect_s)
    async with contextlib.AsyncExitStack() as stack:
        monitor: client.MonitorClient | None = None
        if args.follow:
            # The monitor first: with a wrong --monitor nothing is submitted (a job running
            # unseen, and a second one when the command is run again, is worse than an error).
            monitor = await stack.enter_async_context(
                client.MonitorClient(args.monitor, **settings)
            )
            await _connect(monitor.channel, "monitor", args.monitor, "--monitor", connect_s, args)
        orchestrator = await stack.enter_async_context(
            client.OrchestratorClient(args.orchestrator, **settings)
        )
        await _connect(
            orchestrator.channel,
            "orchestrator",
            args.orchestrator,
            "--orchestrator",
            connect_s,
            args,
        )
        try:
            manager_id = await orchestrator.submit(
                definitions.to_proto(spec), request_id=args.request_id
            )
        except StepflowError as exc:
            raise _refused(exc, "orchestrator", args.orchestrator, "--orchestrator") from exc
        if monitor is None:
            print(manager_id)
            return cli.EXIT_OK
        print(
            f"following job {manager_id} (Ctrl-C leaves it running)",
            file=sys.stderr,
            flush=True,
        )
        final = await _follow_until_interrupted(args, monitor, manager_id)
    if final.status is Status.COMPLETED:
        return cli.EXIT_OK
    return cli.EXIT_JOB_NOT_COMPLETED


async def _records(jobs: AsyncIterator[job_pb2.Job]) -> AsyncIterator[Job]:
    async for job in jobs:
        yield job_from_pb(job)


async def _follow_until_interrupted(
    args: argparse.Namespace, monitor: client.MonitorClient, manager_id: str
) -> Job:
    """The live view until the job ends; Ctrl-C stops the view (not the job) and says how to
    cancel it."""
    from orchestrator_svc.follow import follow

    task = asyncio.ensure_future(follow(_records(monitor.watch(manager_id))))
    interrupted: list[bool] = []

    def on_sigint() -> None:
        interrupted.append(True)
        task.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
        cancel = f"{PROG} cancel {manager_id}"
        if args.orchestrator != DEFAULT_ORCHESTRATOR:
            cancel += f" --orchestrator {args.orchestrator}"
        raise cli.CliError(
            f"stopped following job {manager_id}; it goes on. To cancel it: {cancel}",
            cli.EXIT_INTERRUPTED,
        ) from None
    except StepflowError as exc:  # the watch failed for good (not a retryable outage)
        raise cli.CliError(f"cannot follow job {manager_id}: {exc}", cli.EXIT_FAILED) from exc
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _cancel(args: argparse.Namespace) -> int:
    connect_s = _connect_timeout(args)
    async with client.OrchestratorClient(
        args.orchestrator, **_client_settings(args, connect_s)
    ) as orch:
        await _connect(
            orch.channel, "orchestrator", args.orchestrator, "--orchestrator", connect_s, args
        )
        try:
            job = await orch.cancel(args.job_id, reason=args.reason)
        except NotFound as exc:
            raise cli.CliError(f"no job {args.job_id}", cli.EXIT_FAILED) from exc
        except StepflowError as exc:
            raise _refused(exc, "orchestrator", args.orchestrator, "--orchestrator") from exc
    from orchestrator_svc.follow import status_name

    print(f"{job.id}: {status_name(STATUS_FROM_PB.get(job.status))}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
