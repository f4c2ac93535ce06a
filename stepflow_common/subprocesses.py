"""Starting a stepflow server as a child process: the demo's, the tests', and
``stepflow_client.testing``'s (one place, so they cannot differ)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without ``STEPFLOW_*`` (every flag reads one, so a token, TLS files or
    a database URL exported in the shell cannot change the child), unbuffered (its log lines
    arrive as written), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPFLOW_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when its parent dies, even by SIGKILL, so it
    cannot outlive whoever started it (Linux only; elsewhere nothing). Only prctl() runs
    between fork and exec."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
