"""What the web view puts on the wire (pure): protobuf JSON, Server-Sent Events frames, and
the event ids that resume a page's stream exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message


def as_dict(message: Message) -> dict[str, Any]:
    """The message as protobuf JSON (the canonical mapping: lowerCamelCase names, enums by
    name, 64-bit integers as strings): what grpcurl prints and any protobuf library parses."""
    return json_format.MessageToDict(message)


def as_json(message: Message) -> str:
    return json.dumps(as_dict(message), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Position:
    """How far a page's stream has gone: the ``change_seq`` of the last state sent and the
    ``seq`` of the last log line sent. ``<change_seq>.<log_seq>`` is every event's id."""

    change_seq: int = 0
    log_seq: int = 0

    def __str__(self) -> str:
        return f"{self.change_seq}.{self.log_seq}"

    @classmethod
    def parse(cls, text: str | None) -> Position | None:
        """The position a ``Last-Event-ID`` names; None when absent or not one of ours (the
        stream then starts afresh, as for a new page)."""
        if not text:
            return None
        head, dot, tail = text.strip().partition(".")
        if not dot or not head.isdigit() or not tail.isdigit():
            return None
        return cls(int(head), int(tail))


def frame(event: str, data: str, event_id: Position | None = None) -> bytes:
    """One SSE event. ``data`` is one line of JSON (json.dumps never writes a newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def comment(text: str) -> bytes:
    """An SSE comment: ignored by EventSource, it keeps idle proxies from cutting the stream."""
    return f": {text}\n\n".encode()


def retry(ms: int) -> bytes:
    """How long an EventSource waits before reconnecting."""
    return f"retry: {ms}\n\n".encode()
