"""A ``python`` step's callable for the job-log tests: it prints and logs."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("job_log_callable")


def talk(config: dict[str, Any]) -> None:
    print("printed by the callable")
    log.info("logged at info")
    log.warning("logged at warning")
    print("to stderr", file=sys.stderr)
