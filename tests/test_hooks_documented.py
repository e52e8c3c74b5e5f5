"""Every hook specification in `halephant.hooks` is named by the rule, documented (when and how often it
is called, each argument, its answer, its default plugin) and implemented by at least one plugin in
`plugins/` or `examples/` (read from the source, not imported)."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from halephant import PROJECT, hooks

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
EXAMPLES = ROOT / "examples"

#: what ``@hookspec`` leaves on a function
SPEC_ATTR = f"{PROJECT}_spec"

#: first words of hook names: what halephant asks plugins to do
VERBS = frozenset(
    {
        "select",
        "authenticate",
        "route",
        "inspect",
        "configure",
        "declare",
        "register",
        "start",
        "stop",
        "reload",
        "describe",
        "report",
        "check",
        "choose",
        "decide",
        "resolve",
        "rewrite",
        "observe",
        "record",
        "startup",
        "shutdown",
        "prepare",
        "open",
        "close",
        "connect",
        "disconnect",
        "size",
        "add",
        "extend",
        "filter",
        "validate",
        "transform",
        "map",
        "handle",
        "log",
        "collect",
        "provide",
        "load",
        "setup",
    }
)
#: names fixed by the design card's hook table before this rule was written down (`noun_noun`), with why
NAMED_BY_DESIGN = {
    "halephant_pool_size": "named in the design card's minimum hook set",
    "halephant_plugin_settings": "pytest/tox style declaration hook (cf. tox_add_core_config)",
}


def hookspecs() -> dict[str, Callable[..., Any]]:
    return {
        name: fn
        for name, fn in vars(hooks).items()
        if callable(fn) and getattr(fn, SPEC_ATTR, None) is not None
    }


SPECS = hookspecs()
NAMES = sorted(SPECS)


def _plugin_files() -> list[Path]:
    out: list[Path] = []
    for base in (PLUGINS, EXAMPLES):
        if base.is_dir():
            out += sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)
    return out


def _is_hookimpl(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or (
        isinstance(target, ast.Attribute) and target.attr == "hookimpl"
    )


def implementations() -> dict[str, list[str]]:
    """hook name -> files that implement it with ``@hookimpl`` (module functions or methods)."""
    found: dict[str, list[str]] = {}
    for path in _plugin_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.name.startswith(f"{PROJECT}_")
                and any(_is_hookimpl(d) for d in node.decorator_list)
            ):
                found.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    return found


def test_there_are_hookspecs() -> None:
    assert "halephant_select_pool" in SPECS and "halephant_inspect_query" in SPECS


@pytest.mark.parametrize("name", NAMES)
def test_hook_name(name: str) -> None:
    assert re.fullmatch(rf"{PROJECT}_[a-z]+(_[a-z]+)?", name), (
        f"{name}: halephant_<verb>_<object> or halephant_<verb>"
    )
    verb = name.split("_")[1]
    assert verb in VERBS or name in NAMED_BY_DESIGN, (
        f"{name}: {verb!r} is not a verb (add it to VERBS if it is)"
    )


@pytest.mark.parametrize("name", NAMES)
def test_hook_docstring(name: str) -> None:
    spec = SPECS[name]
    doc = inspect.getdoc(spec)
    assert doc, f"{name} has no docstring"
    assert "Called" in doc, f"{name}: say when and how often it is called ('Called ...')"
    params = list(inspect.signature(spec).parameters)
    for param in params:
        assert re.search(rf":param {param}:\s*\S", doc), f"{name}: document ':param {param}:'"
    documented = re.findall(r":param (\w+):", doc)
    assert set(documented) <= set(params), f"{name}: documents parameters it does not take: {documented}"
    if getattr(spec, SPEC_ATTR).get("firstresult"):
        assert ":returns:" in doc, f"{name} is a decision: say what an answer means (':returns:')"
        flat = " ".join(doc.split())
        assert "first non-None" in flat, f"{name} is firstresult: say that the first non-None answer wins"


@pytest.mark.parametrize("name", NAMES)
def test_hook_names_its_default(name: str) -> None:
    doc = inspect.getdoc(SPECS[name]) or ""
    match = re.search(r"^Default:\s*(.+)$", doc, re.MULTILINE)
    assert match, f"{name}: end with 'Default: ``plugins/<module>.py`` ...' or 'Default: none.'"
    text = match.group(1)
    if re.match(r"none\b", text, re.IGNORECASE):
        return
    modules = re.findall(r"plugins/(\w+)\.py", text)
    assert modules, f"{name}: the Default line names no plugin module and does not say 'none': {text!r}"
    impls = implementations().get(name, [])
    for module in modules:
        assert (PLUGINS / f"{module}.py").is_file(), f"{name}: plugins/{module}.py does not exist"
        assert f"plugins/{module}.py" in impls, (
            f"{name}: its default plugins/{module}.py does not implement it"
        )


def test_every_hook_is_implemented_somewhere() -> None:
    impls = implementations()
    missing = [name for name in NAMES if name not in impls]
    examples_exist = EXAMPLES.is_dir() and any(EXAMPLES.rglob("*.py"))
    if missing and not examples_exist:
        pytest.xfail(f"examples/ has no plugins yet; hooks with no implementation: {', '.join(missing)}")
    assert not missing, f"hooks no plugin in plugins/ or examples/ implements: {', '.join(missing)}"


def test_every_hookimpl_names_a_hookspec() -> None:
    # pluggy's check_pending catches this at start-up for loaded plugins; examples are checked here too
    unknown = {name: files for name, files in implementations().items() if name not in SPECS}
    assert not unknown, f"@hookimpl functions that match no hookspec (misspelt?): {unknown}"


def test_hookspecs_take_keyword_arguments_only_by_convention() -> None:
    # pluggy calls with keywords; a default value would be silently ignored by pluggy
    for name, spec in SPECS.items():
        for param in inspect.signature(spec).parameters.values():
            assert param.default is inspect.Parameter.empty, (
                f"{name}({param.name}=...): pluggy ignores defaults"
            )
            assert param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY), f"{name}({param.name})"


def _marked(decorator: ast.expr, option: str) -> bool:
    return isinstance(decorator, ast.Call) and any(
        kw.arg == option and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in decorator.keywords
    )


@pytest.mark.parametrize("name", [n for n in NAMES if getattr(SPECS[n], SPEC_ATTR).get("firstresult")])
def test_default_decisions_are_trylast_and_the_access_rules_tryfirst(name: str) -> None:
    # any installed plugin gets the first word; halephant's own default answers last. Except the access
    # rules of plugins/hba.py (tryfirst): a gate that another plugin's Trust could otherwise step past,
    # and silent unless `plugins.hba.file` is set.
    for path in sorted(PLUGINS.glob("*.py")):
        option = "tryfirst" if path.name == "hba.py" else "trylast"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                marks = [d for d in node.decorator_list if _is_hookimpl(d)]
                assert marks and all(_marked(d, option) for d in marks), (
                    f"plugins/{path.name}: {name} must be {option}"
                )
