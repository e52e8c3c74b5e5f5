"""Exception types shared by every layer.

`ClientError` is what a client sees (a SQLSTATE, a message, maybe a detail and a hint);
`ProtocolViolation` is a peer that broke the wire protocol (always 08P01); `ConfigError` carries every
problem found in a config file, each with its position.
"""

from __future__ import annotations

from dataclasses import dataclass

from halephant import sqlstate


class HalephantError(Exception):
    """Base class of halephant's own exceptions."""


class ClientError(HalephantError):
    """An error to report to one client as an ErrorResponse."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        hint: str | None = None,
        fatal: bool = False,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.fatal = fatal
        #: the ErrorResponse's DETAIL field, as PostgreSQL words it where it has one
        self.detail = detail


class OutOfResources(ClientError):
    """halephant itself could not get what serving needs (a file descriptor for a server connection):
    SQLSTATE 53000, as PostgreSQL says when it is out of file descriptors. Not the server's doing."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(sqlstate.INSUFFICIENT_RESOURCES, message, hint=hint, fatal=True)


class ProtocolViolation(ClientError):
    """The peer sent bytes that are not valid protocol 3.0 (SQLSTATE 08P01, always fatal)."""

    def __init__(self, message: str) -> None:
        super().__init__(sqlstate.PROTOCOL_VIOLATION, message, fatal=True)


class MalformedMessage(ProtocolViolation):
    """A typed message after login whose framing is invalid (an unknown type, a length under 4 or over
    the limit). `before` holds the complete messages that came ahead of it in the same chunk and were not
    acted on yet: PostgreSQL reads a client's messages one by one, so it runs and answers those first."""

    def __init__(self, message: str, before: bytes = b"") -> None:
        super().__init__(message)
        self.before = before


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file, located as `file:line:col: dotted.path: message`."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.col}: {where}{self.message}"


class ConfigError(HalephantError):
    """A config file could not be loaded; `problems` lists every error found, in file order."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line, p.col))
        super().__init__("\n".join(str(p) for p in self.problems))
