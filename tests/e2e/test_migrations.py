"""The Alembic migrations and the SQLAlchemy models describe the same schema.

An empty database upgraded to head must show no autogenerate diff against
``Base.metadata`` (a model change without a migration, or a migration that drifts from the
models, fails here), and ``monitor-svc migrate`` must be safe to run again and again.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from monitor_svc.store.migrate import alembic_config, upgrade
from monitor_svc.store.models import Base

MONITOR_SVC = Path(sys.executable).parent / "monitor-svc"


@pytest.fixture
def empty_database_url(database_url: str, postgres_template: str | None) -> Iterator[str]:
    """An empty database on the backend ``database_url`` is for.

    The SQLite file from ``database_url`` does not exist yet, so it is empty. The PostgreSQL
    one is cloned from an already-migrated template, so for PostgreSQL a database of our own
    is created (through the admin URL) and dropped afterwards.
    """
    if make_url(database_url).get_backend_name() == "sqlite":
        yield database_url
        return
    assert postgres_template is not None  # database_url skips PostgreSQL when it is absent
    name = f"stepflow_mig_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_template, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        try:
            yield (
                make_url(postgres_template).set(database=name).render_as_string(hide_password=False)
            )
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        admin.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _current_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def test_head_matches_models(empty_database_url: str) -> None:
    assert _tables(empty_database_url) == set(), "the database under test must start empty"

    upgrade(empty_database_url)

    assert _current_revision(empty_database_url) == _head_revision(empty_database_url)
    engine = create_engine(empty_database_url)
    try:
        with engine.connect() as conn:
            # Stricter than migrations/env.py (which compares types only): server defaults
            # drift silently too, and `alembic revision --autogenerate` would not show it.
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], "migrations and models differ; write a migration:\n" + "\n".join(
        map(repr, diff)
    )


def test_migrate_command_is_idempotent(empty_database_url: str) -> None:
    assert MONITOR_SVC.exists(), f"{MONITOR_SVC} missing: install the project (make venv)"
    for attempt in (1, 2):
        done = subprocess.run(
            [str(MONITOR_SVC), "migrate", "--database-url", empty_database_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (
            f"migrate run {attempt} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        head = _head_revision(empty_database_url)
        assert _current_revision(empty_database_url) == head
        # It says what it did: the first run created the schema, the second had nothing to do.
        said = {1: f"created the schema (revision {head})", 2: "nothing to do"}[attempt]
        assert said in done.stdout, done.stdout
    assert set(Base.metadata.tables) <= _tables(empty_database_url)
