"""``orchestrator-svc``: serve the OrchestratorService, submit a job file, cancel a job."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import grpc
from grpc import aio

from orchestrator_svc import definitions
from orchestrator_svc.server import DEFAULT_MONITOR, DEFAULT_PORT, OrchestratorConfig, serve
from stepflow_common import logs, serving
from stepflow_common.cli import add_flag, add_server_flags, security_from
from stepflow_common.durations import parse_duration
from stepflow_common.errors import InvalidArgument
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

COMMAND = "orchestrator"
DEFAULT_ORCHESTRATOR = f"127.0.0.1:{DEFAULT_PORT}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator-svc",
        description="stepflow orchestrator: runs multi-step jobs and streams their child events "
        "to the monitor.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser(
        "serve",
        help="run the OrchestratorService gRPC server",
        description="Run the OrchestratorService gRPC server (health and reflection on): it runs "
        "submitted jobs step by step and streams every child event to the monitor. At start it "
        "fails the unfinished jobs this instance (--owner) left behind; SIGTERM or Ctrl-C stops "
        "it gracefully.",
    )
    add_flag(serve_p, COMMAND, "--host", "127.0.0.1", "address to listen on")
    add_flag(serve_p, COMMAND, "--port", DEFAULT_PORT, "port to listen on", type_=int)
    add_flag(serve_p, COMMAND, "--monitor", DEFAULT_MONITOR, "the monitor's HOST:PORT")
    add_flag(
        serve_p,
        COMMAND,
        "--owner",
        "",
        "this instance's stable name; its unfinished jobs are failed when it starts "
        "(default: orchestrator@HOSTNAME:PORT)",
    )
    add_flag(serve_p, COMMAND, "--monitor-token", "", "bearer token to send to the monitor")
    add_flag(
        serve_p, COMMAND, "--monitor-tls-ca", "", "PEM CA to verify the monitor's TLS certificate"
    )
    add_flag(serve_p, COMMAND, "--shutdown-grace", "10s", "time in-flight calls get on SIGTERM")
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
        "job ends, then its step table; the exit status is 0 if the job completed, 3 if not.",
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
    add_flag(submit_p, COMMAND, "--request-id", "", "idempotency key (default: a new one)")
    add_flag(submit_p, COMMAND, "--auth-token", "", "bearer token for both services")

    cancel_p = sub.add_parser(
        "cancel",
        help="cancel a job (manager, step or child)",
        description="Cancel a job (manager, step or child) and everything under it, through the "
        "orchestrator; prints the job's new status.",
    )
    cancel_p.add_argument("job_id")
    add_flag(
        cancel_p, COMMAND, "--orchestrator", DEFAULT_ORCHESTRATOR, "the orchestrator's HOST:PORT"
    )
    add_flag(cancel_p, COMMAND, "--reason", "", "why (recorded as the job's error)")
    add_flag(cancel_p, COMMAND, "--auth-token", "", "bearer token")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            logs.configure(args.log_format, args.log_level)
            return asyncio.run(serve(_serve_config(args)))
        logs.configure("console", "warning")
        if args.command == "submit":
            return asyncio.run(_submit(args))
        return asyncio.run(_cancel(args))
    except InvalidArgument as exc:
        print(f"orchestrator-svc: {exc}", file=sys.stderr)
        return 2
    except aio.AioRpcError as exc:
        print(f"orchestrator-svc: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _serve_config(args: argparse.Namespace) -> OrchestratorConfig:
    return OrchestratorConfig(
        host=args.host,
        port=args.port,
        monitor=args.monitor,
        owner=args.owner,
        security=security_from(args),
        monitor_security=serving.Security(
            auth_token=args.monitor_token, tls_ca=args.monitor_tls_ca
        ),
        shutdown_grace_s=parse_duration(args.shutdown_grace, "--shutdown-grace"),
        metrics_port=args.metrics_port,
        keepalive=serving.ClientKeepalive(
            time_s=parse_duration(args.keepalive_time, "--keepalive-time"),
            timeout_s=parse_duration(args.keepalive_timeout, "--keepalive-timeout"),
        ),
        monitor_wait_log_s=parse_duration(args.monitor_wait_log_every, "--monitor-wait-log-every"),
    )


async def _submit(args: argparse.Namespace) -> int:
    spec = definitions.load_file(args.file)
    security = serving.Security(auth_token=args.auth_token)
    async with serving.channel(args.orchestrator, security) as channel:
        stub = o_grpc.OrchestratorServiceStub(channel)
        response = await stub.SubmitJob(
            o.SubmitJobRequest(
                definition=definitions.to_proto(spec),
                request_id=args.request_id or uuid.uuid4().hex,
            ),
            timeout=30,
            wait_for_ready=True,
        )
    manager_id = response.manager_id
    if not args.follow:
        print(manager_id)
        return 0
    from orchestrator_svc.follow import follow
    from orchestrator_svc.monitor_client import MonitorClient

    async with serving.channel(args.monitor, security) as channel:
        final = await follow(MonitorClient(channel).watch(manager_id))
    from stepflow_proto.v1 import job_pb2

    return 0 if final.status == job_pb2.JOB_STATUS_COMPLETED else 3


async def _cancel(args: argparse.Namespace) -> int:
    security = serving.Security(auth_token=args.auth_token)
    async with serving.channel(args.orchestrator, security) as channel:
        stub = o_grpc.OrchestratorServiceStub(channel)
        try:
            response = await stub.CancelJob(
                o.CancelJobRequest(job_id=args.job_id, reason=args.reason), timeout=30
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                print(f"orchestrator-svc: no job {args.job_id}", file=sys.stderr)
                return 1
            raise
    from orchestrator_svc.follow import status_name

    print(f"{response.job.id}: {status_name(response.job.status)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
