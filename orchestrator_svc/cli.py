"""``orchestrator-svc``: serve the OrchestratorService, submit a job file, print a job's log,
cancel a job."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from orchestrator_svc.cli_client import DEFAULT_ORCHESTRATOR, PROG, cancel, show_logs, submit
from orchestrator_svc.remote.broker import (
    DEFAULT_QUEUE,
    BrokerSettings,
    BrokerUnreachable,
    check_broker_url,
    check_queue_name,
)
from orchestrator_svc.server import DEFAULT_MONITOR, DEFAULT_PORT, OrchestratorConfig, serve
from orchestrator_svc.workers.registry import WorkerLoadError
from stepflow_common import cli, logs, metrics, serving, tracing
from stepflow_common.cli import add_flag, add_log_level, add_server_flags, security_from
from stepflow_common.durations import parse_flag_duration
from stepflow_common.errors import InvalidArgument

COMMAND = "orchestrator"
DEFAULT_CONNECT_TIMEOUT = "10s"
MIN_LEASE_S = 1.0  # the monitor refuses shorter leases
DEFAULT_RUNNER_CONCURRENCY = 8


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
    add_flag(
        serve_p,
        COMMAND,
        "--broker-url",
        "",
        "RabbitMQ URL (amqp://USER:PASSWORD@HOST:5672//) that steps with executor = "
        '"celery" send their children to; without it such jobs are refused',
    )
    add_flag(serve_p, COMMAND, "--queue", DEFAULT_QUEUE, "the broker queue of those children")
    add_server_flags(serve_p, COMMAND)
    _runner_parser(sub)

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

    logs_p = sub.add_parser(
        "logs",
        help="print a job's log (--follow: until the job ends)",
        description="Print the log of a job (manager, step or child) from the monitor, a line "
        "each: TIME STEP[/CHILD] SOURCE MESSAGE. With --follow, go on printing each line as it "
        "is committed until the job ends; the exit status is then submit --follow's (0 "
        "completed, 3 otherwise).",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    logs_p.add_argument("job_id")
    logs_p.add_argument("--follow", action="store_true", help="follow until the job ends")
    add_flag(logs_p, COMMAND, "--step", "", "only this step's lines (by its name)")
    add_flag(logs_p, COMMAND, "--monitor", DEFAULT_MONITOR, "the monitor's HOST:PORT")
    add_flag(logs_p, COMMAND, "--auth-token", "", "bearer token")
    cli.add_client_tls_flags(logs_p, COMMAND, "the monitor's")
    _client_flags(logs_p)

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


def _runner_parser(sub: Any) -> None:
    runner_p = sub.add_parser(
        "runner",
        help="run children of executor-celery steps (a Celery worker)",
        description='Run the children of steps whose executor is "celery": a Celery worker '
        "on --queue that runs --concurrency children at once, with the workers (plugins) "
        "installed here, and reports each child's events and output straight to the monitor. "
        "Run as many as you like, on any machine that has stepflow, the plugins and the files "
        "the steps' commands read. It starts only with the settings that keep every child "
        "counted once (late acks, one message prefetched per slot, broker heartbeats, a quorum "
        "queue with a delivery limit and the dead-letter queue NAME.dead). SIGTERM or Ctrl-C "
        "stops taking messages and lets the running children finish.",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    add_flag(
        runner_p, COMMAND, "--broker-url", "", "RabbitMQ URL (amqp://USER:PASSWORD@HOST:5672//)"
    )
    add_flag(runner_p, COMMAND, "--monitor", DEFAULT_MONITOR, "the monitor's HOST:PORT")
    add_flag(runner_p, COMMAND, "--queue", DEFAULT_QUEUE, "the broker queue to take children from")
    add_flag(
        runner_p,
        COMMAND,
        "--concurrency",
        DEFAULT_RUNNER_CONCURRENCY,
        "children run at once",
        type_=int,
    )
    add_flag(
        runner_p,
        COMMAND,
        "--name",
        "",
        "this runner's name, shown as Job.runner of the children it runs",
        shown_default="runner@HOSTNAME:PID",
    )
    add_flag(
        runner_p,
        COMMAND,
        "--broker-heartbeat",
        "10s",
        "broker heartbeat: a runner silent for about this long loses its messages to "
        "another (and its processes are killed after half of it)",
    )
    add_flag(runner_p, COMMAND, "--monitor-token", "", "bearer token to send to the monitor")
    add_flag(
        runner_p, COMMAND, "--monitor-tls-ca", "", "PEM CA to verify the monitor's TLS certificate"
    )
    add_flag(runner_p, COMMAND, "--monitor-tls-cert", "", "PEM client certificate (mutual TLS)")
    add_flag(runner_p, COMMAND, "--monitor-tls-key", "", "PEM private key for --monitor-tls-cert")
    add_flag(runner_p, COMMAND, "--log-format", "auto", "console | json | auto (console on a tty)")
    add_log_level(runner_p, COMMAND)


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
    if args.command == "runner":
        logs.configure(args.log_format, args.log_level)
        return cli.run(PROG, lambda: _runner(args), debug=debug, log_as="runner")
    logs.configure("console", args.log_level)
    if args.command == "submit":
        return cli.run(PROG, lambda: asyncio.run(submit(args)), debug=debug)
    if args.command == "logs":
        return cli.run(PROG, lambda: asyncio.run(show_logs(args)), debug=debug)
    return cli.run(PROG, lambda: asyncio.run(cancel(args)), debug=debug)


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
    except BrokerUnreachable as exc:
        raise cli.CliError(str(exc), cli.EXIT_UNREACHABLE) from exc
    except serving.CannotListen as exc:
        raise cli.CliError(
            f"{exc}; stop whatever uses the port or choose another --port", cli.EXIT_UNREACHABLE
        ) from exc
    return cli.EXIT_OK


def _runner(args: argparse.Namespace) -> int:
    from orchestrator_svc.remote import runner

    try:
        if not args.broker_url:
            raise InvalidArgument("--broker-url: required (the RabbitMQ the orchestrators use)")
        cli.check_tls(
            args.monitor_tls_ca,
            args.monitor_tls_cert,
            args.monitor_tls_key,
            ("--monitor-tls-ca", "--monitor-tls-cert", "--monitor-tls-key"),
        )
        settings = _broker(args, heartbeat=args.broker_heartbeat)
        assert settings is not None  # --broker-url is given
        config = runner.RunnerConfig(
            broker=settings,
            monitor=args.monitor,
            monitor_security=serving.Security(
                auth_token=args.monitor_token,
                tls_ca=args.monitor_tls_ca,
                tls_cert=args.monitor_tls_cert,
                tls_key=args.monitor_tls_key,
            ),
            concurrency=args.concurrency,
            name=args.name,
        )
        return runner.run(config, log_level=args.log_level)
    except InvalidArgument as exc:
        raise cli.CliError(str(exc), cli.EXIT_USAGE) from exc
    except WorkerLoadError as exc:
        raise cli.CliError(f"{exc}; fix or uninstall that plugin package", cli.EXIT_FAILED) from exc
    except BrokerUnreachable as exc:
        raise cli.CliError(str(exc), cli.EXIT_UNREACHABLE) from exc


def _broker(args: argparse.Namespace, *, heartbeat: str = "10s") -> BrokerSettings | None:
    if not args.broker_url:
        return None
    return BrokerSettings(
        url=check_broker_url(args.broker_url),
        queue=check_queue_name(args.queue),
        heartbeat_s=parse_flag_duration(heartbeat, "--broker-heartbeat"),
    )


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
        broker=_broker(args),
    )


def _lease(value: str) -> float:
    lease_s = parse_flag_duration(value, "--lease")
    if lease_s < MIN_LEASE_S:
        raise InvalidArgument(f"--lease: at least {MIN_LEASE_S:g}s, got {value}")
    return lease_s


if __name__ == "__main__":
    sys.exit(main())
