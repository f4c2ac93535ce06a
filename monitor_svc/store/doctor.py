"""What the command line tells a person about a database: what is wrong with its URL or its
connection, in one line with what to do, and which schema revision it is at."""

from __future__ import annotations

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, exc
from sqlalchemy.engine import URL, make_url

from monitor_svc.store.engine import safe_url
from monitor_svc.store.migrate import alembic_config
from stepflow_common.errors import InvalidArgument

EXAMPLES = "sqlite:///path/to/file.db or postgresql+psycopg://user:password@host:5432/db"
DRIVERS = {"sqlite", "sqlite+pysqlite", "postgresql+psycopg"}


def check_url(url: str) -> None:
    """InvalidArgument (naming the flag) unless ``url`` names a database stepflow can open."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise InvalidArgument(
            f"--database-url: {url!r} is not a database URL; use {EXAMPLES}"
        ) from None
    if parsed.drivername in DRIVERS:
        return
    if parsed.get_backend_name() in ("postgres", "postgresql"):
        fixed = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=True)
        raise InvalidArgument(
            f"--database-url: stepflow talks to PostgreSQL through psycopg 3; write {fixed}"
        )
    raise InvalidArgument(
        f"--database-url: {parsed.drivername!r} databases are not supported; use {EXAMPLES}"
    )


def describe(error: BaseException, url: str) -> str | None:
    """One line for a failure to open or use the database at ``url``; None if ``error`` is
    not about the database."""
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and isinstance(error, OSError):  # its directory could not be created
        return (
            f"cannot create the SQLite database {parsed.database}: {error.strerror or error}; "
            "point --database-url at a writable directory"
        )
    if not isinstance(error, exc.OperationalError | exc.InterfaceError | exc.ProgrammingError):
        return None
    cause = str(error.orig if error.orig is not None else error).strip().splitlines()
    reason = cause[0] if cause else type(error).__name__
    if "no such table" in reason or ("relation" in reason and "does not exist" in reason):
        return (
            f"the database {safe_url(url)} has no stepflow schema yet ({reason}); run "
            "`monitor-svc migrate` first"
        )
    if sqlite:
        return (
            f"cannot open the SQLite database {parsed.database}: {reason}; check that its "
            "directory exists and is writable, or point --database-url elsewhere"
        )
    where = f"PostgreSQL at {parsed.host or 'localhost'}:{parsed.port or 5432}"
    if f'database "{parsed.database}" does not exist' in reason:
        return (
            f"{where} has no database {parsed.database!r}; create it first "
            f"({_createdb(parsed)}) or fix --database-url"
        )
    if "connection refused" in reason.lower() or "could not connect" in reason.lower():
        return f"cannot connect to {where}: {reason}; is it running? Check --database-url"
    return f"cannot use the database {safe_url(url)}: {reason}"


def _createdb(parsed: URL) -> str:
    parts = ["createdb"]
    if parsed.host:
        parts += ["-h", parsed.host]
    if parsed.port:
        parts += ["-p", str(parsed.port)]
    if parsed.username:
        parts += ["-U", parsed.username]
    parts.append(str(parsed.database))
    return " ".join(parts)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    return head or ""


def current_revision(url: str) -> str | None:
    """The schema revision the database is at; None for an empty (or absent SQLite) one."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        from pathlib import Path

        if not parsed.database or not Path(parsed.database).expanduser().exists():
            return None
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            revision: str | None = MigrationContext.configure(conn).get_current_revision()
            return revision
    finally:
        engine.dispose()
