"""The examples in `examples/` work as their READMEs say.

Every single-file plugin in `examples/plugins/` imports only halephant's public surface, registers beside
the installed plugins without errors, and answers a representative call with the decision it documents
(and, where it is not concerned, leaves the call to the default). The example package
`halephant-reject-statements` is installed in the test environment (``pip install -e
examples/halephant-reject-statements``) and is checked as halephant itself sees it: through its entry point.
"""

from __future__ import annotations

import ast
import datetime
import importlib.metadata
import importlib.util
import pathlib
import sys
import textwrap
from collections.abc import Iterator
from types import ModuleType

import pytest

from halephant import sqlstate
from halephant.config import Config, ConfigError, read_config_text, validate_config
from halephant.plugin_manager import PluginDescription, Plugins
from halephant.types import (
    ClientInfo,
    ClusterView,
    NodeInfo,
    PoolInfo,
    PoolMode,
    PoolSize,
    PoolTarget,
    Reject,
    Role,
    Route,
    ScramSha256,
    Statement,
    TransactionInfo,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SINGLE_FILES = sorted((EXAMPLES / "plugins").glob("*.py"))
PACKAGE_DIR = EXAMPLES / "halephant-reject-statements"
DISTRIBUTION = "halephant-reject-statements"
PUBLIC_MODULES = frozenset({"halephant", "halephant.types", "halephant.sqlstate", "halephant.sql"})

# No test connects anywhere: the nodes only have to be valid addresses.
CONFIG = """\
clusters:
  main:
    nodes: [127.0.0.1:54321, 127.0.0.1:54322]
databases:
  myapp:
    cluster: main
  analytics:
    cluster: main
    pool_size: 10
    min_pool_size: 2
  tenants:
    cluster: main
    mode: session
    pool_size: 7
    min_pool_size: 1
  tenant_special:
    cluster: main
users:
  myapp:
    password: secret
  reporting:
    password: md5c2a5d2ca7ba8ba5dca4ee0e7d1d2bba1
    server_password: upstream-secret
    auth: md5
"""


def load_example(path: pathlib.Path) -> ModuleType:
    """Import one example file by path, as a package that ships it would import its own module."""
    spec = importlib.util.spec_from_file_location(f"halephant_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # registered first, as an import would: pydantic resolves a settings model's annotations there
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_plugins(*modules: ModuleType) -> Plugins:
    """The installed plugins plus `modules`, each registered under its file's name."""
    extra = [(m, m.__name__.removeprefix("halephant_example_")) for m in modules]
    return Plugins(entry_points=True, extra=extra)


def make_config(plugins: Plugins, tail: str = "") -> Config:
    """Validate CONFIG (+ `tail`) with the plugins' settings models and configure the plugins with it.

    Configuring every time also resets plugins that keep their settings in the module (reject_statements)
    to what this test asked for.
    """
    raw = read_config_text(CONFIG + textwrap.dedent(tail), "halephant.yaml")
    config = validate_config(raw, plugins.settings_models())
    plugins.configure(config)
    return config


def client(user: str = "myapp", database: str = "myapp", **params: str) -> ClientInfo:
    return ClientInfo(
        user=user,
        database=database,
        params={"user": user, "database": database, **params},
        address="127.0.0.1:50000",
    )


CLUSTER = ClusterView(
    "main",
    (
        NodeInfo("127.0.0.1:5432", "127.0.0.1", 5432, Role.PRIMARY, usable=True),
        NodeInfo("127.0.0.1:5433", "127.0.0.1", 5433, Role.REPLICA, usable=True),
    ),
)


def pool_info(plugins: Plugins, config: Config, who: ClientInfo) -> PoolInfo:
    target = plugins.select_pool(who, config)
    assert isinstance(target, PoolTarget), target
    return PoolInfo(target=target, size=plugins.pool_size(target, config))


@pytest.fixture(autouse=True)
def _reset_installed_plugins() -> Iterator[None]:
    # reject_statements keeps its settings in its module: leave it as a fresh start would find it.
    yield
    plugins = Plugins()
    make_config(plugins)


# --- every single-file example -------------------------------------------------------------------------


def test_there_are_single_file_examples() -> None:
    assert {p.stem for p in SINGLE_FILES} >= {
        "route_by_application_name",
        "tenant_pool_size",
        "deny_users",
        "reject_ddl",
        "select_pool_by_prefix",
        "peak_hours_pool_size",
    }


def _imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path",
    [*SINGLE_FILES, *sorted(PACKAGE_DIR.rglob("*.py"))],
    ids=lambda p: p.relative_to(EXAMPLES).as_posix(),
)
def test_examples_import_only_the_public_surface(path: pathlib.Path) -> None:
    used = {name for name in _imported_modules(path) if name.split(".")[0] == "halephant"}
    assert used <= PUBLIC_MODULES, f"{path.name} imports internal modules: {sorted(used - PUBLIC_MODULES)}"


@pytest.mark.parametrize("path", SINGLE_FILES, ids=lambda p: p.stem)
def test_single_file_example_registers(path: pathlib.Path) -> None:
    module = load_example(path)
    plugins = make_plugins(module)
    described = {d.name: d for d in plugins.describe()}
    assert path.stem in described
    assert described[path.stem].hooks, f"{path.name} implements no hook"
    assert all(hook.startswith("halephant_") for hook in described[path.stem].hooks)
    make_config(plugins)  # its presence does not break loading a config


def test_route_by_application_name() -> None:
    module = load_example(EXAMPLES / "plugins" / "route_by_application_name.py")
    plugins = make_plugins(module)
    config = make_config(plugins)
    transaction = TransactionInfo(Statement("SELECT count(*) FROM orders"))

    report = client(application_name="report-weekly")
    route = plugins.route(report, transaction, pool_info(plugins, config, report), CLUSTER)
    assert isinstance(route, Route)
    assert route.role is Role.REPLICA
    assert "report-weekly" in route.reason

    app = client(application_name="web")
    route = plugins.route(app, transaction, pool_info(plugins, config, app), CLUSTER)
    assert isinstance(route, Route) and route.role is Role.PRIMARY  # left to the default
    assert module.halephant_route(client=app, cluster=CLUSTER) is None

    # No replica to take it: left to the default's replica_fallback (the primary), not failed with 57P03.
    no_replica = ClusterView("main", CLUSTER.nodes[:1])
    assert module.halephant_route(client=report, cluster=no_replica) is None
    route = plugins.route(report, transaction, pool_info(plugins, config, report), no_replica)
    assert isinstance(route, Route) and route.role is Role.PRIMARY


def test_tenant_pool_size() -> None:
    plugins = make_plugins(load_example(EXAMPLES / "plugins" / "tenant_pool_size.py"))
    config = make_config(plugins)

    analytics = pool_info(plugins, config, client(database="analytics"))
    assert analytics.size.max == 50
    assert analytics.size.min == 2  # the configured warm minimum is kept
    assert "tenant_pool_size" in analytics.size.reason

    myapp = pool_info(plugins, config, client())
    assert myapp.size == PoolSize(min=0, max=20, reason="databases.myapp.pool_size")  # the default's answer


PEAK_HOURS = """\
plugins:
  peak_hours_pool_size:
    start: {start}
    end: {end}
    sizes: {{analytics: 50}}
"""


@pytest.mark.parametrize(
    ("start", "end", "now", "peak", "recheck_after"),
    [
        (8, 18, "10:00", True, 3600.0),  # at most an hour, however far the next change
        (8, 18, "17:30", True, 1800.0),
        (8, 18, "18:00", False, 3600.0),
        (8, 18, "07:59:30", False, 30.0),
        (22, 6, "23:00", True, 3600.0),  # a peak over midnight
        (22, 6, "05:15", True, 2700.0),
        (22, 6, "12:00", False, 3600.0),
        (22, 6, "21:20", False, 2400.0),
    ],
)
def test_peak_hours_pool_size(
    monkeypatch: pytest.MonkeyPatch, start: int, end: int, now: str, peak: bool, recheck_after: float
) -> None:
    module = load_example(EXAMPLES / "plugins" / "peak_hours_pool_size.py")
    clock = datetime.datetime.combine(datetime.date(2026, 3, 2), datetime.time.fromisoformat(now))
    monkeypatch.setattr(module, "_now", lambda: clock)
    plugins = make_plugins(module)
    config = make_config(plugins, PEAK_HOURS.format(start=start, end=end))

    analytics = pool_info(plugins, config, client(database="analytics"))
    assert analytics.size.max == (50 if peak else 10)  # else databases.analytics.pool_size
    assert analytics.size.min == 2  # the configured warm minimum is kept
    assert analytics.size.recheck_after == recheck_after
    assert "peak_hours_pool_size" in analytics.size.reason
    # Other databases are left to the default, which asks for no recheck.
    myapp = pool_info(plugins, config, client())
    assert myapp.size == PoolSize(min=0, max=20, reason="databases.myapp.pool_size")


@pytest.mark.parametrize(
    ("tail", "path", "where", "message"),
    [
        ("    sizs: {analytics: 50}\n", "plugins.peak_hours_pool_size.sizs", (4, 5), "did you mean 'sizes'"),
        ("    start: 24\n", "plugins.peak_hours_pool_size.start", (4, 12), "less than or equal to 23"),
        (
            "    sizes: {analytics: 0}\n",
            "plugins.peak_hours_pool_size.sizes.analytics",
            (4, 24),
            "greater than or equal to 1",
        ),
        ("    start: 18\n", "plugins.peak_hours_pool_size", (2, 3), "the peak would have no length"),
    ],
)
def test_peak_hours_pool_size_settings_errors_have_a_place(
    tail: str, path: str, where: tuple[int, int], message: str
) -> None:
    plugins = make_plugins(load_example(EXAMPLES / "plugins" / "peak_hours_pool_size.py"))
    with pytest.raises(ConfigError) as excinfo:
        make_config(plugins, "plugins:\n  peak_hours_pool_size:\n    end: 18\n" + tail)
    (problem,) = excinfo.value.problems
    assert problem.path == path
    assert (problem.file, problem.line - CONFIG.count("\n"), problem.col) == ("halephant.yaml", *where)
    assert message in problem.message


def test_deny_users() -> None:
    module = load_example(EXAMPLES / "plugins" / "deny_users.py")
    plugins = make_plugins(module)
    config = make_config(plugins)

    intruder = client(user="intruder")
    target = plugins.select_pool(intruder, config)
    assert isinstance(target, PoolTarget)
    answer = plugins.authenticate(intruder, target, config)
    assert isinstance(answer, Reject)
    assert answer.code == sqlstate.INVALID_AUTHORIZATION_SPECIFICATION == "28000"
    assert "intruder" in answer.message

    myapp = client()
    assert isinstance(plugins.authenticate(myapp, target, config), ScramSha256)  # left to the default
    assert module.halephant_authenticate(client=myapp) is None


@pytest.mark.parametrize(
    ("text", "keyword"),
    [
        ("DROP TABLE orders", "DROP"),
        ("drop table orders", "DROP"),
        ("/* cleanup */ TRUNCATE orders", "TRUNCATE"),
        ("  -- nightly\n  truncate table orders", "TRUNCATE"),
        ("SELECT 1; DROP TABLE orders", "DROP"),
        ("(drop table orders)", "DROP"),
    ],
)
def test_reject_ddl_refuses(text: str, keyword: str) -> None:
    plugins = make_plugins(load_example(EXAMPLES / "plugins" / "reject_ddl.py"))
    config = make_config(plugins)
    who = client()
    verdict = plugins.inspect_query(who, Statement(text), pool_info(plugins, config, who))
    assert isinstance(verdict, Reject)
    assert verdict.code == sqlstate.INSUFFICIENT_PRIVILEGE == "42501"
    assert keyword in verdict.message
    assert verdict.hint


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1",
        "SELECT 'DROP TABLE orders'",
        '"drop" ',
        "SELECT $$; DROP TABLE orders$$",
        "/* DROP TABLE orders */ SELECT 1",
        "DELETE FROM orders WHERE id = 1",
        "CREATE TABLE dropped (id int)",
    ],
)
def test_reject_ddl_lets_other_statements_through(text: str) -> None:
    plugins = make_plugins(load_example(EXAMPLES / "plugins" / "reject_ddl.py"))
    config = make_config(plugins)
    who = client()
    assert plugins.inspect_query(who, Statement(text), pool_info(plugins, config, who)) is None


