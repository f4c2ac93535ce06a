"""Readers for a step's ``config`` that every worker (built-in or third-party) can share.

Each raises InvalidArgument whose message starts with the key (``"children: ..."``), so the
definition loader can prefix it with where the config sits (``steps[0].config.children: ...``).
A config may have come through a ``google.protobuf.Struct``, where every number is a double:
the integer readers therefore accept whole-number floats.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from stepflow_common.durations import parse_duration
from stepflow_common.errors import InvalidArgument


def describe(value: object) -> str:
    """A short rendering of a bad value for an error message (never a whole document)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def whole_number(value: object, field: str) -> int:
    """``value`` as an int: an int, or a float with no fractional part (a Struct's double)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{field}: expected a whole number, got {describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise InvalidArgument(f"{field}: expected a whole number, got {describe(value)}")


def reject_unknown_keys(config: Mapping[str, Any], allowed: Collection[str]) -> None:
    """Typos in a config otherwise fall back to defaults silently; say so instead."""
    for key in config:
        if key not in allowed:
            raise InvalidArgument(
                f"{key}: unknown setting (expected one of: {', '.join(sorted(allowed))})"
            )


def get_int(
    config: Mapping[str, Any],
    key: str,
    *,
    default: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """A whole-number setting; required when ``default`` is None."""
    if key not in config:
        if default is None:
            raise InvalidArgument(f"{key}: required")
        return default
    value = whole_number(config[key], key)
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"{key}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"{key}: must be at most {maximum}, got {value}")
    return value


def get_str(
    config: Mapping[str, Any], key: str, *, required: bool = False, allow_empty: bool = False
) -> str | None:
    """A string setting, or None when absent and not required."""
    if key not in config:
        if required:
            raise InvalidArgument(f"{key}: required")
        return None
    value = config[key]
    if not isinstance(value, str):
        raise InvalidArgument(f"{key}: expected a string, got {describe(value)}")
    if not allow_empty and not value.strip():
        raise InvalidArgument(f"{key}: must not be empty")
    return value


def get_duration(config: Mapping[str, Any], key: str) -> float | None:
    """Seconds from ``"90s"``-style text or a number of seconds; None when absent."""
    if key not in config:
        return None
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidArgument(f"{key}: expected a duration like '90s', got {describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{key}: expected a finite duration, got {describe(value)}")
    return parse_duration(value, key)


def get_str_map(config: Mapping[str, Any], key: str) -> dict[str, str]:
    """A table of strings (e.g. environment variables); numbers are turned into text."""
    if key not in config:
        return {}
    value = config[key]
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{key}: expected a table of strings, got {describe(value)}")
    out: dict[str, str] = {}
    for name, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise InvalidArgument(f"{key}.{name}: expected a string, got {describe(item)}")
        out[str(name)] = _number_text(item) if not isinstance(item, str) else item
    return out


def _number_text(value: int | float) -> str:
    """``8`` rather than ``8.0`` for a whole number that travelled as a double."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
