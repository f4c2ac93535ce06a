"""Change notifications between monitor replicas on one PostgreSQL database.

Every write transaction ends with ``pg_notify(CHANNEL, payload)``; PostgreSQL delivers it to
every listening replica only if, and when, the transaction commits. Each replica listens on a
dedicated connection and wakes the WatchJob feeds of the ids named, so a watcher on replica A
sees a change committed through replica B without polling.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable

import psycopg
import structlog
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

log = structlog.get_logger(__name__)

CHANNEL = "stepflow_changes"
MAX_PAYLOAD_BYTES = 7_900  # PostgreSQL's limit is 8,000 bytes
EVERYTHING = "*"
RECONNECT_DELAY_S = 1.0
PROCESS_TOKEN = uuid.uuid4().hex[:12]  # a replica ignores its own notifications


def encode(changed: Iterable[str]) -> str:
    body = ",".join(sorted(changed))
    if len(body) + len(PROCESS_TOKEN) + 1 > MAX_PAYLOAD_BYTES:
        body = EVERYTHING
    return f"{PROCESS_TOKEN}|{body}"


def decode(payload: str) -> tuple[str, set[str] | None]:
    """(sender token, ids) — ids None means "anything may have changed"."""
    token, _, body = payload.partition("|")
    return token, (None if body == EVERYTHING else set(filter(None, body.split(","))))


def send(conn: Connection, changed: Iterable[str]) -> None:
    conn.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": CHANNEL, "payload": encode(changed)},
    )


class Listener:
    """A thread holding ``LISTEN`` on its own connection; calls ``on_change`` with the ids
    another replica committed (None: refresh everything watched)."""

    def __init__(self, database_url: str, on_change: Callable[[set[str] | None], None]) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stepflow-listen", daemon=True)
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.ready.set()
                    # After a reconnect, notifications sent meanwhile are lost: refresh all.
                    self._on_change(None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            token, ids = decode(note.payload)
                            if token != PROCESS_TOKEN:
                                self._on_change(ids)
            except psycopg.Error as exc:
                log.warning("change listener lost its connection; reconnecting", error=str(exc))
                self._stop.wait(RECONNECT_DELAY_S)
