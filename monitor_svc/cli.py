"""``monitor-svc``: serve the MonitorService, or migrate its database."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from monitor_svc.lifecycle import StepTimers
from monitor_svc.records import DocumentLimits
from monitor_svc.server import DEFAULT_HTTP_PORT, DEFAULT_PORT, MonitorConfig, serve
from monitor_svc.store.engine import (
    DEFAULT_DATABASE_URL,
    SQLITE_SYNCHRONOUS_DEFAULT,
    SQLITE_SYNCHRONOUS_MODES,
)
from monitor_svc.web.server import CannotServeWeb
from stepflow_common import cli, logs, metrics, serving, tracing
from stepflow_common.cli import add_flag, add_log_level, add_server_flags, security_from
from stepflow_common.durations import parse_flag_duration
from stepflow_common.errors import InvalidArgument
from stepflow_common.limits import MAX_LOG_BYTES, MAX_METADATA_BYTES
from stepflow_common.serving import CannotListen

PROG = "monitor-svc"
COMMAND = "monitor"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
        description="stepflow monitor: owns job records and manager metadata, ingests child "
        "events, and ends steps.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser(
        "serve",
        help="run the MonitorService gRPC server",
        description="Run the MonitorService gRPC server (health and reflection on): it owns job "
        "records and manager metadata, ingests the orchestrator's child events, fires deadlines "
        "and ends steps. Migrates the database first; SIGTERM or Ctrl-C stops it gracefully.",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    add_flag(serve_p, COMMAND, "--host", "127.0.0.1", "address to listen on")
    add_flag(serve_p, COMMAND, "--port", DEFAULT_PORT, "port to listen on", type_=int)
    add_flag(
        serve_p,
        COMMAND,
        "--http-port",
        DEFAULT_HTTP_PORT,
        "serve the web view and its JSON API on this port, on --host (0 = off)",
        type_=int,
    )
    _database_flag(serve_p)
    add_flag(
        serve_p,
        COMMAND,
        "--default-wait-timeout",
        "30m",
        "how long a step without its own timeout may wait for its children",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--grace-period",
        "30s",
        "a handed-off step with no seal and no child by then ends completed",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--shutdown-grace",
        "10s",
        "time in-flight calls get on SIGTERM (0s: stop at once)",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--orphan-timeout",
        "10m",
        "a job whose orchestrator's lease lapsed, adopted by no other orchestrator by then, "
        "ends failed (orchestrator_lost)",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--keepalive-permit",
        "10s",
        "shortest interval between a client's keepalive pings that is accepted (clients must "
        "ping no more often)",
    )
    add_flag(
        serve_p,
        COMMAND,
        "--max-ping-strikes",
        2,
        "pings sooner than --keepalive-permit tolerated before the connection is closed "
        "(0 = any number)",
        type_=int,
    )
    add_flag(
        serve_p,
        COMMAND,
        "--max-metadata-bytes",
        MAX_METADATA_BYTES,
        "largest metadata document of a job (protobuf-encoded); a merge that would pass it is "
        "RESOURCE_EXHAUSTED. Above ~1.5 MiB a manager's answers may not fit a default "
        "client's 4 MiB",
        type_=int,
    )
    add_flag(
        serve_p,
        COMMAND,
        "--max-log-bytes",
        MAX_LOG_BYTES,
        "bytes a job's log holds; past it output lines are dropped, but each step's first and "
        "last lines and the monitor's own lines about steps and the job are kept",
        type_=int,
    )
    add_flag(
        serve_p,
        COMMAND,
        "--sqlite-synchronous",
        SQLITE_SYNCHRONOUS_DEFAULT,
        "full: every acknowledged write survives a power loss; normal: faster, survives a "
        "crash of the process but may lose the last writes on power loss or an OS crash",
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
    migrate_p = sub.add_parser(
        "migrate",
        help="bring the database schema up to date",
        description="Apply the database migrations (Alembic), creating the schema in an empty "
        "database. `serve` does this at start too.",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    _database_flag(migrate_p)
    add_log_level(migrate_p, COMMAND)
    prune_p = sub.add_parser(
        "prune",
        help="delete finished jobs older than a cutoff",
        description="Delete finished jobs (whole manager trees: steps, children, counts) that "
        "ended longer ago than --older-than, a batch of managers per short transaction, so "
        "live traffic is not blocked. Live jobs are never touched.",
        epilog=cli.EXIT_CODES_HELP,
        formatter_class=cli.HelpFormatter,
    )
    _database_flag(prune_p)
    add_flag(
        prune_p,
        COMMAND,
        "--older-than",
        "168h",
        "delete managers that finished longer ago than this (e.g. 90s, 30m, 2h; 0s: every "
        "finished job)",
    )
    add_flag(prune_p, COMMAND, "--batch-size", 100, "managers deleted per transaction", type_=int)
    add_log_level(prune_p, COMMAND)
    return parser


def _database_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        COMMAND,
        "--database-url",
        DEFAULT_DATABASE_URL,
        "SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user@host/db",
        extra_env=("STEPFLOW_DATABASE_URL",),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.log_level == "debug"
    if args.command == "serve":
        logs.configure(args.log_format, args.log_level)
        return cli.run(PROG, lambda: _serve(args), debug=debug, log_as="monitor")
    logs.configure("console", args.log_level)
    if args.command == "migrate":
        return cli.run(PROG, lambda: _with_database(args, _migrate), debug=debug)
    return cli.run(PROG, lambda: _with_database(args, _prune), debug=debug)


def _with_database(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """``body``, with a bad --database-url or an unusable database as one line naming it."""
    from monitor_svc.store import doctor

    try:
        doctor.check_url(args.database_url)
        return body(args)
    except InvalidArgument as exc:
        raise cli.CliError(str(exc), cli.EXIT_USAGE) from exc
    except Exception as exc:
        message = doctor.describe(exc, args.database_url)
        if message is None:
            raise
        raise cli.CliError(message, cli.EXIT_UNREACHABLE) from exc


def _serve(args: argparse.Namespace) -> int:
    return _with_database(args, _serve_with)


def _serve_with(args: argparse.Namespace) -> int:
    config = config_from(args)
    cli.check_listen(args.host, args.port)
    if config.http_port:
        cli.check_listen(args.host, config.http_port, flag="--http-port")
    metrics.serve_only("monitor")
    try:
        asyncio.run(serve(config))
    except CannotServeWeb as exc:
        raise cli.CliError(str(exc), cli.EXIT_UNREACHABLE) from exc
    except CannotListen as exc:
        raise cli.CliError(
            f"{exc}; stop whatever uses the port or choose another --port", cli.EXIT_UNREACHABLE
        ) from exc
    return cli.EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    from monitor_svc.store import doctor
    from monitor_svc.store.engine import safe_url
    from monitor_svc.store.migrate import upgrade

    where = safe_url(args.database_url)
    before = doctor.current_revision(args.database_url)
    head = doctor.head_revision()
    if before == head:
        print(f"{where}: already at the latest schema ({head}); nothing to do")
        return cli.EXIT_OK
    upgrade(args.database_url)
    if before is None:
        print(f"{where}: created the schema (revision {head})")
    else:
        print(f"{where}: migrated the schema from revision {before} to {head}")
    return cli.EXIT_OK


def config_from(args: argparse.Namespace) -> MonitorConfig:
    """The server's configuration from ``serve``'s flags; InvalidArgument names a bad one."""
    if args.max_metadata_bytes < 1024:
        raise InvalidArgument("--max-metadata-bytes: must be at least 1024")
    if not 0 <= args.http_port <= 65535:
        raise InvalidArgument(f"--http-port: {args.http_port} is not a port (0 = off)")
    if args.max_log_bytes < 1024:
        raise InvalidArgument("--max-log-bytes: must be at least 1024")
    synchronous = args.sqlite_synchronous.lower()
    if synchronous not in SQLITE_SYNCHRONOUS_MODES:
        raise InvalidArgument(
            f"--sqlite-synchronous: {args.sqlite_synchronous!r} is not one of "
            f"{', '.join(SQLITE_SYNCHRONOUS_MODES)}"
        )
    return MonitorConfig(
        database_url=args.database_url,
        host=args.host,
        port=args.port,
        timers=StepTimers(
            default_wait_timeout_s=parse_flag_duration(
                args.default_wait_timeout, "--default-wait-timeout"
            ),
            grace_period_s=parse_flag_duration(args.grace_period, "--grace-period"),
            orphan_timeout_s=parse_flag_duration(args.orphan_timeout, "--orphan-timeout"),
        ),
        security=security_from(args),
        shutdown_grace_s=parse_flag_duration(
            args.shutdown_grace, "--shutdown-grace", allow_zero=True
        ),
        metrics_port=args.metrics_port,
        keepalive=serving.ServerKeepalive(
            min_ping_interval_s=parse_flag_duration(args.keepalive_permit, "--keepalive-permit"),
            max_ping_strikes=max(args.max_ping_strikes, 0),
        ),
        limits=DocumentLimits(
            max_metadata_bytes=args.max_metadata_bytes, max_log_bytes=args.max_log_bytes
        ),
        sqlite_synchronous=synchronous,
        otlp_endpoint=tracing.check_endpoint(args.otlp_endpoint),
        http_port=args.http_port or None,
    )


def _prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from monitor_svc.records import utcnow
    from monitor_svc.store.engine import make_engine
    from monitor_svc.store.prune import prune_finished

    # Zero is meaningful here: every finished job, however recent.
    age = parse_flag_duration(args.older_than, "--older-than", allow_zero=True)
    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size: must be at least 1, got {args.batch_size}")
    # The writer engine: on SQLite it begins IMMEDIATE, so a prune waits its turn beside a
    # busy monitor instead of failing when its read-then-delete transaction upgrades.
    engine = make_engine(args.database_url, writer=True)
    try:
        result = prune_finished(engine, utcnow() - timedelta(seconds=age), args.batch_size)
    finally:
        engine.dispose()
    print(
        f"pruned {result.managers} finished jobs ({result.jobs} job rows, "
        f"{result.progress_rows} step progress rows); {result.log_lines} log lines"
    )
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
