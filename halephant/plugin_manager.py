"""Builds the pluggy PluginManager and gives the core a typed call per hook.

Order: add the specs, block the plugins named in ``plugins.disable`` (and ``HALEPHANT_DISABLE_PLUGINS``),
load the ``halephant`` entry-point group (halephant's own defaults come in that way too: the core has no
private registration path), then ``check_pending`` so a misspelt hook fails at start-up, and so does a
hook function someone forgot to mark.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from halephant import IGNORES_PLAIN, PROJECT, hooks, sqlstate
from halephant.errors import ClientError
from halephant.types import (
    AuthMethod,
    Cert,
    ClientInfo,
    ClusterView,
    LookUp,
    Md5,
    Peer,
    PoolInfo,
    PoolSize,
    PoolTarget,
    Reject,
    Route,
    ScramSha256,
    Statement,
    StatusPanel,
    TransactionInfo,
    Trust,
    Verdict,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from halephant.config import Config

REQUIRED_HOOKS = ("halephant_select_pool", "halephant_authenticate", "halephant_route", "halephant_pool_size")


def _fast_call(
    caller: pluggy.HookCaller, keep: Callable[[pluggy.HookImpl], bool] | None = None
) -> Callable[..., Any]:
    """The hook as a function of its arguments in the hookspec's order (positional): with plain
    implementations (no wrappers, no tracing), direct calls of them; otherwise pluggy's call.

    pluggy's dispatch costs about 1.5 µs per call, and these hooks run per transaction and per statement.
    Calling the implementations directly, each with the arguments it names (pluggy's pruning), in
    pluggy's order (last registered first, tryfirst/trylast respected) and, for a first-result hook,
    stopping at the first non-None answer, gives the same answers. A single implementation that takes
    every argument in order is used as it is; otherwise the calls are written out as one small function
    (measured: a loop over the implementations costs 2-4x the straight-line code for three of them).
    Rebound whenever plugins are registered. With `keep`, only the implementations it keeps are called
    (with none kept, the function answers None).
    """
    impls = caller.get_hookimpls()
    if keep is not None:
        every = impls
        impls = [impl for impl in impls if keep(impl)]
        if not impls:
            return lambda *args: None
        if len(impls) < len(every) and any(impl.hookwrapper or impl.wrapper for impl in every):
            impls = every  # a wrapper must see every call: keep pluggy's own dispatch
    spec = caller.spec
    names = tuple(spec.argnames) if spec is not None else ()
    if (
        spec is None
        or not impls
        or any(impl.hookwrapper or impl.wrapper for impl in impls)
        or os.environ.get("HALEPHANT_TRACE_HOOKS")
        or (len(impls) > 1 and not spec.opts.get("firstresult"))
        or not all(name.isidentifier() for name in names)
    ):
        return lambda *args: caller(**dict(zip(names, args, strict=True)))
    ordered = list(reversed(impls))
    if len(ordered) == 1 and tuple(ordered[0].argnames) == names:
        return ordered[0].function  # takes every argument: nothing to prune
    # pluggy has checked that every implementation's argument names are names of the hookspec
    lines = [f"def direct_call({', '.join(names)}):"]
    namespace: dict[str, Any] = {}
    for n, impl in enumerate(ordered):
        namespace[f"_impl{n}"] = impl.function
        call = f"_impl{n}({', '.join(impl.argnames)})"
        if n == len(ordered) - 1:
            lines.append(f"    return {call}")
        else:
            lines += [f"    answer = {call}", "    if answer is not None:", "        return answer"]
    exec("\n".join(lines), namespace)  # the text is built from the identifiers above only
    function: Callable[..., Any] = namespace["direct_call"]
    return function


def _sees_plain(impl: pluggy.HookImpl) -> bool:
    """The implementation wants plain statements too (it is not marked `ignores_plain_statements`)."""
    return not getattr(impl.function, IGNORES_PLAIN, False)


def _size_problem(size: PoolSize) -> str | None:
    """What is wrong with a `halephant_pool_size` answer (the checks the config makes of pool_size,
    min_pool_size and reserve_pool_size), or None."""
    if not all(type(n) is int for n in (size.min, size.max, size.reserve)):
        return "min, max and reserve must be whole numbers"
    if size.max < 1:
        return "max must be 1 or more"
    if not 0 <= size.min <= size.max:
        return "min must be from 0 to max"
    if size.reserve < 0:
        return "reserve cannot be negative"
    after = size.recheck_after
    if after is not None and (type(after) not in (int, float) or not 0 < after < math.inf):
        return "recheck_after must be a number of seconds more than 0, or None"
    return None


class PluginError(Exception):
    """A plugin could not be loaded, or a required decision has no implementation."""


@dataclass(frozen=True)
class PluginDescription:
    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


def _bad_answer(hook: str, answer: object) -> ClientError:
    return ClientError(sqlstate.INTERNAL_ERROR, f"plugin answer of unexpected type from {hook}: {answer!r}")


class Plugins:
    """The loaded plugins, with one typed method per decision hook."""

    def __init__(
        self,
        *,
        disabled: Iterable[str] = (),
        entry_points: bool = True,
        extra: Iterable[tuple[ModuleType | object, str]] = (),
        modules: Iterable[str] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hooks)
        configured_disabled = list(disabled)
        modules = list(modules)
        env = os.environ.get("HALEPHANT_DISABLE_PLUGINS", "")
        env_disabled = [n.strip() for n in env.split(",") if n.strip()]
        self.disabled = sorted({*configured_disabled, *env_disabled})
        for name in self.disabled:
            self.pm.set_blocked(name)
        for plugin, name in extra:
            self.pm.register(plugin, name=name)
        for module_name in modules:
            if self.pm.is_blocked(module_name):
                continue
            try:
                self.pm.register(importlib.import_module(module_name), name=module_name)
            except Exception as exc:
                raise PluginError(f"could not load plugin module {module_name!r}: {exc!r}") from exc
        if entry_points:
            try:
                self.pm.load_setuptools_entrypoints(PROJECT)
            except Exception as exc:
                raise PluginError(f"could not load {self._failed_entry_point()}: {exc!r}") from exc
        #: names under plugins.disable that no installed plugin has (a typo, or a plugin uninstalled),
        #: and those in HALEPHANT_DISABLE_PLUGINS
        self.unknown_disabled: list[str] = []
        self.unknown_disabled_env: list[str] = []
        if entry_points:
            known = {ep.name for ep in importlib.metadata.entry_points(group=PROJECT)} | set(modules)
            self.unknown_disabled = [name for name in configured_disabled if name not in known]
            self.unknown_disabled_env = [name for name in env_disabled if name not in known]
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc
        self._check_unmarked()
        missing = [h for h in REQUIRED_HOOKS if not getattr(self.pm.hook, h).get_hookimpls()]
        if missing:
            raise PluginError(f"no plugin implements {', '.join(missing)} (is a default plugin disabled?)")
        self._bind_hooks()
        if os.environ.get("HALEPHANT_TRACE_HOOKS") == "1":
            self.pm.trace.root.setwriter(print)
            self.pm.enable_tracing()

    def _check_unmarked(self) -> None:
        """Refuse a plugin with a function named as a hook but not marked `@halephant.hookimpl`: pluggy
        passes over it without a word, and a policy that is never called fails open (a user it was
        written to deny gets in)."""
        hooks = [name for name in dir(self.pm.hook) if name.startswith(f"{PROJECT}_")]
        for name, plugin in self.pm.list_name_plugin():
            unmarked = [
                hook
                for hook in hooks
                if callable(getattr(plugin, hook, None))
                and not hasattr(getattr(plugin, hook), f"{PROJECT}_impl")
            ]
            if unmarked:
                raise PluginError(
                    f"plugin {name!r}: {', '.join(unmarked)} is not marked @halephant.hookimpl, so it would "
                    "never be called: mark it, or rename it"
                )

    def _failed_entry_point(self) -> str:
        """The entry point `load_setuptools_entrypoints` stopped at, for the operator: the first of the
        group (in the order pluggy loads them) neither registered nor blocked."""
        for ep in importlib.metadata.entry_points(group=PROJECT):
            if self.pm.get_plugin(ep.name) is None and not self.pm.is_blocked(ep.name):
                dist = f" of {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
                return (
                    f"plugin {ep.name!r} (entry point {ep.value!r}{dist}; to start without it, "
                    f"name it under plugins.disable)"
                )
        return "a plugin"

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)
        self._bind_hooks()

    def _bind_hooks(self) -> None:
        hook = self.pm.hook
        self._select_pool = hook.halephant_select_pool
        self._authenticate = hook.halephant_authenticate
        self._pool_size = hook.halephant_pool_size
        # called per transaction and per statement: bound to the direct call when only one plugin answers
        #: halephant_route's implementations, called directly (positional, in the hookspec's order): the
        #: per-transaction path calls this and checks the answer with `route_answer` unless it is a Route
        self.route_call = _fast_call(hook.halephant_route)
        self._inspect = _fast_call(hook.halephant_inspect_query)
        # for plain statements (Statement.plain), the inspectors that did not say they ignore them
        self._inspect_plain = _fast_call(hook.halephant_inspect_query, keep=_sees_plain)
        inspectors = hook.halephant_inspect_query.get_hookimpls()
        #: checked once: the per-statement hook is skipped entirely when nobody implements it
        self.has_inspectors = bool(inspectors)
        #: ...and for a plain statement when every implementation ignores those
        self.has_plain_inspectors = any(_sees_plain(impl) for impl in inspectors)
        #: every hook implementation's code, to name the plugin an exception came from (`culprit`)
        self._impl_codes = {
            impl.function.__code__: (impl.plugin_name, name)
            for name in dir(hook)
            if name.startswith("halephant_")
            for impl in getattr(hook, name).get_hookimpls()
            if hasattr(impl.function, "__code__")
        }

    def culprit(self, exc: BaseException) -> tuple[str, str] | None:
        """(plugin name, hook) of the hook implementation `exc` was raised in or through (the one
        nearest to where it was raised), or None when no plugin is on its traceback."""
        found = None
        tb = exc.__traceback__
        while tb is not None:
            found = self._impl_codes.get(tb.tb_frame.f_code, found)
            tb = tb.tb_next
        return found

    # --- configuration ---

    def settings_models(self) -> dict[str, type[BaseModel]]:
        from pydantic import BaseModel

        out: dict[str, type[BaseModel]] = {}
        owners: dict[str, str] = {}
        # each implementation called by itself (in pluggy's order), to name the plugin a problem is in
        for impl in reversed(self.pm.hook.halephant_plugin_settings.get_hookimpls()):
            try:
                answer = impl.function()
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} raised in halephant_plugin_settings: {exc!r}"
                ) from exc
            if answer is None:
                continue
            if not (
                isinstance(answer, tuple)
                and len(answer) == 2
                and isinstance(answer[0], str)
                and isinstance(answer[1], type)
                and issubclass(answer[1], BaseModel)
            ):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} answered {answer!r} to halephant_plugin_settings: "
                    "expected (section name, pydantic model)"
                )
            owner = owners.setdefault(answer[0], impl.plugin_name)
            if owner != impl.plugin_name:
                # one section, one model: the other plugin would be handed settings it cannot read
                raise PluginError(
                    f"plugins {owner!r} and {impl.plugin_name!r} both declare the settings section "
                    f"plugins.{answer[0]}: each plugin needs a section of its own"
                )
            out[answer[0]] = answer[1]
        return out

    def configure(self, config: Config) -> None:
        """Every plugin hears the configuration in force (at start-up and after each reload)."""
        try:
            self.pm.hook.halephant_configure(config=config)
        except Exception as exc:
            culprit = self.culprit(exc)
            where = (
                "halephant_configure" if culprit is None else f"plugin {culprit[0]!r} in halephant_configure"
            )
            raise PluginError(f"{where} refused the configuration: {exc!r}") from exc

    # --- decisions (fail closed) ---

    def select_pool(self, client: ClientInfo, config: Config) -> PoolTarget | Reject:
        answer = self._select_pool(client=client, config=config)
        if isinstance(answer, Reject):
            return answer
        if isinstance(answer, PoolTarget):
            # what the core would otherwise find out later, and tell as something else (a KeyError, or
            # "database removed from the configuration")
            if config.database_for(answer.entry_name) is None:
                raise ClientError(
                    sqlstate.INTERNAL_ERROR,
                    f"halephant_select_pool chose database {answer.database!r}, which no databases: entry "
                    f"serves: its PoolTarget.entry must name the entry whose settings its pools follow",
                )
            if answer.cluster not in config.clusters:
                raise ClientError(
                    sqlstate.INTERNAL_ERROR,
                    f"halephant_select_pool chose cluster {answer.cluster!r}, which is not under clusters:",
                )
            return answer
        if answer is None:
            return Reject(
                sqlstate.INVALID_CATALOG_NAME,
                f'database "{client.database}" does not exist',
                reason="no plugin selected a pool",
            )
        raise _bad_answer("halephant_select_pool", answer)

    def authenticate(
        self, client: ClientInfo, pool: PoolTarget | None, config: Config
    ) -> AuthMethod | Reject:
        answer = self._authenticate(client=client, pool=pool, config=config)
        if isinstance(answer, ScramSha256 | Md5 | Trust | LookUp | Cert | Peer | Reject):
            return answer
        if answer is None:
            # fail closed: nobody vouched for this client, so it cannot get in
            return ScramSha256(None, reason="no plugin authenticates this user")
        raise _bad_answer("halephant_authenticate", answer)

    def route(
        self, client: ClientInfo, transaction: TransactionInfo, pool: PoolInfo, cluster: ClusterView
    ) -> Route | Reject:
        answer = self.route_call(client, transaction, pool, cluster)
        if type(answer) is Route:
            return answer  # per transaction: the exact type first
        return self.route_answer(answer)

    def route_answer(self, answer: object) -> Route | Reject:
        """`halephant_route`'s answer checked: a Route or Reject as it is, None refused (57P03)."""
        if isinstance(answer, Route | Reject):
            return answer
        if answer is None:
            return Reject(
                sqlstate.CANNOT_CONNECT_NOW,
                "no route for this transaction",
                reason="no plugin routed the transaction",
            )
        raise _bad_answer("halephant_route", answer)

    def pool_size(self, pool: PoolTarget, config: Config) -> PoolSize:
        answer = self._pool_size(pool=pool, config=config)
        if isinstance(answer, PoolSize):
            problem = _size_problem(answer)
            if problem is None:
                return answer
            # the pool would never serve (max 0), or open min and close down to max at every sweep
            raise PluginError(
                f"halephant_pool_size answered {answer!r} for pool {pool.database}/{pool.server_user}: "
                f"{problem}"
            )
        raise PluginError(f"no plugin sized pool {pool.database}/{pool.server_user}: {answer!r}")

    def status_panels(self, snapshot: dict[str, Any]) -> list[tuple[str, StatusPanel | Exception]]:
        """Every plugin's `halephant_extend_status` panels, with the plugin's name; an exception is kept
        in place of the panels of the plugin that raised it (the status view shows it and goes on)."""
        out: list[tuple[str, StatusPanel | Exception]] = []
        for impl in self.pm.hook.halephant_extend_status.get_hookimpls():  # registration order
            try:
                answer = impl.function(*[{"snapshot": snapshot}[name] for name in impl.argnames])
            except Exception as exc:
                out.append((impl.plugin_name, exc))
                continue
            panels = answer if isinstance(answer, list | tuple) else [answer]
            for panel in panels:
                if isinstance(panel, StatusPanel):
                    out.append((impl.plugin_name, panel))
                elif panel is not None:
                    out.append((impl.plugin_name, TypeError(f"not a StatusPanel: {panel!r}")))
        return out

    def inspect_query(self, client: ClientInfo, statement: Statement, pool: PoolInfo) -> Verdict | None:
        inspect = self._inspect_plain if statement.plain else self._inspect
        answer: Any = inspect(client, statement, pool)
        if answer is None or isinstance(answer, Verdict):  # nearly always None: one comparison
            return answer
        raise _bad_answer("halephant_inspect_query", answer)  # taken for "no objection", it would fail open

    # --- description ---

    def describe(self) -> list[PluginDescription]:
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist = dists.get(id(plugin))
            hooknames = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            out.append(
                PluginDescription(
                    name=name,
                    distribution=dist.project_name if dist is not None else "-",
                    version=dist.version if dist is not None else "-",
                    hooks=hooknames,
                )
            )
        return sorted(out, key=lambda d: d.name)
