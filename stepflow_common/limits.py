"""The size and range limits both services agree on, in one place.

Every answer must fit what a default gRPC client (and grpcurl) accepts, so the limits below are
chosen from that budget down: nothing a client or a worker sends can make a job unreadable, a
stream stall, or a value overflow later.
"""

from __future__ import annotations

import re

# What a default gRPC client accepts in one message; every answer must fit in it.
DEFAULT_CLIENT_MESSAGE_BYTES = 4 * 1024 * 1024

# What the servers accept in one request message (a batch of child events is the largest).
MAX_REQUEST_BYTES = 16 * 1024 * 1024

# An error text is stored truncated to this many characters (never refused: a refused terminal
# event would leave its child live for ever).
MAX_ERROR_CHARS = 8 * 1024

# A job's metadata document, protobuf-encoded (what every answer carries): a merge that would
# make it larger is refused before anything is committed. With the steps' entries the monitor
# derives (below), a manager's document and its typed step_stats duplicate stay under
# DEFAULT_CLIENT_MESSAGE_BYTES. A flag (``--max-metadata-bytes``) can raise it.
MAX_METADATA_BYTES = 1024 * 1024

# Steps one manager may have. Each step gets a step_stats entry the monitor writes whatever the
# document's size (a step's end is never refused), so the count bounds that derived growth:
# 200 entries of the longest allowed texts (about 5 KB each, and as much again in the typed
# duplicate) keep a manager with a full document under DEFAULT_CLIENT_MESSAGE_BYTES.
MAX_STEPS_PER_MANAGER = 200

# A job's name (and a step's, a child's, a worker type's): the monitor refuses a longer one in
# a call and cuts one in an event to it; a job file is refused with one.
MAX_NAME_CHARS = 512

# The error text in a step_stats entry (the step's own row keeps up to MAX_ERROR_CHARS).
MAX_STEP_STAT_ERROR_CHARS = 512

# Longest duration accepted anywhere (a timeout, a lease, a backoff): one year, so an absolute
# deadline computed from it can never overflow a timestamp.
MAX_DURATION_S = 366 * 24 * 3600.0

# A job id (and a child id): 1-128 characters of a fixed alphabet, so ids are safe in logs,
# URLs and both databases' keys.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")

# The job log: a line is stored cut past this many bytes (writers cut before sending, so a
# batch of lines always fits a message), and a job's log holds this many by default.
MAX_LOG_LINE_BYTES = 16 * 1024
MAX_LOG_BYTES = 16 * 1024 * 1024


def cut_log_line(message: str) -> tuple[str, bool]:
    """A log line within MAX_LOG_LINE_BYTES, and whether it was cut (it then ends with a
    visible marker saying how much went). Writers cut before sending, the monitor again."""
    if len(message) * 4 <= MAX_LOG_LINE_BYTES:  # cannot be over, whatever its characters
        return message, False
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_LOG_LINE_BYTES:
        return message, False
    kept = data[: MAX_LOG_LINE_BYTES - 64].decode("utf-8", "ignore")
    return f"{kept} … [line cut: {len(data) - len(kept.encode())} more bytes]", True


TRUNCATION_MARKER = "… [truncated {dropped} characters]"


def truncate_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, ending in a visible marker when cut."""
    if len(text) <= limit:
        return text
    # The marker counts towards the limit (sized for the most digits it can need), so a stored
    # value never exceeds it.
    keep = max(limit - len(TRUNCATION_MARKER.format(dropped=len(text))), 0)
    return text[:keep] + TRUNCATION_MARKER.format(dropped=len(text) - keep)
