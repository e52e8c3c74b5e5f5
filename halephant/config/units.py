"""Durations and sizes as operators write them in `halephant.yaml` (`30s`, `5m`, `64MB`).

`parse_duration` and `parse_size` are plain functions (usable by the CLI and by plugins); `Duration` and
`Size` are the annotated types the config schema uses, which turn a bad value into a pydantic error with
the same message, so it is reported at the value's position in the file.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

__all__ = ["Duration", "Size", "parse_duration", "parse_size"]

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# One number+unit pair; a duration is one or more of them ("1h30m"), or a bare number of seconds.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

# Powers of 1024, as PostgreSQL reads memory settings (`1kB` = 1024 bytes). Matched case-insensitively:
# `64mb` cannot mean anything but bytes here.
_SIZE_UNITS = {
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+)\s*([a-z]*)", re.IGNORECASE)

_DURATION_HELP = "expected a duration like 500ms, 30s, 5m, 1h, 1d or a number of seconds"
_SIZE_HELP = "expected a size like 512kB, 64MB, 1GB or a whole number of bytes"


def parse_duration(value: object) -> float:
    """Seconds in `value`: `500ms`, `30s`, `5m`, `1h`, `1d`, `1h30m`, or a plain number of seconds.

    Raises ValueError, with a message fit for an operator, for anything else (negative numbers,
    booleans, unknown units).
    """
    if isinstance(value, bool):  # YAML `yes`/`true` are bools, and bool is an int subclass
        raise ValueError(f"{_DURATION_HELP}; got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION_FULL.fullmatch(text):
            seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"{_DURATION_HELP}; got {value!r}")
    else:
        raise ValueError(f"{_DURATION_HELP}; got {_describe(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be a finite number of seconds, 0 or more; got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes in `value`: `512kB`, `64MB`, `1GB` (powers of 1024, like PostgreSQL), or a plain int of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{_SIZE_HELP}; got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _SIZE_UNITS):
            raise ValueError(f"{_SIZE_HELP}; got {value!r}")
        size = int(match.group(1)) * _SIZE_UNITS.get(unit, 1)
    else:
        raise ValueError(f"{_SIZE_HELP}; got {_describe(value)}")
    if size < 0:
        raise ValueError(f"a size cannot be negative; got {value!r}")
    return size


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    return f"{value!r}" if isinstance(value, int | float) else f"a {type(value).__name__}"


def _duration_field(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        # A custom error type keeps pydantic from prefixing the message with "Value error, ".
        raise PydanticCustomError("duration", str(exc)) from None


def _size_field(value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise PydanticCustomError("size", str(exc)) from None


#: Seconds as a float; written in YAML as `30s`, `5m`, … (constraints such as `Field(gt=0)` still apply).
Duration = Annotated[float, BeforeValidator(_duration_field)]
#: Bytes as an int; written in YAML as `64MB`, `512kB`, …
Size = Annotated[int, BeforeValidator(_size_field)]
