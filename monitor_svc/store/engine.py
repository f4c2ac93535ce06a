"""Engines for the two databases: SQLite (default, a WAL file) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_MS = 10_000
DEFAULT_DATABASE_URL = "sqlite:///stepflow.db"
# FULL: every commit is on disk (fsync of the WAL) before a call is answered, so an
# acknowledged write survives an OS crash or power loss. NORMAL skips that fsync (faster;
# still safe against a crash of the process) and may lose the last commits on power loss.
SQLITE_SYNCHRONOUS_MODES = ("full", "normal")
SQLITE_SYNCHRONOUS_DEFAULT = "full"


def safe_url(url: str) -> str:
    """The URL with its password hidden, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(
    url: str, *, writer: bool, sqlite_synchronous: str = SQLITE_SYNCHRONOUS_DEFAULT
) -> Engine:
    """One engine per role. SQLite: the writer begins ``IMMEDIATE`` (the write lock up front,
    so a read-modify-write cannot interleave with another writer); readers begin deferred
    transactions for a consistent snapshot. PostgreSQL: rows are locked ``FOR UPDATE``."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url,
            # psycopg prepares a statement server-side after 5 uses, and PostgreSQL may keep
            # the generic plan it made while the tables were empty (sequential scans of jobs
            # for ever after). Plan each statement with its values instead.
            connect_args={"prepare_threshold": None},
            # A read (GetJob, WatchJob) takes the row and its steps' counts from one snapshot.
            isolation_level="READ COMMITTED" if writer else "REPEATABLE READ",
            pool_size=2 if writer else 8,
            max_overflow=2 if writer else 8,
            pool_pre_ping=True,
            pool_recycle=1800,
        )
    if sqlite_synchronous not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(
            f"sqlite synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS_MODES)}, "
            f"not {sqlite_synchronous!r}"
        )
    database = parsed.database or ""
    if not database or database == ":memory:":
        raise ValueError(
            "SQLite needs a file path (sqlite:///path/to/file.db); memory is not shared"
        )
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=1 if writer else 8,
        max_overflow=0 if writer else 8,
    )
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN is ours (SQLAlchemy's recipe).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={sqlite_synchronous.upper()}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine
