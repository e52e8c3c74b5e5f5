"""The layering rules of the design, checked on the source (ast, nothing imported):

* `halephant/protocol/` is sans-IO: standard library (no asyncio, sockets) plus `halephant.errors`,
  `halephant.sqlstate` and `halephant.protocol` only;
* `halephant/sql/` imports only the standard library at module level (`pglast` lazily, inside functions);
* `halephant/auth/` does no I/O: no anyio, asyncio, sockets, ssl or threads, nothing of the proxy;
* plugins (`plugins/`, `examples/`) import only the public surface: `halephant`, `halephant.types`,
  `halephant.sqlstate`, `halephant.sql`;
* every module of `halephant/` and `plugins/` starts with a docstring saying what it owns.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "halephant"
PLUGINS = ROOT / "plugins"
EXAMPLES = ROOT / "examples"

STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}
#: standard-library modules that would make the protocol layer do or wait for I/O
IO_MODULES = frozenset({"asyncio", "socket", "selectors", "ssl", "select", "threading", "multiprocessing"})
PUBLIC_SURFACE = frozenset({"halephant", "halephant.types", "halephant.sqlstate", "halephant.sql"})


@dataclass(frozen=True)
class Import:
    module: str  # absolute, dotted; `from halephant import sqlstate` is `halephant.sqlstate`
    line: int
    in_function: bool

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def python_files(base: Path) -> list[Path]:
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts[0] = "halephant_plugins"  # how pyproject installs it
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_from(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _submodule_exists(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] == "halephant":
        base = PACKAGE.joinpath(*parts[1:])
    elif parts[0] == "halephant_plugins":
        base = PLUGINS.joinpath(*parts[1:])
    else:
        return False
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path, source: str | None = None) -> Iterator[Import]:
    """Every import in the module at `path` (or in `source`, as if it were that module), nested ones too."""
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    functions: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            functions.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        in_function = id(node) in functions
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, in_function)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(path, node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                # `from halephant import sqlstate` imports a module; `from halephant import hookimpl` a name
                yield Import(candidate if _submodule_exists(candidate) else base, node.lineno, in_function)


def where(path: Path, imp: Import) -> str:
    return f"{path.relative_to(ROOT)}:{imp.line}: {imp.module}"


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


PROTOCOL_FILES = python_files(PACKAGE / "protocol")
SQL_FILES = python_files(PACKAGE / "sql")
AUTH_FILES = python_files(PACKAGE / "auth")
PLUGIN_FILES = python_files(PLUGINS) + python_files(EXAMPLES)
DOCUMENTED_FILES = python_files(PACKAGE) + python_files(PLUGINS)


def test_the_layers_exist() -> None:
    # a moved directory must not make the rules below pass vacuously
    assert PROTOCOL_FILES and SQL_FILES and AUTH_FILES and python_files(PLUGINS)


def protocol_violations(found: Iterator[Import]) -> list[Import]:
    allowed_own = ("halephant.errors", "halephant.sqlstate", "halephant.protocol")
    bad = []
    for imp in found:
        if imp.top == "halephant":
            ok = any(imp.module == a or imp.module.startswith(a + ".") for a in allowed_own)
        else:
            ok = imp.top in STDLIB and imp.top not in IO_MODULES
        if not ok:
            bad.append(imp)
    return bad


def sql_violations(found: Iterator[Import]) -> list[Import]:
    return [
        imp
        for imp in found
        if not (
            imp.module == "halephant.sql"
            or imp.module.startswith("halephant.sql.")
            or imp.top in STDLIB
            # a C extension most processes never need: loaded on first use only
            or (imp.top == "pglast" and imp.in_function)
        )
    ]


def plugin_violations(found: Iterator[Import]) -> list[Import]:
    return [imp for imp in found if imp.top == "halephant" and imp.module not in PUBLIC_SURFACE]


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=_ids(PROTOCOL_FILES))
def test_protocol_is_sans_io(path: Path) -> None:
    bad = [where(path, imp) for imp in protocol_violations(imports(path))]
    assert not bad, "the protocol layer is sans-IO; forbidden imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", AUTH_FILES, ids=_ids(AUTH_FILES))
def test_auth_does_no_io(path: Path) -> None:
    # password exchanges and halephant's own short sessions are sans-IO: the callers (proxy, topology,
    # node_streams) read and write
    bad = [
        where(path, imp)
        for imp in imports(path)
        if imp.top in IO_MODULES or imp.top in ("anyio", "uvloop") or imp.module.startswith("halephant.proxy")
    ]
    assert not bad, "halephant/auth/ is sans-IO; forbidden imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", SQL_FILES, ids=_ids(SQL_FILES))
def test_sql_imports_only_stdlib(path: Path) -> None:
    bad = [where(path, imp) for imp in sql_violations(imports(path))]
    assert not bad, (
        "halephant.sql imports only the standard library (pglast inside functions):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=_ids(PLUGIN_FILES))
def test_plugins_use_only_the_public_surface(path: Path) -> None:
    bad = [where(path, imp) for imp in plugin_violations(imports(path))]
    assert not bad, (
        "plugins import only halephant, halephant.types, halephant.sqlstate and halephant.sql:\n"
        + "\n".join(bad)
    )


@pytest.mark.parametrize("path", DOCUMENTED_FILES, ids=_ids(DOCUMENTED_FILES))
def test_module_starts_with_docstring(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert tree.body, f"{path.relative_to(ROOT)} is empty: say what it owns in a docstring"
    first = tree.body[0]
    assert (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ), f"{path.relative_to(ROOT)} does not start with a module docstring"
    assert first.value.value.strip(), f"{path.relative_to(ROOT)} has an empty docstring"


# --- the checker itself ------------------------------------------------------------------------------


def test_import_resolution() -> None:
    path = PACKAGE / "protocol" / "startup.py"
    found = {imp.module for imp in imports(path)}
    assert {"halephant.sqlstate", "halephant.errors", "halephant.protocol.codes"} <= found
    plugin = PLUGINS / "database_routing.py"
    found = {imp.module for imp in imports(plugin)}
    assert "halephant" in found  # `from halephant import hookimpl` is the package itself
    assert "halephant.sqlstate" in found


def test_relative_imports_resolve() -> None:
    node = ast.parse("from .codes import X\nfrom .. import errors\n").body
    path = PACKAGE / "protocol" / "startup.py"
    assert isinstance(node[0], ast.ImportFrom) and isinstance(node[1], ast.ImportFrom)
    assert _resolve_from(path, node[0]) == "halephant.protocol.codes"
    assert _resolve_from(path, node[1]) == "halephant"
    init = PACKAGE / "protocol" / "__init__.py"
    assert _resolve_from(init, node[0]) == "halephant.protocol.codes"


def test_rules_catch_violations() -> None:
    proto = PACKAGE / "protocol" / "example.py"
    src = (
        "import asyncio\nimport struct\nimport anyio\nfrom halephant.pool import pool\n"
        "from halephant import sqlstate, hookimpl\nfrom ..proxy import app\nfrom . import codes\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from halephant.proxy.client import Client\n"
    )
    assert sorted(imp.module for imp in protocol_violations(imports(proto, src))) == [
        "anyio",
        "asyncio",
        "halephant",
        "halephant.pool.pool",
        "halephant.proxy.app",
        "halephant.proxy.client",
    ]

    sql = PACKAGE / "sql" / "example.py"
    src = "import re\nimport pglast\nfrom halephant.sql import lexer\ndef f():\n    import pglast\n"
    assert [(imp.module, imp.line) for imp in sql_violations(imports(sql, src))] == [("pglast", 2)]

    plugin = PLUGINS / "example.py"
    src = (
        "from halephant import hookimpl, sqlstate\nfrom halephant.types import Reject\nimport halephant.sql\n"
        "import pydantic\nfrom halephant.errors import ClientError\nfrom halephant.proxy import app\n"
        "from halephant import plugin_manager\nfrom . import helpers\n"
    )
    assert sorted(imp.module for imp in plugin_violations(imports(plugin, src))) == [
        "halephant.errors",
        "halephant.plugin_manager",
        "halephant.proxy.app",
    ]
