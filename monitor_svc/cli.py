"""``monitor-svc``: serve the MonitorService, or migrate its database."""

from __future__ import annotations

import argparse
import asyncio
import sys

from monitor_svc.lifecycle import StepTimers
from monitor_svc.server import DEFAULT_PORT, MonitorConfig, serve
from monitor_svc.store.engine import DEFAULT_DATABASE_URL
from stepflow_common import logs
from stepflow_common.cli import add_flag, add_server_flags, security_from
from stepflow_common.durations import parse_duration
from stepflow_common.errors import InvalidArgument

COMMAND = "monitor"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monitor-svc",
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
    )
    add_flag(serve_p, COMMAND, "--host", "127.0.0.1", "address to listen on")
    add_flag(serve_p, COMMAND, "--port", DEFAULT_PORT, "port to listen on", type_=int)
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
        "--orphan-timeout",
        "10m",
        "a job whose orchestrator's lease lapsed, adopted by no other orchestrator by then, "
        "ends failed (orchestrator_lost)",
    )
    add_flag(serve_p, COMMAND, "--shutdown-grace", "10s", "time in-flight calls get on SIGTERM")
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
    )
    _database_flag(migrate_p)
    prune_p = sub.add_parser(
        "prune",
        help="delete finished jobs older than a cutoff",
        description="Delete finished jobs (whole manager trees: steps, children, counts) that "
        "ended longer ago than --older-than, a batch of managers per short transaction, so "
        "live traffic is not blocked. Live jobs are never touched.",
    )
    _database_flag(prune_p)
    add_flag(
        prune_p,
        COMMAND,
        "--older-than",
        "168h",
        "delete managers that finished longer ago than this (e.g. 90s, 30m, 2h)",
    )
    add_flag(prune_p, COMMAND, "--batch-size", 100, "managers deleted per transaction", type_=int)
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
    if args.command == "migrate":
        logs.configure("auto")
        from monitor_svc.store.migrate import upgrade

        upgrade(args.database_url)
        print("database is at the latest schema")
        return 0
    if args.command == "prune":
        return _prune(args)
    logs.configure(args.log_format, args.log_level)
    try:
        config = MonitorConfig(
            database_url=args.database_url,
            host=args.host,
            port=args.port,
            timers=StepTimers(
                default_wait_timeout_s=parse_duration(
                    args.default_wait_timeout, "--default-wait-timeout"
                ),
                grace_period_s=parse_duration(args.grace_period, "--grace-period"),
                orphan_timeout_s=parse_duration(args.orphan_timeout, "--orphan-timeout"),
            ),
            security=security_from(args),
            shutdown_grace_s=parse_duration(args.shutdown_grace, "--shutdown-grace"),
            metrics_port=args.metrics_port,
        )
    except InvalidArgument as exc:
        print(f"monitor-svc: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from monitor_svc.records import utcnow
    from monitor_svc.store.engine import make_engine
    from monitor_svc.store.prune import prune_finished

    logs.configure("auto")
    try:
        age = parse_duration(args.older_than, "--older-than")
    except InvalidArgument as exc:
        print(f"monitor-svc: {exc}", file=sys.stderr)
        return 2
    # The writer engine: on SQLite it begins IMMEDIATE, so a prune waits its turn beside a
    # busy monitor instead of failing when its read-then-delete transaction upgrades.
    engine = make_engine(args.database_url, writer=True)
    try:
        result = prune_finished(engine, utcnow() - timedelta(seconds=age), args.batch_size)
    finally:
        engine.dispose()
    print(
        f"pruned {result.managers} finished jobs ({result.jobs} job rows, "
        f"{result.progress_rows} step progress rows)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