def test_select_pool_by_prefix() -> None:
    module = load_example(EXAMPLES / "plugins" / "select_pool_by_prefix.py")
    plugins = make_plugins(module)
    config = make_config(plugins)

    tenant = client(user="reporting", database="tenant_acme")
    target = plugins.select_pool(tenant, config)
    assert isinstance(target, PoolTarget)
    assert (target.database, target.cluster, target.server_database) == ("tenant_acme", "main", "tenant_acme")
    assert (target.server_user, target.server_password) == ("reporting", "upstream-secret")
    assert target.mode is PoolMode.SESSION  # from databases.tenants
    assert "acme" in target.reason
    # Its pools have no `databases:` entry: they follow the template entry's, sizes included.
    assert target.entry == "tenants"
    size = plugins.pool_size(target, config)
    assert (size.min, size.max) == (1, 7)

    # Not a tenant name, or one with its own entry: left to the default.
    assert module.halephant_select_pool(client=client(database="myapp"), config=config) is None
    special = plugins.select_pool(client(database="tenant_special"), config)
    assert isinstance(special, PoolTarget) and special.mode is PoolMode.TRANSACTION
    for database in ("tenant_", "Tenant_acme", "tenant_acme; drop", "tenants_x"):
        answer = plugins.select_pool(client(database=database), config)
        assert isinstance(answer, Reject) and answer.code == sqlstate.INVALID_CATALOG_NAME, database


