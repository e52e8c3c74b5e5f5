"""Refuse DROP and TRUNCATE: `halephant_inspect_query`.

Why: an application's connection has no business dropping or emptying tables, and one mistyped command
in a shell pointed at production can. The statement is answered with 42501 (insufficient_privilege) and
a hint, never reaches PostgreSQL, and the client's session stays usable.

Every statement of a multi-statement Query is looked at (`SELECT 1; DROP TABLE t` is refused too), by its
first keyword as the lexer in `halephant.sql` reads it (`Statement.first_keywords`), so comments, quoting
and case do not hide one. A plain statement (`Statement.plain`) is never one of these, so the hook is
marked `ignores_plain_statements` and costs nothing for ordinary traffic.
This is a guard against mistakes, not a security boundary: SQL that runs SQL (DO blocks, functions,
EXECUTE) is not looked into. Revoke the privilege in PostgreSQL for that.
"""

from __future__ import annotations

from typing import Final

from halephant import hookimpl, ignores_plain_statements, sqlstate
from halephant.types import ClientInfo, Reject, Statement

#: First keywords of the statements refused.
REFUSED: Final[frozenset[str]] = frozenset({"DROP", "TRUNCATE"})
HINT: Final = "DROP and TRUNCATE are refused through halephant; connect to PostgreSQL directly to run them."


@hookimpl
@ignores_plain_statements
def halephant_inspect_query(client: ClientInfo, statement: Statement) -> Reject | None:
    for keyword in statement.first_keywords:
        if keyword in REFUSED:
            return Reject(
                sqlstate.INSUFFICIENT_PRIVILEGE,
                f"{keyword} is not allowed",
                hint=HINT,
                reason=f"reject_ddl: {keyword} from {client.user}",
            )
    return None
