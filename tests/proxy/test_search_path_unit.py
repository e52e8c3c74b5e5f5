"""Which search_path a statement leaves for the rest of its transaction, as `session_state` reads it to
choose the prepared statements a client shares (`session_state._search_path_after`)."""

from __future__ import annotations

import pytest

from halephant.proxy.session_state import _UNKNOWN_PATH, _search_path_after
from halephant.sql import Statement


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("SET LOCAL search_path = tenant_a", ("tenant_a",)),
        ("set search_path to tenant_a, public", ("tenant_a, public",)),
        ("SET SCHEMA 'tenant_a'", ("tenant_a",)),
        ("BEGIN; SET LOCAL search_path = tenant_a; SELECT 1", ("tenant_a",)),
        ("SET LOCAL search_path = a; SET LOCAL search_path = b", ("b",)),
        ("RESET search_path", (None,)),
        ("SET search_path TO DEFAULT", (None,)),
        ("RESET ALL", (None,)),
        ("DISCARD ALL", (None,)),
        ("SELECT set_config('search_path', $1, true)", (_UNKNOWN_PATH,)),
        ("SET LOCAL search_path = $1", (_UNKNOWN_PATH,)),
        ("SELECT 1", None),
        ("SET LOCAL work_mem = '64MB'", None),
        ("SELECT set_config('application_name', 'x', false)", None),
        ("SELECT table_name FROM information_schema.tables", None),
        ("SHOW search_path", None),
        ("DISCARD PLANS", None),
    ],
)
def test_search_path_after(text: str, found: tuple[str | None] | None) -> None:
    assert _search_path_after(Statement(text)) == found
