"""The `halephant` command: `run`, `check`, `import-pgbouncer`, `plugins`, `status`, `demo`."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from halephant import __version__
from halephant.config import Config, ConfigError, RawConfig, plugin_problem, read_config, validate_config
from halephant.plugin_manager import PluginError, Plugins
from halephant.unix_socket import UnixSocketError


def load(path: str) -> tuple[Config, Plugins]:
    """Read a config, load the plugins it leaves enabled, validate it with their settings, and let them
    see it (`halephant_configure`), as start-up will: what a plugin refuses is found by `check` too."""
    return load_raw(read_config(path))


def load_raw(raw: RawConfig) -> tuple[Config, Plugins]:
    """`load` for a config already read (from a file, or text such as `import-pgbouncer`'s)."""
    try:
        plugins = Plugins(disabled=raw.disabled_plugins, modules=raw.plugin_modules)
        models = plugins.settings_models()
    except PluginError as exc:
        raise plugin_problem(raw, exc) from exc
    config = validate_config(raw, models)
    try:
        plugins.configure(config)
    except PluginError as exc:
        raise plugin_problem(raw, exc) from exc
    # warnings: disabling what is not there disables nothing
    installed = ", ".join(p.name for p in plugins.describe())
    for name in plugins.unknown_disabled:
        problem = plugin_problem(raw, PluginError(f"no installed plugin is named {name!r}")).problems[0]
        click.echo(f"warning: {problem} (plugins: {installed})", err=True)
    for name in plugins.unknown_disabled_env:
        click.echo(
            f"warning: HALEPHANT_DISABLE_PLUGINS: no installed plugin is named {name!r} "
            f"(plugins: {installed})",
            err=True,
        )
    return config, plugins


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the per-transaction path.

    Each transaction allocates a few short-lived containers that reference counting frees; with the
    default threshold (700) they still trigger a generation-0 collection every couple of hundred
    transactions, and a full one (scanning every client and pool object) every ~100 of those. Objects
    that exist at start-up are frozen out of the collector's view, and collections run less often.
    Measured: about 1.5 µs of CPU per transaction less under pgbench -S.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


#: descriptors halephant holds besides its client and server connections (listening sockets, probes,
#: the admin API and console, the event loop's own, the log), for the start-up estimate below
_FD_OVERHEAD = 64
#: below this, halephant cannot start its event loop and serve a few clients: refused at start-up
FD_MINIMUM = 64


class FdLimitTooLow(Exception):
    """The open-files limit cannot be raised to what halephant needs to start at all."""


def _raise_fd_limit(config: Config) -> None:
    """Raise the soft limit on open files to the hard one: each client and each server connection is a
    descriptor, and the usual soft limit (1024) is far below `max_client_conn`'s default. Logged once
    at start-up, as a warning when even the hard limit is below what `max_client_conn` and one user's
    pools can take: clients beyond it then wait to be accepted (`halephant.proxy.accept`). Raises
    FdLimitTooLow below `FD_MINIMUM`, where even the event loop's own descriptors would not fit."""
    import logging
    import resource

    log = logging.getLogger("halephant")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling then
        try:
            wanted = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            wanted = soft
    limit = soft
    if soft != resource.RLIM_INFINITY and wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            limit = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the limit on open files from %d to %d: %s", soft, wanted, exc)
    raised = f" (raised from {soft})" if limit != soft else ""
    if limit != resource.RLIM_INFINITY and limit < FD_MINIMUM:
        raise FdLimitTooLow(
            f"open files: limit {limit}{raised} is too low to start; at least {FD_MINIMUM} are needed "
            f"(raise it with ulimit -n, or LimitNOFILE= in a systemd unit)"
        )
    servers = sum(
        (db.pool_size + db.reserve_pool_size) * len(cluster.nodes)
        for db in config.databases.values()
        if (cluster := config.clusters.get(db.cluster)) is not None
    )
    need = config.limits.max_client_conn + servers + _FD_OVERHEAD
    if limit != resource.RLIM_INFINITY and limit < need:
        log.warning(
            "open files: limit %d%s, below the %d that limits.max_client_conn (%d) and one user's pools "
            "(%d server connections) may need: clients beyond it wait to be accepted; raise the hard "
            "limit (ulimit -Hn, LimitNOFILE= in a systemd unit) or lower max_client_conn",
            limit,
            raised,
            need,
            config.limits.max_client_conn,
            servers,
        )
    else:
        log.info("open files: limit %d%s", limit, raised)


def run_app(config: Config, plugins: Plugins, **kwargs: Any) -> None:
    """Run the proxy in the foreground on anyio (asyncio backend, uvloop when installed)."""
    import anyio

    from halephant.proxy.app import App

    _raise_fd_limit(config)
    app = App(config, plugins)
    _tune_gc()
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    anyio.run(lambda: app.serve(**kwargs), backend="asyncio", backend_options=options)


@click.group()
@click.version_option(__version__, prog_name="halephant")
def main() -> None:
    """halephant: a PostgreSQL connection pooler and proxy."""


@main.command()
@click.option(
    "-c", "--config", "path", default="halephant.yaml", show_default=True, type=click.Path(dir_okay=False)
)
def run(path: str) -> None:
    """Run the proxy in the foreground."""
    # SIGHUP's default action ends the process: until the proxy's own handlers are installed (after
    # the imports and the first round of probes, which may wait out topology.timeout), one is noted
    # and the reload done then ("start, then reload" from configuration management must not kill it).
    early_hups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: early_hups.append(signum))
    from halephant.logs import setup_logging

    try:
        config, plugins = load(path)
    except (ConfigError, PluginError) as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    setup_logging(config.logging.level, config.logging.format)
    try:
        run_app(config, plugins, early_hups=early_hups)
    except (UnixSocketError, FdLimitTooLow) as exc:
        click.echo(f"halephant: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"halephant: cannot listen on {config.listen}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@main.command()
@click.option(
    "-c", "--config", "path", default="halephant.yaml", show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--against",
    "against",
    default=None,
    type=click.Path(dir_okay=False),
    help="the config in use, a file or a running halephant's admin URL (http://127.0.0.1:6433): print "
    "what a reload from it to -c would change (a dry run)",
)
def check(path: str, against: str | None) -> None:
    """Validate a config file without starting: exit 0, or print every error as FILE:LINE:COL.

    With --against OLD, also print the changes a reload from OLD would apply, one per line
    (`+` added, `-` removed, `~` changed; secrets are never shown), marking those that need a restart.
    """
    config = _checked(path)
    click.echo(
        f"{path}: ok ({len(config.databases)} database(s), {len(config.users)} user(s), "
        f"{len(config.clusters)} cluster(s))"
    )
    if against is None:
        return
    from halephant.config.diff import diff_configs, diff_trees

    if against.startswith(("http://", "https://")):
        from halephant.admin.snapshot import redacted_config

        # the running halephant hands out its config with secrets redacted: redact ours the same way
        changes = diff_trees(_running_config(against), redacted_config(config))
    else:
        changes = diff_configs(_checked(against), config)
    if not changes:
        click.echo(f"no changes from {against}")
        return
    restart = sum(c.restart for c in changes)
    click.echo(f"a reload from {against} would apply {len(changes) - restart} change(s):")
    for change in changes:
        click.echo(f"  {change}")
    if restart:
        click.echo(f"{restart} change(s) need a restart")


def _running_config(url: str) -> dict[str, Any]:
    import json
    import urllib.request

    target = url.rstrip("/") + "/config"
    try:
        with urllib.request.urlopen(target, timeout=10) as response:
            tree: dict[str, Any] = json.loads(response.read())
            return tree
    except (OSError, ValueError) as exc:
        click.echo(f"halephant: cannot read {target}: {getattr(exc, 'reason', None) or exc}", err=True)
        sys.exit(1)


def _checked(path: str) -> Config:
    try:
        config, _plugins = load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo(f"{len(exc.problems)} error(s) in {path}", err=True)
        sys.exit(1)
    except PluginError as exc:
        click.echo(f"{path}: plugins: {exc}", err=True)
        sys.exit(1)
    return config


@main.command("import-pgbouncer")
@click.argument("ini", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="write halephant.yaml here [default: standard output]",
)
@click.option(
    "--auth-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="read the users from this userlist.txt instead of the auth_file pgbouncer.ini names",
)
def import_pgbouncer(ini: str, output: str | None, auth_file: str | None) -> None:
    """Convert a PgBouncer configuration (pgbouncer.ini and its auth_file) into halephant.yaml.

    Every PgBouncer setting not carried over, or that means something different here, is listed in
    the file's header (and on standard error); a file that cannot be read or parsed is reported as
    FILE:LINE: message (exit 1). The result is checked as `halephant check` would: what would stop
    it from loading on this machine (a TLS file or socket group missing here) is reported too (exit 1).
    """
    from halephant.config import read_config_text
    from halephant.config.pgbouncer_import import ImportProblem, import_files

    try:
        converted = import_files(ini, auth_file)
    except ImportProblem as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for note in converted.notes:
        click.echo(f"note: {note}", err=True)
    target = output or "<stdout>"
    problems: list[str] = []
    try:
        # as `halephant check` loads it: the plugins' sections (hba) are theirs to check
        load_raw(read_config_text(converted.yaml, target))
    except ConfigError as exc:
        problems = [str(problem) for problem in exc.problems]
    except PluginError as exc:
        problems = [f"{target}: plugins: {exc}"]
    if output is None:
        click.echo(converted.yaml, nl=False)
    else:
        try:
            Path(output).write_text(converted.yaml)
        except OSError as exc:
            click.echo(f"{output}: cannot write it: {exc.strerror or exc}", err=True)
            sys.exit(1)
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        click.echo(
            f"{len(problems)} error(s) in the converted configuration: edit it, then halephant check",
            err=True,
        )
        sys.exit(1)


@main.command()
@click.option(
    "-c",
    "--config",
    "path",
    default=None,
    type=click.Path(dir_okay=False),
    help="apply this config's plugins.disable list",
)
def plugins(path: str | None) -> None:
    """List the loaded plugins: name, distribution, version and the hooks each implements."""
    from rich.console import Console
    from rich.table import Table

    disabled: list[str] = []
    modules: list[str] = []
    if path is not None:
        try:
            raw = read_config(path)
        except ConfigError as exc:
            click.echo(str(exc), err=True)
            sys.exit(1)
        disabled, modules = raw.disabled_plugins, raw.plugin_modules
    try:
        loaded = Plugins(disabled=disabled, modules=modules)
    except PluginError as exc:
        click.echo(f"halephant: {exc}", err=True)
        sys.exit(1)
    table = Table(title="halephant plugins", title_justify="left")
    for column in ("name", "distribution", "version", "hooks"):
        table.add_column(column, overflow="fold")
    for d in loaded.describe():
        table.add_row(d.name, d.distribution, d.version, "\n".join(d.hooks))
    Console().print(table)
    if loaded.disabled:
        click.echo("disabled: " + ", ".join(loaded.disabled))


@main.command()
@click.option("--url", default=None, help="admin API of the halephant to watch [default: from -c, else "
              "http://127.0.0.1:6433]")  # fmt: skip
@click.option(
    "-c",
    "--config",
    "path",
    default=None,
    type=click.Path(dir_okay=False),
    help="read admin.listen and the plugins (status panels) from this config",
)
@click.option(
    "--once", is_flag=True, help="print one snapshot and exit (what it does when its output is no terminal)"
)
@click.option("--json", "as_json", is_flag=True, help="print the raw snapshot as JSON and exit")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="seconds between refreshes",
)
def status(url: str | None, path: str | None, once: bool, as_json: bool, interval: float) -> None:
    """Watch a running halephant: pools, nodes, clients, queues, decisions, errors (q quits)."""
    from rich.console import Console

    from halephant import status as view

    loaded: Plugins | None = None
    if path is not None:
        try:
            config, loaded = load(path)
        except (ConfigError, PluginError) as exc:
            click.echo(str(exc), err=True)
            sys.exit(2)
        listen = config.admin.listen
        if url is None and listen is not None:
            host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host
            url = f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"
    if loaded is None and not as_json:
        try:
            loaded = Plugins()
        except PluginError as exc:
            click.echo(f"halephant: {exc}", err=True)
            sys.exit(1)
    url = url or view.DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    panels = loaded.status_panels if loaded is not None else None
    console = Console()
    if once or as_json or not console.is_terminal:  # a live view into a pipe or a file shows nothing
        sys.exit(view.print_once(url, console, panels, as_json))
    sys.exit(view.watch(url, console, panels, interval))


@main.command()
@click.option("--port", type=int, default=None, help="port for halephant (default: 6432 when free)")
@click.option(
    "--dir",
    "base_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="where to put the throwaway cluster (default: a new temporary directory)",
)
def demo(port: int | None, base_dir: str | None) -> None:
    """Start a throwaway PostgreSQL primary + streaming replica and halephant in front of them."""
    from halephant.demo import run_demo

    sys.exit(run_demo(port=port, base_dir=Path(base_dir) if base_dir else None))