def test_select_pool_by_prefix_without_the_template_entry() -> None:
    module = load_example(EXAMPLES / "plugins" / "select_pool_by_prefix.py")
    raw = read_config_text(CONFIG.replace("  tenants:\n", "  other:\n"), "halephant.yaml")
    config = validate_config(raw, make_plugins(module).settings_models())
    assert module.halephant_select_pool(client=client(database="tenant_acme"), config=config) is None


# --- the example package: halephant-reject-statements ---------------------------------------------------


@pytest.fixture
def package() -> ModuleType:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        where = PACKAGE_DIR.relative_to(ROOT)
        pytest.fail(f"{DISTRIBUTION} is not installed: run .venv/bin/pip install -e {where}", pytrace=False)
    (entry_point,) = [ep for ep in dist.entry_points if ep.group == "halephant"]
    assert (entry_point.name, entry_point.value) == ("reject_statements", "halephant_reject_statements")
    module = entry_point.load()
    assert isinstance(module, ModuleType)
    # An editable install: the tests check the code in this tree, not a stale copy.
    assert pathlib.Path(module.__file__ or "").resolve().is_relative_to(PACKAGE_DIR)
    return module


POLICY = """\
plugins:
  reject_statements:
    users: [reporting]
    patterns:
      - '^\\s*delete\\b(?!.*\\bwhere\\b)'
      - '\\bpg_sleep\\s*\\('
      - 'cursor'
    message: deletes without WHERE are not allowed here
"""


