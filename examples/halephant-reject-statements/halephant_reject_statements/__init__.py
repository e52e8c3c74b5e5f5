"""halephant-reject-statements: refuse statements that match configured regular expressions, for chosen users.

A policy plugin shipped as its own package, the way any third party ships one: it depends on halephant,
registers itself through the ``halephant`` entry-point group, imports only halephant's public surface, and
declares its settings section ``plugins.reject_statements``::

    plugins:
      reject_statements:
        users: [reporting, intern]
        patterns: ['^\\s*(drop|truncate)\\b', '\\bpg_sleep\\s*\\(']
        message: statement rejected by policy

For a listed user, every simple Query and every Parse whose text matches one of ``patterns`` (searched
anywhere in the text, case-insensitively) is answered with ERROR 42501 (insufficient_privilege) and a hint;
the statement never reaches PostgreSQL and the client's session stays usable. Other users are not looked at.

The hook is registered without ``trylast`` so that it runs before halephant's default inspectors: a
rejected statement must stay rejected whatever they would have said.

This is a guard against mistakes, not a security boundary: a regular expression over SQL text can be
sidestepped (comments, quoting, functions that run SQL). PostgreSQL's GRANT/REVOKE is the boundary.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from halephant import hookimpl, sqlstate
from halephant.types import ClientInfo, Reject, Statement

if TYPE_CHECKING:
    from halephant.types import Config

__all__ = [
    "FLAGS",
    "HINT",
    "SECTION",
    "RejectStatementsSettings",
    "halephant_configure",
    "halephant_inspect_query",
    "halephant_plugin_settings",
]

#: The section name: ``plugins.reject_statements`` in halephant.yaml, the same as the entry-point name.
SECTION: Final = "reject_statements"
#: SQL keywords are case-insensitive, so a policy that `DROP` escapes by writing `drop` would be no policy;
#: a pattern that must match case-sensitively says so with ``(?-i:...)``.
FLAGS: Final = re.IGNORECASE
HINT: Final = (
    'Statements like this one are not allowed for user "{user}" by halephant\'s reject_statements policy '
    "(plugins.reject_statements in halephant.yaml). Ask the administrator of halephant if it should be."
)


def _compiles(pattern: str) -> str:
    # Checked at load time so that `halephant check` reports a bad pattern at its line and column,
    # instead of the proxy failing when it first configures the plugin.
    try:
        re.compile(pattern, FLAGS)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


class RejectStatementsSettings(BaseModel):
    """``plugins.reject_statements``: whose statements are checked, against what, and what they are told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Client user names (as in the startup packet) whose statements are checked; nobody by default.
    users: list[str] = []
    #: Python regular expressions, searched anywhere in the statement text, case-insensitively.
    patterns: list[Annotated[str, AfterValidator(_compiles)]] = []
    #: The ERROR message the client receives.
    message: Annotated[str, Field(min_length=1)] = "statement rejected by policy"


class _Policy:
    """The settings in force, in the form the per-statement hook wants them.

    ``halephant_configure`` runs once per config load and reload and builds a new policy; the inspect hook,
    which runs for every statement, reads one attribute. A reload swaps the whole object in one
    assignment, so a statement is judged by the old settings or the new ones, never a mixture.
    """

    __slots__ = ("hint", "message", "patterns", "users")

    def __init__(self, settings: RejectStatementsSettings) -> None:
        self.users: frozenset[str] = frozenset(settings.users) if settings.patterns else frozenset()
        self.patterns: tuple[re.Pattern[str], ...] = tuple(re.compile(p, FLAGS) for p in settings.patterns)
        self.message: str = settings.message


class _Current:
    """Holds the policy in force; until the first configure call the defaults apply (nobody is checked)."""

    __slots__ = ("policy",)

    def __init__(self) -> None:
        self.policy = _Policy(RejectStatementsSettings())


_current = _Current()


@hookimpl
def halephant_plugin_settings() -> tuple[str, type[BaseModel]]:
    return (SECTION, RejectStatementsSettings)


@hookimpl
def halephant_configure(config: Config) -> None:
    settings = config.plugin_settings(SECTION)
    if not isinstance(settings, RejectStatementsSettings):
        # The config was validated without this plugin's model (a missing section still gives defaults).
        settings = RejectStatementsSettings()
    _current.policy = _Policy(settings)


@hookimpl
def halephant_inspect_query(client: ClientInfo, statement: Statement) -> Reject | None:
    policy = _current.policy
    # A set lookup first: for users not listed, this hook costs next to nothing.
    if client.user not in policy.users:
        return None
    text = statement.text
    for pattern in policy.patterns:
        if pattern.search(text) is not None:
            return Reject(
                sqlstate.INSUFFICIENT_PRIVILEGE,
                policy.message,
                hint=HINT.format(user=client.user),
                # The pattern goes to halephant's log only: clients are not told how to get around it.
                reason=f"reject_statements: statement from {client.user} matches {pattern.pattern!r}",
            )
    return None
