"""Starting a stepflow server as a child process: the demo's, the tests', and
``stepflow_client.testing``'s (one place, so they cannot differ)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping

PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl: Callable[[int, int], int] = ctypes.CDLL(None).prctl
    return prctl


# Looked up here, in the parent: between fork and exec the child only calls it (no import, no
# dlopen), which is what keeps preexec_fn safe in a process with threads (gRPC's, say).
_PRCTL = _find_prctl()


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without ``STEPFLOW_*`` (every flag reads one, so a token, TLS files or
    a database URL exported in the shell cannot change the child), unbuffered (its log lines
    arrive as written), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPFLOW_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when the thread that started it ends, the
    whole parent process included, even by SIGKILL; so it cannot outlive whoever started it
    (Linux only; elsewhere nothing)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