def test_package_is_listed_by_describe(package: ModuleType) -> None:
    described = {d.name: d for d in Plugins().describe()}
    assert described["reject_statements"] == PluginDescription(
        name="reject_statements",
        distribution=DISTRIBUTION,
        version=importlib.metadata.version(DISTRIBUTION),
        hooks=("halephant_configure", "halephant_inspect_query", "halephant_plugin_settings"),
    )


def test_package_is_not_loaded_when_disabled(package: ModuleType) -> None:
    plugins = Plugins(disabled=["reject_statements"])
    assert "reject_statements" not in {d.name for d in plugins.describe()}
    assert "reject_statements" not in plugins.settings_models()


def test_package_settings_validate(package: ModuleType) -> None:
    plugins = Plugins()
    assert plugins.settings_models()["reject_statements"] is package.RejectStatementsSettings
    settings = make_config(plugins, POLICY).plugin_settings("reject_statements")
    assert settings == package.RejectStatementsSettings(
        users=["reporting"],
        patterns=[r"^\s*delete\b(?!.*\bwhere\b)", r"\bpg_sleep\s*\(", "cursor"],
        message="deletes without WHERE are not allowed here",
    )
    assert make_config(plugins).plugin_settings("reject_statements") == package.RejectStatementsSettings()


def test_package_settings_report_a_bad_pattern_where_it_is(package: ModuleType) -> None:
    tail = """\
    plugins:
      reject_statements:
        users: [reporting]
        patterns: ['^drop', '(unclosed']
    """
    with pytest.raises(ConfigError) as excinfo:
        make_config(Plugins(), tail)
    (problem,) = excinfo.value.problems
    assert "plugins.reject_statements.patterns" in str(excinfo.value)
    assert problem.path == "plugins.reject_statements.patterns.1"
    line = CONFIG.count("\n") + 4
    assert (problem.file, problem.line, problem.col) == ("halephant.yaml", line, 25)
    assert "not a valid regular expression" in problem.message


