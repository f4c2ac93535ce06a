"""The reaper: a tiny process that outlives its orchestrator to kill what the orchestrator's
jobs started.

A child's command leads its own process group (so stopping it stops whatever it started, a
shell's background ``sleep`` included). A parent-death signal would reach only the group's
leader, so instead the orchestrator starts one reaper, in a session of its own, and tells it
each group it starts and ends over a pipe. The reaper kills every group it was told of:

- when the pipe reaches end of file: the orchestrator is gone, however it died (kill -9
  included: the kernel closes its end of the pipe);
- when a lease deadline it was given passes without being renewed: the orchestrator is alive
  but frozen (SIGSTOP, a partition it cannot see, a stuck event loop), its lease has lapsed,
  and another orchestrator may be running the same children again.

Run as a script by path (``python -I reaper.py``), so it imports nothing of the project and
starts in milliseconds. Its protocol is one short line per message on stdin (each write is
smaller than PIPE_BUF, so atomic): ``+TAG PGID``, ``-TAG PGID``, ``L TAG DEADLINE`` (a
``time.monotonic()`` value, the clock being system-wide on Linux) and ``U TAG`` (no deadline).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import sys
import time


def _kill(groups: set[int]) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    groups.clear()


def main() -> int:
    groups: dict[str, set[int]] = {}
    deadlines: dict[str, float] = {}
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    pending = b""
    # Ignore the signals a terminal or a process-group kill of the orchestrator would send:
    # the reaper ends when its pipe does.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        timeout = None
        if deadlines:
            timeout = max(0.0, min(deadlines.values()) - time.monotonic())
        if selector.select(timeout):
            data = os.read(sys.stdin.fileno(), 65536)
            if not data:
                for tagged in groups.values():
                    _kill(tagged)
                return 0
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                parts = line.decode("ascii", "replace").split()
                if len(parts) < 2:
                    continue
                verb, tag = parts[0], parts[1]
                if verb == "+" and len(parts) == 3:
                    groups.setdefault(tag, set()).add(int(parts[2]))
                elif verb == "-" and len(parts) == 3:
                    groups.get(tag, set()).discard(int(parts[2]))
                elif verb == "L" and len(parts) == 3:
                    deadlines[tag] = float(parts[2])
                elif verb == "U":
                    deadlines.pop(tag, None)
        now = time.monotonic()
        for tag, deadline in list(deadlines.items()):
            if deadline <= now:
                _kill(groups.get(tag, set()))
                del deadlines[tag]


if __name__ == "__main__":
    sys.exit(main())
