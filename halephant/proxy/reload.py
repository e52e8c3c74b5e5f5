"""Reloading the configuration of a running halephant (SIGHUP, or the console's RELOAD).

The file is read and validated exactly as at start-up, with the settings models of the plugins already
loaded. On any error nothing changes: every problem is logged as `file:line:col: path: message` and
returned. Otherwise the new configuration replaces the old one and is applied live (even when the file
has not changed: plugins may read more than the file, so every reload is theirs to hear): plugins hear
`halephant_configure`, the passwords `auth_query` found are asked again, pools are re-sized through
`halephant_pool_size` (or retired when their database or node is gone), timeouts and limits are read
from it from now on, the log level and format change.
All or nothing: if a plugin's hook raises meanwhile, the previous configuration is applied again and the
reload counts as failed.
No client is dropped, except those of a removed database, which get FATAL 57P01 once their transaction
is over (or at once, if PAUSE held it); a removed database's PAUSE and DISABLE are forgotten with it.
New connections get the `client_tls:` context the new configuration was loaded with (its files are
read again at every reload, so a certificate replaced under the same name is taken too); connections
already encrypted keep theirs.
What only a restart can change (`listen`, `unix_socket_dir`, `unix_socket_mode`, `unix_socket_group`,
`plugins.disable`, `plugins.modules`, `admin.listen`) is logged and keeps its old value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from halephant.auth import lookup
from halephant.config import ConfigError, read_config, validate_config
from halephant.config.diff import Change, diff_configs
from halephant.logs import setup_logging

if TYPE_CHECKING:
    from halephant.config import Config
    from halephant.proxy.app import App

log = logging.getLogger("halephant.reload")


@dataclass
class ReloadResult:
    """What a reload did: `errors` (then nothing was applied), or the changes applied and those that
    need a restart, plus what the pools did about them."""

    errors: list[str] = field(default_factory=list)
    applied: list[Change] = field(default_factory=list)
    needs_restart: list[Change] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _apply(app: App, config: Config, unchanged: bool = False) -> list[str]:
    """Make `config` the running configuration: plugins first, then the pools (their changes returned).
    `unchanged`: the file says what the running configuration says (see `PoolManager.reconfigure`)."""
    app.config = config
    app.config_generation += 1
    app.max_message_size = config.limits.max_message_size
    app.plugins.configure(config)
    lookup.forget()  # answers of auth_query: auth_user or auth_query may have changed
    for client in app.clients.values():
        client.forget_pools()
    app.tcp_options_changed()
    pools = app.manager.reconfigure(config, unchanged=unchanged)
    app.control.forget_removed()
    return pools


def reload_app(app: App) -> ReloadResult:
    old = app.config
    source = old.source
    try:
        raw = read_config(source)
        new = validate_config(raw, app.plugins.settings_models())
    except ConfigError as exc:
        errors = [str(problem) for problem in exc.problems]
        for line in errors:
            log.error("reload failed: %s", line, extra={"event": "reload_failed"})
        log.error("reload failed: %d error(s); still running with the previous configuration", len(errors))
        return ReloadResult(errors=errors)
    except Exception as exc:  # a plugin's settings hook that raises must not stop the proxy
        log.error("reload failed: %r; still running with the previous configuration", exc)
        return ReloadResult(errors=[f"{source}: {exc!r}"])

    changes = diff_configs(old, new)
    result = ReloadResult(
        applied=[c for c in changes if not c.restart], needs_restart=[c for c in changes if c.restart]
    )
    if not changes:
        # applied all the same: plugins hear every reload (one may read more than this file), and pool
        # sizes are asked for again
        log.info("reload: %s unchanged", source)
    if result.needs_restart:
        # keep what cannot change live, so the running state and the config in use agree
        # (model_copy keeps the private attributes: the source and the plugin settings)
        admin = new.admin.model_copy(update={"listen": old.admin.listen})  # the admin API stays bound
        new = new.model_copy(
            update={
                "listen": old.listen,
                "unix_socket_dir": old.unix_socket_dir,
                "unix_socket_mode": old.unix_socket_mode,
                "unix_socket_group": old.unix_socket_group,
                "plugins": old.plugins,
                "admin": admin,
            }
        )
    try:
        result.pools = _apply(app, new, unchanged=not changes)
    except Exception as exc:  # a plugin's hook that raises: all or nothing, never half a configuration
        log.error(
            "reload failed while applying it: %r; still running with the previous configuration",
            exc,
            exc_info=True,
            extra={"event": "reload_failed"},
        )
        try:
            _apply(app, old)
        except Exception:  # the same hook may raise again: a pool is re-sized only once its size is known
            log.exception("re-applying the previous configuration failed; the pools keep their sizes")
        return ReloadResult(errors=[f"{source}: applying it failed: {exc!r}"])
    if new.logging != old.logging:
        setup_logging(new.logging.level, new.logging.format)
        app.debug = logging.getLogger("halephant").isEnabledFor(logging.DEBUG)
    for change in result.applied:
        log.info("reload: applied %s", change, extra={"event": "reload", "path": change.path})
    for change in result.needs_restart:
        log.warning(
            "reload: %s; keeping the running value until a restart",
            change,
            extra={"event": "reload", "path": change.path},
        )
    for line in result.pools:
        log.info("reload: %s", line, extra={"event": "pool_reconfigured"})
    certificate = new.client_tls_certificate
    if certificate is not None and certificate != old.client_tls_certificate:
        # also when the file was replaced under the same name, which the diff cannot see
        log.info(
            "reload: client_tls: certificate %s (SHA-256 %s) for new connections; "
            "connections already encrypted keep theirs",
            new.client_tls.cert_file,
            certificate,
            extra={"event": "reload", "path": "client_tls.cert_file"},
        )
    log.info(
        "reload: done (%d change(s) applied, %d need a restart)",
        len(result.applied),
        len(result.needs_restart),
    )
    return result