@pytest.mark.parametrize(
    ("tail", "path"),
    [
        ("plugins:\n  reject_statements:\n    user: [reporting]\n", "plugins.reject_statements.user"),
        ("plugins:\n  reject_statements:\n    users: reporting\n", "plugins.reject_statements.users"),
        ("plugins:\n  reject_statements:\n    message: ''\n", "plugins.reject_statements.message"),
    ],
)
def test_package_settings_other_mistakes(package: ModuleType, tail: str, path: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        make_config(Plugins(), tail)
    assert [p.path for p in excinfo.value.problems] == [path]


def test_package_rejects_matching_statements_of_listed_users(package: ModuleType) -> None:
    plugins = Plugins()
    config = make_config(plugins, POLICY)
    reporting = client(user="reporting")
    pool = pool_info(plugins, config, reporting)

    for text in ("DELETE FROM t", "  delete from t", "SELECT pg_sleep (1)", "SELECT 1; select PG_SLEEP(1)"):
        verdict = plugins.inspect_query(reporting, Statement(text), pool)
        assert isinstance(verdict, Reject), text
        assert verdict.code == sqlstate.INSUFFICIENT_PRIVILEGE == "42501"
        assert verdict.message == "deletes without WHERE are not allowed here"
        assert verdict.hint is not None and '"reporting"' in verdict.hint
        assert "reject_statements" in verdict.reason

    for text in ("DELETE FROM orders WHERE id = 1", "SELECT 1", "SELECT sleep(1)"):
        assert plugins.inspect_query(reporting, Statement(text), pool) is None, text

    # Users not listed are not looked at.
    myapp = client()
    delete = Statement("DELETE FROM orders")
    assert plugins.inspect_query(myapp, delete, pool_info(plugins, config, myapp)) is None
    assert package.halephant_inspect_query(client=myapp, statement=delete) is None


def test_package_gets_the_first_word(package: ModuleType) -> None:
    # cursor_guard (a default, trylast) would answer 0A000; the package's rule runs first and wins.
    plugins = Plugins()
    config = make_config(plugins, POLICY)
    holdable = Statement("DECLARE c CURSOR WITH HOLD FOR SELECT 1")

    reporting = client(user="reporting")
    pool = pool_info(plugins, config, reporting)
    assert pool.mode is PoolMode.TRANSACTION
    verdict = plugins.inspect_query(reporting, holdable, pool)
    assert isinstance(verdict, Reject) and verdict.code == sqlstate.INSUFFICIENT_PRIVILEGE

    myapp = client()
    verdict = plugins.inspect_query(myapp, holdable, pool_info(plugins, config, myapp))
    assert isinstance(verdict, Reject) and verdict.code == sqlstate.FEATURE_NOT_SUPPORTED


def test_package_follows_reloads(package: ModuleType) -> None:
    plugins = Plugins()
    reporting = client(user="reporting")
    config = make_config(plugins, POLICY)
    statement = Statement("DELETE FROM orders")
    verdict = plugins.inspect_query(reporting, statement, pool_info(plugins, config, reporting))
    assert isinstance(verdict, Reject)
    config = make_config(plugins)  # the section removed: the defaults check nobody
    assert plugins.inspect_query(reporting, statement, pool_info(plugins, config, reporting)) is None


def test_package_without_patterns_rejects_nothing(package: ModuleType) -> None:
    plugins = Plugins()
    config = make_config(plugins, "plugins:\n  reject_statements:\n    users: [reporting]\n")
    reporting = client(user="reporting")
    pool = pool_info(plugins, config, reporting)
    assert plugins.inspect_query(reporting, Statement("DELETE FROM t"), pool) is None


def test_status_busiest_databases() -> None:
    module = load_example(EXAMPLES / "plugins" / "status_busiest_databases.py")
    plugins = make_plugins(module)
    pools = [
        {"database": "small", "transactions": 5, "queries": 9, "cl_waiting": 0},
        {"database": "big", "transactions": 700, "queries": 900, "cl_waiting": 2},
        {"database": "big", "transactions": 300, "queries": 100, "cl_waiting": 1},
    ]
    panels = plugins.status_panels({"pools": pools})
    ((name, panel),) = panels
    assert name == "status_busiest_databases"
    assert not isinstance(panel, Exception)
    assert panel.title == "Busiest databases"
    assert panel.rows == (("big", "1000", "1000", "3"), ("small", "5", "9", "0"))
    assert plugins.status_panels({"pools": []}) == []  # nothing to show: no panel
