"""Durations as people write them: "500ms", "90s", "30m", "2h", "1800s" (or a bare number of
seconds)."""

from __future__ import annotations

import math
import re

from stepflow_common.errors import InvalidArgument
from stepflow_common.limits import MAX_DURATION_S

_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(
    value: str | int | float, field: str = "duration", *, allow_zero: bool = False
) -> float:
    """Seconds in ``value``; InvalidArgument naming ``field`` when it is not a duration > 0
    (or >= 0 with ``allow_zero``, for a setting where zero means "at once") and at most
    MAX_DURATION_S (a year: a deadline computed from it must stay representable)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{field}: expected a duration like '90s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _PATTERN.match(value)
        if match is None:
            raise InvalidArgument(
                f"{field}: {value!r} is not a duration (use e.g. '500ms', '90s', '30m', '2h')"
            )
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if allow_zero and seconds == 0:
        return seconds
    if math.isnan(seconds) or seconds <= 0:
        raise InvalidArgument(f"{field}: must be greater than zero, got {value!r}")
    check_duration(seconds, field, value)
    return seconds


def check_duration(seconds: float, field: str, shown: object = None) -> None:
    """InvalidArgument naming ``field`` when ``seconds`` is longer than MAX_DURATION_S."""
    if seconds > MAX_DURATION_S:
        days = MAX_DURATION_S / 86400
        raise InvalidArgument(
            f"{field}: {shown if shown is not None else seconds!r} is longer than the "
            f"{days:.0f} days a duration may be"
        )


def parse_flag_duration(value: str, flag: str, *, allow_zero: bool = False) -> float:
    """``parse_duration`` for a command-line flag (or its environment variable), where a
    number without a unit is refused: ``--grace-period 5`` could mean 5 s or 5 min, and a flag
    read wrong fails far from the typo. Zero needs no unit."""
    match = _PATTERN.match(value)
    unitless = match is not None and match.group(2) is None
    if unitless and not (allow_zero and float(value) == 0):
        raise InvalidArgument(
            f"{flag}: {value!r} has no unit; write e.g. '{value.strip()}s' or '{value.strip()}ms'"
        )
    return parse_duration(value, flag, allow_zero=allow_zero)
