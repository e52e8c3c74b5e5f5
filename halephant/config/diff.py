"""What changes between two configurations: the diff a reload applies, and `halephant check --against`.

The diff works on *trees* (nested dicts of plain values, as `config_tree` makes them from a `Config`)
so that either side can come from somewhere other than a file: a running halephant can hand out its
tree (the admin API's `/config`) and `diff_trees(running_tree, config_tree(new))` is then the dry run of
a reload. Entries added or removed under a mapping are reported once, as a whole; other values are
compared leaf by leaf, lists as a whole.

Secrets (`password`, `server_password`) are never shown: a change says only that the value changed. A
tree from which secrets were already redacted compares them as equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from halephant.config.schema import Config, HostPort

__all__ = ["RESTART_PATHS", "SECRET_KEYS", "Change", "config_tree", "diff_configs", "diff_trees"]

#: settings a running halephant cannot change: a reload reports them and keeps the old value
RESTART_PATHS = (
    "listen",
    "unix_socket_dir",
    "unix_socket_mode",
    "unix_socket_group",
    "plugins.disable",
    "plugins.modules",
    "admin.listen",
)
#: keys whose values never appear in a diff, a log line or an error
SECRET_KEYS = frozenset(("password", "server_password", "probe_password"))
REDACTED = "(secret)"


@dataclass(frozen=True)
class Change:
    """One difference: `path` is dotted (`databases.myapp.pool_size`)."""

    path: str
    kind: Literal["added", "removed", "changed"]
    old: str | None
    new: str | None
    #: True when a reload cannot apply it (a restart is needed)
    restart: bool

    def __str__(self) -> str:
        if self.kind == "added":
            text = f"+ {self.path}: added"
        elif self.kind == "removed":
            text = f"- {self.path}: removed"
        elif self.old == REDACTED and self.new == REDACTED:
            text = f"~ {self.path}: changed (secret, not shown)"
        else:
            text = f"~ {self.path}: {self.old} -> {self.new}"
        return text + (" (needs a restart)" if self.restart else "")


def config_tree(config: Config) -> dict[str, Any]:
    """`config` as nested dicts of plain values, plugin settings under `plugins.<name>`.

    Addresses are written `host:port`; durations are seconds; secrets are kept (diff_trees hides
    them): redact with `redact_tree` before handing a tree out.
    """
    tree = _plain(config)
    assert isinstance(tree, dict)
    for name, settings in sorted(config._plugin_settings.items()):
        tree["plugins"][name] = _plain(settings)
    return tree


def redact_tree(tree: Any) -> Any:
    """A copy of `tree` with every secret replaced by a marker."""
    if isinstance(tree, Mapping):
        return {
            k: (REDACTED if k in SECRET_KEYS and v is not None else redact_tree(v)) for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return tree


def diff_configs(old: Config, new: Config) -> list[Change]:
    return diff_trees(config_tree(old), config_tree(new))


def diff_trees(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    out: list[Change] = []
    _diff(old, new, (), out)
    return out


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], path: tuple[str, ...], out: list[Change]) -> None:
    for key in [*old, *(k for k in new if k not in old)]:
        here = (*path, str(key))
        dotted = ".".join(here)
        restart = any(dotted == p or dotted.startswith(p + ".") for p in RESTART_PATHS)
        if key not in new:
            out.append(Change(dotted, "removed", _show(key, old[key]), None, restart))
        elif key not in old:
            out.append(Change(dotted, "added", None, _show(key, new[key]), restart))
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            _diff(old[key], new[key], here, out)
        elif old[key] != new[key]:
            out.append(Change(dotted, "changed", _show(key, old[key]), _show(key, new[key]), restart))


def _show(key: object, value: Any) -> str:
    if key in SECRET_KEYS and value is not None:
        return REDACTED
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, HostPort):
        return str(value)
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
