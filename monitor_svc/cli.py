"""``monitor-svc``: serve the MonitorService, or migrate its database."""

from __future__ import annotations

import argparse
import asyncio
import sys

from monitor_svc.server import DEFAULT_PORT, MonitorConfig, serve
from monitor_svc.store.engine import DEFAULT_DATABASE_URL
from monitor_svc.store.store import StepTimers
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
    serve_p = sub.add_parser("serve", help="run the MonitorService gRPC server")
    add_flag(serve_p, COMMAND, "--host", "127.0.0.1", "address to listen on")
    add_flag(serve_p, COMMAND, "--port", DEFAULT_PORT, "port to listen on", type_=int)
    _database_flag(serve_p)
    add_flag(serve_p, COMMAND, "--default-wait-timeout", "30m",
             "how long a step without its own timeout may wait for its children")
    add_flag(serve_p, COMMAND, "--grace-period", "30s",
             "a handed-off step with no seal and no child by then ends completed")
    add_flag(serve_p, COMMAND, "--shutdown-grace", "10s", "time in-flight calls get on SIGTERM")
    add_server_flags(serve_p, COMMAND)
    migrate_p = sub.add_parser("migrate", help="bring the database schema up to date")
    _database_flag(migrate_p)
    return parser


def _database_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, COMMAND, "--database-url", DEFAULT_DATABASE_URL,
             "SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user@host/db",
             extra_env=("STEPFLOW_DATABASE_URL",))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "migrate":
        logs.configure("auto")
        from monitor_svc.store.migrate import upgrade

        upgrade(args.database_url)
        print("database is at the latest schema")
        return 0
    logs.configure(args.log_format, args.log_level)
    try:
        config = MonitorConfig(
            database_url=args.database_url,
            host=args.host,
            port=args.port,
            timers=StepTimers(
                default_wait_timeout_s=parse_duration(args.default_wait_timeout, "--default-wait-timeout"),
                grace_period_s=parse_duration(args.grace_period, "--grace-period"),
            ),
            security=security_from(args),
            shutdown_grace_s=parse_duration(args.shutdown_grace, "--shutdown-grace"),
        )
    except InvalidArgument as exc:
        print(f"monitor-svc: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
