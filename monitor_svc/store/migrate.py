"""Schema migrations (Alembic), applied on start and by ``monitor-svc migrate``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from monitor_svc.store.engine import is_sqlite

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str) -> None:
    """Bring the database to the latest schema (idempotent)."""
    if is_sqlite(database_url):
        # Create the file's directory; the WAL pragma is set per connection by the engines.
        from monitor_svc.store.engine import make_engine

        make_engine(database_url, writer=True).dispose()
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            config = alembic_config(database_url)
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    finally:
        engine.dispose()
