"""``orchestrator-svc submit``, ``logs`` and ``cancel``: a client of both services, built on
``stepflow_client``, whose every failure is one line naming the service that is missing."""

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
from orchestrator_svc.server import DEFAULT_PORT
from stepflow_client import aio as client
from stepflow_common import cli
from stepflow_common.durations import parse_flag_duration
from stepflow_common.errors import InvalidArgument, NotFound, StepflowError
from stepflow_common.proto_status import STATUS_FROM_PB
from stepflow_common.status import Status
from stepflow_proto.v1 import job_pb2

PROG = "orchestrator-svc"
DEFAULT_ORCHESTRATOR = f"127.0.0.1:{DEFAULT_PORT}"
CONNECT_NOTICE_S = 1.0  # a wait longer than this is announced on stderr
CALL_TIMEOUT_S = 30.0


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


def client_settings(args: argparse.Namespace, connect_s: float) -> client.ClientSettings:
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


def refused(exc: StepflowError, service: str, address: str, flag: str) -> cli.CliError:
    """A failed call as the command's one line (by its gRPC status, which the error wraps)."""
    cause = exc.__cause__
    if isinstance(cause, aio.AioRpcError):
        return cli.rpc_error(cause, service, address, flag)
    return cli.CliError(str(exc), cli.EXIT_FAILED)


def connect_timeout(args: argparse.Namespace) -> float:
    try:
        return parse_flag_duration(args.connect_timeout, "--connect-timeout", allow_zero=True)
    except StepflowError as exc:  # a bad flag: usage, as a server's flags are
        raise cli.CliError(str(exc), cli.EXIT_USAGE) from exc


async def submit(args: argparse.Namespace) -> int:
    spec = _load_job(args.file)
    connect_s = connect_timeout(args)
    settings = client_settings(args, connect_s)
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
            raise refused(exc, "orchestrator", args.orchestrator, "--orchestrator") from exc
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
        from orchestrator_svc.cli_logs import show_failed_steps

        await show_failed_steps(monitor, manager_id)
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


async def show_logs(args: argparse.Namespace) -> int:
    from orchestrator_svc.cli_logs import logs

    connect_s = connect_timeout(args)
    settings = client_settings(args, connect_s)
    async with client.MonitorClient(args.monitor, **settings) as monitor:
        await _connect(monitor.channel, "monitor", args.monitor, "--monitor", connect_s, args)
    return await logs(args, settings)


async def cancel(args: argparse.Namespace) -> int:
    connect_s = connect_timeout(args)
    async with client.OrchestratorClient(
        args.orchestrator, **client_settings(args, connect_s)
    ) as orch:
        await _connect(
            orch.channel, "orchestrator", args.orchestrator, "--orchestrator", connect_s, args
        )
        try:
            job = await orch.cancel(args.job_id, reason=args.reason)
        except NotFound as exc:
            raise cli.CliError(f"no job {args.job_id}", cli.EXIT_FAILED) from exc
        except StepflowError as exc:
            raise refused(exc, "orchestrator", args.orchestrator, "--orchestrator") from exc
    from orchestrator_svc.follow import status_name

    print(f"{job.id}: {status_name(STATUS_FROM_PB.get(job.status))}")
    return cli.EXIT_OK
