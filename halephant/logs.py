"""Log output: one human-readable line per event (default) or one JSON object per line.

Text lines carry names clients chose (user, database, application_name): a newline in one must not
forge a line of its own, nor an escape sequence drive the operator's terminal. As PostgreSQL does, each
line after the first of a record (a traceback, a multi-line config error) starts with a tab, and other
control characters are written as escapes.

A JSON object has `ts`, `level`, `logger` and `message`, plus whatever a call passed as `extra`
(`event`, `sqlstate`, `pool`, ...) so collectors can filter without parsing the text, and `exception`
with a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

#: attributes every LogRecord has; anything else came from a call's `extra`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


#: control characters (C0 but tab, DEL, C1) and Unicode's own line and paragraph separators
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode()


def _escape(match: re.Match[str]) -> str:
    """For the text log: a newline goes on a continuation line, as in PostgreSQL's log."""
    return "\n\t" if match.group() == "\n" else _escaped(match)


def printable(text: str) -> str:
    """`text` on one line, every control character written as an escape (for a terminal view of names
    clients chose: `halephant status`)."""
    return _CONTROL.sub(_escaped, text) if _CONTROL.search(text) else text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = (
                    value if isinstance(value, str | int | float | bool) or value is None else str(value)
                )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter(
                "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
            )
        )
    root = logging.getLogger("halephant")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
