"""Reading `halephant.yaml` and turning every problem in it into `file:line:col: dotted.path: message`.

Loading happens in two steps so the plugin manager can sit in between: `read_config` parses the YAML
(ruamel.yaml round-trip mode, so every node keeps its line and column) and gives a `RawConfig`, whose
`disabled_plugins` says which entry points not to load; `validate_config` then validates the document
and each loaded plugin's `plugins.<name>` section against the pydantic model that plugin declared.

Validation never stops at the first problem: pydantic collects every field error, the cross-section
checks below run on the plain data whether or not pydantic succeeded, each cluster's TLS context is made
(its certificate files loaded: `_build_server_tls`), and everything is raised together as one
`ConfigError`. Positions come from mapping a pydantic `loc` back onto the ruamel node tree.
Passwords never appear in a message: checks about them name the field, not its value.
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.tokens import (
    BlockEndToken,
    BlockMappingStartToken,
    BlockSequenceStartToken,
    FlowMappingEndToken,
    FlowMappingStartToken,
    FlowSequenceEndToken,
    FlowSequenceStartToken,
)

from halephant.config.client_tls import ClientTls, load_client_tls
from halephant.config.schema import (
    CATCH_ALL,
    TLS_VERIFIED,
    ClientTlsConfig,
    ClientTlsMode,
    Config,
    HostPort,
    ServerTlsConfig,
    is_md5_hash,
    is_scram_verifier,
    parse_scram_verifier,
)
from halephant.errors import ConfigError, ConfigProblem
from halephant.server_tls import ServerTls
from halephant.tls_files import TlsFileProblem
from halephant.unix_socket import is_socket_dir, too_long

__all__ = ["RawConfig", "load_config", "read_config", "read_config_text", "validate_config"]

Loc = tuple[int | str, ...]

# Standard YAML tags that only restate what the plain scalar already is (`!!str 5432`).
_STANDARD_TAG = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class RawConfig:
    """A parsed but not yet validated config file: the ruamel node tree and the name used in messages."""

    data: CommentedMap
    source: str

    @property
    def disabled_plugins(self) -> list[str]:
        """Names under `plugins.disable`, best effort: [] when that part of the file is malformed."""
        return self._plugin_names("disable")

    @property
    def plugin_modules(self) -> list[str]:
        """Module names under `plugins.modules`, best effort: [] when that part of the file is malformed."""
        return self._plugin_names("modules")

    def _plugin_names(self, key: str) -> list[str]:
        # read before validation (the plugin manager needs them to know what to validate against)
        plugins = self.data.get("plugins")
        if not isinstance(plugins, Mapping):
            return []
        names = plugins.get(key)
        if not isinstance(names, list):
            return []
        return [str(name) for name in names if isinstance(name, str)]


#: database names clients use to reach the admin console (halephant.admin.console), never a pool
_ADMIN_DATABASES = frozenset(("halephant", "pgbouncer"))

#: keys of `plugins:` that belong to the core, not to one plugin
_CORE_PLUGIN_KEYS = frozenset(("disable", "modules"))


def read_config(path: str | os.PathLike[str]) -> RawConfig:
    """Parse the YAML file at `path`; raises ConfigError for an unreadable file or a YAML syntax error."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(source, 1, 1, "", f"cannot read the file: {exc.strerror}")]
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([ConfigProblem(source, line, col, "", "the file is not valid UTF-8")]) from None
    return read_config_text(text, source)


def read_config_text(text: str, source: str) -> RawConfig:
    """Parse YAML `text`; `source` names it in messages. Raises ConfigError on a syntax error."""
    yaml = YAML(typ="rt")  # a fresh loader each time: YAML instances keep per-load state
    try:
        data = yaml.load(text)
    except DuplicateKeyError as exc:
        # every duplicate at once, each with its dotted path (ruamel stops at the first)
        raise ConfigError(_duplicate_keys(text, source) or [_syntax_problem(exc, source)]) from None
    except MarkedYAMLError as exc:
        raise ConfigError([_syntax_problem(exc, source)]) from None
    except YAMLError as exc:
        raise ConfigError([ConfigProblem(source, 1, 1, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:  # ruamel builds nested collections recursively
        raise ConfigError([_too_deep(text, source)]) from None
    if data is None:  # an empty file, or only comments
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        line, col = (data.lc.line + 1, data.lc.col + 1) if isinstance(data, CommentedSeq) else (1, 1)
        message = "the file must be a mapping of settings (listen:, clusters:, databases:, users:, ...)"
        raise ConfigError([ConfigProblem(source, line, col, "", message)])
    too_many = _too_many_values(data, source)
    if too_many is not None:
        raise ConfigError([too_many])
    return RawConfig(data, source)


#: Nesting a configuration never needs; found by the scanner, which (unlike the parser) is not recursive.
_MAX_DEPTH = 100

_OPEN_TOKENS = (
    BlockMappingStartToken,
    BlockSequenceStartToken,
    FlowMappingStartToken,
    FlowSequenceStartToken,
)
_CLOSE_TOKENS = (BlockEndToken, FlowMappingEndToken, FlowSequenceEndToken)


def _too_deep(text: str, source: str) -> ConfigProblem:
    """Where `text` nests deeper than `_MAX_DEPTH` (the top of the file if the scanner says otherwise)."""
    message = f"nested more than {_MAX_DEPTH} levels deep: not a halephant configuration"
    depth = 0
    try:
        for token in YAML(typ="rt").scan(text):
            if isinstance(token, _OPEN_TOKENS):
                depth += 1
                if depth > _MAX_DEPTH:
                    mark = token.start_mark
                    return ConfigProblem(source, mark.line + 1, mark.column + 1, "", message)
            elif isinstance(token, _CLOSE_TOKENS):
                depth -= 1
    except YAMLError:
        pass
    return ConfigProblem(source, 1, 1, "", message)


#: Values a document may stand for once its aliases (`*name`) are expanded. A configuration has
#: thousands; a few lines of aliases of aliases can stand for billions, which validation would walk
#: one by one (`halephant check` hanging, or a reload holding up every client).
_MAX_VALUES = 1_000_000


def _too_many_values(data: CommentedMap, source: str) -> ConfigProblem | None:
    """A problem when `data` expands to more than `_MAX_VALUES` values, located at the innermost
    collection that does on its own; counted without expanding (each collection once)."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, CommentedMap | CommentedSeq):
            return 1
        known = sizes.get(id(node))
        if known is None:
            sizes[id(node)] = 1  # a collection that contains itself counts once
            children = node.values() if isinstance(node, CommentedMap) else node
            known = sizes[id(node)] = 1 + sum(size(child) for child in children)
        return known

    if size(data) <= _MAX_VALUES:
        return None
    loc: list[Any] = []
    node: Any = data
    seen = {id(data)}
    while True:
        items = node.items() if isinstance(node, CommentedMap) else enumerate(node)
        big = [(key, child) for key, child in items if size(child) > _MAX_VALUES and id(child) not in seen]
        if not big:
            break
        key, node = big[0]
        loc.append(key)
        seen.add(id(node))
    message = (
        f"expands to more than {_MAX_VALUES:,} values through YAML aliases (*name): "
        "not a halephant configuration"
    )
    return _Locator(data, source).problem(tuple(loc), message)


def _syntax_problem(exc: MarkedYAMLError, source: str) -> ConfigProblem:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = str(exc.problem or exc.context or "invalid YAML")
    if isinstance(exc, DuplicateKeyError):
        # ruamel's text goes on with both values, and the value may be a password.
        return ConfigProblem(source, line, col, "", problem.split(" with value ", 1)[0])
    if exc.problem and exc.context and exc.context_mark is not None:
        problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return ConfigProblem(source, line, col, "", problem)


def _duplicate_keys(text: str, source: str) -> list[ConfigProblem]:
    """Every key written twice in one mapping of `text` (which parses, but for those), located at the
    second one. Found on the node tree, before keys are constructed (which is where ruamel stops)."""
    problems: list[ConfigProblem] = []
    visited: set[int] = set()  # an alias may repeat a node, or contain itself

    def walk(node: Node | None, loc: Loc) -> None:
        if node is None or id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, MappingNode):
            first: dict[tuple[str | None, str], int] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, ScalarNode) else "?"
                if isinstance(key, ScalarNode) and name != "<<":  # merge keys may repeat
                    mark = key.start_mark
                    seen = first.get((key.tag, name))
                    if seen is None:
                        first[(key.tag, name)] = mark.line + 1
                    else:
                        path = ".".join(str(part) for part in (*loc, name))
                        message = f"duplicate key {name!r} (first at line {seen}): write each key once"
                        problems.append(ConfigProblem(source, mark.line + 1, mark.column + 1, path, message))
                walk(value, (*loc, name))
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*loc, i))

    try:
        walk(YAML(typ="rt").compose(text), ())
    except YAMLError:
        return []
    return problems


def plugin_problem(raw: RawConfig, error: Exception) -> ConfigError:
    """A plugin that could not be loaded, or refused the configuration, as a config error located where
    the file names it: the `plugins.modules` entry of a module that failed to load, `plugins.disable`
    when a required decision has no plugin left, else `plugins` (or the top of the file)."""
    message = str(error)
    loc: Loc = ("plugins",)
    for key, names in (("modules", raw.plugin_modules), ("disable", raw.disabled_plugins)):
        found = [i for i, name in enumerate(names) if repr(name) in message]
        if found:
            loc = ("plugins", key, found[0])
            break
    else:
        if message.startswith("no plugin implements"):
            loc = ("plugins", "disable")
    return ConfigError([_Locator(raw.data, raw.source).problem(loc, message)])


def validate_config(raw: RawConfig, plugin_settings: Mapping[str, type[BaseModel]] | None = None) -> Config:
    """Validate `raw` into a `Config`, or raise ConfigError listing every problem found.

    `plugin_settings` maps a loaded plugin's name to the pydantic model of its `plugins.<name>` section.
    A plugin with no section gets its model's defaults; sections of disabled plugins are not validated;
    any other section is an error.
    """
    where = _Locator(raw.data, raw.source)
    problems: list[ConfigProblem] = []
    plain = _to_plain(raw.data, (), where, problems)
    assert isinstance(plain, dict)

    # Plugin sections are validated against models the core does not know, so they are taken out
    # before the core schema sees `plugins:`.
    core = dict(plain)
    sections: dict[Any, Any] = {}
    if isinstance(plain.get("plugins"), dict):
        sections = {k: v for k, v in plain["plugins"].items() if k not in _CORE_PLUGIN_KEYS}
        core["plugins"] = {k: v for k, v in plain["plugins"].items() if k in _CORE_PLUGIN_KEYS}

    config: Config | None = None
    try:
        config = Config.model_validate(core)
    except ValidationError as exc:
        problems += where.from_validation(exc, Config)
    problems += _build_server_tls(plain, config, where)
    settings = _validate_plugin_sections(
        sections, raw.disabled_plugins, plugin_settings or {}, where, problems
    )
    problems += _cross_check(plain, where)
    client_tls = _load_client_tls(plain, where, problems)

    if problems or config is None:
        raise ConfigError(list(dict.fromkeys(problems)))
    config._source = raw.source
    config._plugin_settings = settings
    config._client_tls = client_tls
    return config


def load_config(
    path: str | os.PathLike[str], plugin_settings: Mapping[str, type[BaseModel]] | None = None
) -> Config:
    """Read and validate the config file at `path`; raises ConfigError listing every problem."""
    return validate_config(read_config(path), plugin_settings)


def _validate_plugin_sections(
    sections: Mapping[Any, Any],
    disabled: Sequence[str],
    models: Mapping[str, type[BaseModel]],
    where: _Locator,
    problems: list[ConfigProblem],
) -> dict[str, BaseModel]:
    for name in sections:
        if name not in models and name not in disabled:
            known = ", ".join(sorted(models)) or "none"
            problems.append(
                where.problem(
                    ("plugins", name),
                    f"no loaded plugin takes settings under this name; plugins with settings: {known}",
                    at_key=True,
                )
            )
    settings: dict[str, BaseModel] = {}
    for name, model in models.items():
        if name in disabled:
            continue
        section = sections.get(name)
        try:
            settings[name] = model.model_validate({} if section is None else section)
        except ValidationError as exc:
            problems += where.from_validation(exc, model, prefix=("plugins", name))
    return settings


# --- cross-section checks ----------------------------------------------------------------------------


def _cross_check(plain: dict[Any, Any], where: _Locator) -> list[ConfigProblem]:
    """Checks pydantic cannot place: each runs only on the parts that are individually well-formed."""
    problems: list[ConfigProblem] = []
    clusters = plain.get("clusters")
    for name, cluster in _entries(clusters):
        seen: set[str] = set()
        nodes = cluster.get("nodes")
        for i, node in enumerate(nodes if isinstance(nodes, list) else []):
            try:
                address = str(HostPort.parse(node))
            except ValidationError:
                continue
            if address in seen:
                problems.append(where.problem(("clusters", name, "nodes", i), f"{address} is listed twice"))
            seen.add(address)
        probe_user = cluster.get("probe_user")
        users = plain.get("users")
        if (
            isinstance(probe_user, str)
            and cluster.get("probe_password") is None
            and isinstance(users, dict)
            and probe_user not in users
        ):
            problems.append(
                where.problem(
                    ("clusters", name, "probe_user"),
                    f"{probe_user!r} is not under users:, so its password is unknown: set probe_password",
                )
            )

    for name, db in _entries(plain.get("databases")):
        if name in _ADMIN_DATABASES:
            problems.append(
                where.problem(
                    ("databases", name), "this name is the admin console's; pick another", at_key=True
                )
            )
        cluster_name = db.get("cluster")
        if isinstance(clusters, dict) and isinstance(cluster_name, str) and cluster_name not in clusters:
            defined = ", ".join(str(c) for c in clusters) or "none"
            problems.append(
                where.problem(
                    ("databases", name, "cluster"),
                    f"no cluster named {cluster_name!r} (clusters defined: {defined})",
                )
            )
        if name == CATCH_ALL and db.get("database") is not None:
            problems.append(
                where.problem(
                    ("databases", name, "database"),
                    "the '*' entry serves every database under the client's own name: remove database:",
                )
            )
        size, min_size = db.get("pool_size", 20), db.get("min_pool_size", 0)
        if _is_int(size) and _is_int(min_size) and size >= 1 and min_size > size:
            problems.append(
                where.problem(
                    ("databases", name, "min_pool_size"),
                    f"min_pool_size ({min_size}) cannot be larger than pool_size ({size})",
                )
            )

    users = plain.get("users")
    for name, db in _entries(plain.get("databases")):
        problems += _check_auth_user(name, db, users, where)
    for name, user in _entries(users):
        problems += _check_user(name, user, where)
        problems += _check_server_user(name, user, users, where)
    problems += _check_admin_users(plain, where)
    problems += _check_admin_listen(plain, where)
    problems += _check_unix_socket_dir(plain, where)
    problems += _check_client_tls(plain, where)
    return problems


def _check_client_tls(plain: dict[Any, Any], where: _Locator) -> list[ConfigProblem]:
    # what each mode needs: checked before any file is read, so the message names the missing key
    section = plain.get("client_tls")
    if not isinstance(section, dict):
        return []
    mode = section.get("mode", "disable")
    if mode not in get_args(ClientTlsMode):
        return []  # reported by the schema
    problems: list[ConfigProblem] = []
    needed = {
        "cert_file": "the certificate halephant presents to clients (PEM)",
        "key_file": "its private key (PEM)",
    }
    if mode in TLS_VERIFIED:
        needed["ca_file"] = "the certificates that sign the clients' certificates (PEM)"
    if mode != "disable":
        for key, what in needed.items():
            if section.get(key) is None:
                problems.append(where.problem(("client_tls", "mode"), f"{mode} needs {key}: {what}"))
    else:
        for key, other in (("cert_file", "key_file"), ("key_file", "cert_file")):
            if section.get(key) is not None and section.get(other) is None:
                problems.append(where.problem(("client_tls", key), f"{key} needs {other} too"))
    return problems


def _load_client_tls(
    plain: dict[Any, Any], where: _Locator, problems: list[ConfigProblem]
) -> ClientTls | None:
    """Read the files of a well-formed `client_tls:` section and build its context (once per load):
    a file that cannot be used is a problem at its key, found by `halephant check` too."""
    section = plain.get("client_tls", {})
    try:
        validated = ClientTlsConfig.model_validate(section)
    except ValidationError:
        return None  # reported by the schema
    if any(p.path.startswith("client_tls.") for p in problems):
        return None
    try:
        return load_client_tls(validated)
    except TlsFileProblem as exc:
        problems.append(where.problem(("client_tls", exc.key), exc.message))
        return None


def _build_server_tls(plain: dict[Any, Any], config: Config | None, where: _Locator) -> list[ConfigProblem]:
    """Each cluster's SSL context, made now, once for this configuration (kept in `config`, when the file
    is valid): a mode that lacks a file, or a certificate or key that does not load, is a problem
    located at the setting to blame. Clusters whose `tls:` is malformed are reported where it is."""
    problems: list[ConfigProblem] = []
    for name, cluster in _entries(plain.get("clusters")):
        section = cluster.get("tls", {})
        if not isinstance(name, str) or not isinstance(section, dict):
            continue
        try:
            settings = ServerTlsConfig.model_validate(section)
        except ValidationError:
            continue
        try:
            tls = ServerTls.build(name, settings)
        except TlsFileProblem as exc:
            problems.append(where.problem(("clusters", name, "tls", exc.key), exc.message))
            continue
        if config is not None:
            config._server_tls[name] = tls
    return problems


def _check_unix_socket_dir(plain: dict[Any, Any], where: _Locator) -> list[ConfigProblem]:
    # the socket's name takes listen's port: only together do they say how long its path is
    directory = plain.get("unix_socket_dir")
    if not isinstance(directory, str) or not is_socket_dir(directory):
        return []  # off, or reported where it is malformed
    try:
        listen = (
            HostPort.parse(plain["listen"]) if "listen" in plain else Config.model_fields["listen"].default
        )
    except (ValidationError, ValueError, TypeError):
        return []
    # port 0: whichever port the system picks, at most five digits
    why = too_long(directory, listen.port or 65535)
    return [] if why is None else [where.problem(("unix_socket_dir",), why)]


def _check_admin_users(plain: dict[Any, Any], where: _Locator) -> list[ConfigProblem]:
    # console users log in like everyone else, so each must be an entry of `users:`
    admin, users = plain.get("admin"), plain.get("users")
    if not isinstance(admin, dict) or not isinstance(users, dict):
        return []
    problems: list[ConfigProblem] = []
    for key in ("users", "stats_users"):
        names = admin.get(key)
        for i, name in enumerate(names if isinstance(names, list) else []):
            if isinstance(name, str) and name not in users:
                problems.append(where.problem(("admin", key, i), f"no user named {name!r} under users:"))
    return problems


def _check_admin_listen(plain: dict[Any, Any], where: _Locator) -> list[ConfigProblem]:
    # the proxy would take the port first, and the admin API would never be reachable
    admin = plain.get("admin")
    if not isinstance(admin, dict) or "listen" not in admin or admin["listen"] is None:
        return []
    try:
        admin_listen = HostPort.parse(admin["listen"])
        listen = (
            HostPort.parse(plain["listen"]) if "listen" in plain else Config.model_fields["listen"].default
        )
    except (ValidationError, ValueError, TypeError):
        return []  # reported where it is malformed
    if admin_listen != listen:
        return []
    return [
        where.problem(
            ("admin", "listen"), f"{admin_listen} is also listen: the admin API needs a port of its own"
        )
    ]


def _check_auth_user(name: Any, db: dict[Any, Any], users: Any, where: _Locator) -> list[ConfigProblem]:
    # the user halephant logs in as to look others up: it needs something to log in with, at once
    problems: list[ConfigProblem] = []
    query = db.get("auth_query")
    if isinstance(query, str) and "$1" not in query:
        problems.append(
            where.problem(
                ("databases", name, "auth_query"),
                "auth_query must name the user as $1 (sent as a parameter), "
                "like SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
            )
        )
    auth_user = db.get("auth_user")
    if not isinstance(auth_user, str) or not isinstance(users, dict):
        return problems
    at = ("databases", name, "auth_user")
    entry = users.get(auth_user)
    if not isinstance(entry, dict):
        defined = ", ".join(str(u) for u in users) or "none"
        return [*problems, where.problem(at, f"no user named {auth_user!r} under users: ({defined})")]
    role = entry.get("server_user")
    upstream = users.get(role) if isinstance(role, str) else entry
    if not isinstance(upstream, dict):
        return problems  # reported at its server_user
    secret = upstream.get("server_password")
    if secret is None:
        secret = upstream.get("password")
    if not isinstance(secret, str):
        problems.append(
            where.problem(at, f"user {auth_user!r} has no password to log in upstream with: give it one")
        )
    elif is_scram_verifier(secret):
        problems.append(
            where.problem(
                at,
                f"user {auth_user!r} has only a SCRAM verifier, which logs in upstream only after a client "
                f"of its own has: set users.{role if isinstance(role, str) else auth_user}.server_password",
            )
        )
    return problems


def _check_server_user(name: Any, user: dict[Any, Any], users: Any, where: _Locator) -> list[ConfigProblem]:
    target = user.get("server_user")
    if not isinstance(target, str) or not isinstance(users, dict):
        return []
    at = ("users", name, "server_user")
    entry = users.get(target)
    if not isinstance(entry, dict):
        defined = ", ".join(str(u) for u in users if u != name) or "none"
        return [where.problem(at, f"no user named {target!r} (users defined: {defined})")]
    if target == name:
        return [where.problem(at, "a user cannot be its own server_user; leave server_user out")]
    if entry.get("server_user") is not None:
        return [
            where.problem(
                at, f"user {target!r} has a server_user of its own: name the user that logs in upstream"
            )
        ]
    if _is_int(user.get("max_user_connections")):
        # the cap protects the upstream role's connections: an alias's count against its server_user's
        return [
            where.problem(
                ("users", name, "max_user_connections"),
                f"this user logs in upstream as {target!r}, whose cap counts its connections too: "
                f"set max_user_connections under users.{target} instead",
            )
        ]
    return []


def _check_user(name: Any, user: dict[Any, Any], where: _Locator) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    password, server_password = user.get("password"), user.get("server_password")
    auth = user.get("auth", "scram-sha-256")
    at_password = ("users", name, "password")
    if password is None and auth in ("scram-sha-256", "md5"):
        problems.append(
            where.problem(at_password, f"a password is required with auth: {auth} (or use auth: trust)")
        )
    if isinstance(password, str):
        scram, md5 = is_scram_verifier(password), is_md5_hash(password)
        if password == "":
            problems.append(
                where.problem(at_password, "the password is empty; use auth: trust to allow no password")
            )
        if scram:
            try:
                parse_scram_verifier(password)
            except ValueError as exc:
                problems.append(where.problem(at_password, str(exc)))
        if scram and auth == "trust" and server_password is None:
            # pass-through needs a client's SCRAM login, and a trusted client makes none
            problems.append(
                where.problem(
                    at_password,
                    "with auth: trust no client logs in by SCRAM, so this verifier cannot log in upstream: "
                    "set server_password to the plaintext password",
                )
            )
        if scram and auth == "md5":
            problems.append(
                where.problem(
                    at_password,
                    "a SCRAM-SHA-256 verifier cannot check md5 logins: "
                    "use auth: scram-sha-256, or give the plaintext password or its md5 hash",
                )
            )
        if md5 and auth == "scram-sha-256":
            problems.append(
                where.problem(
                    at_password,
                    "an md5 hash cannot check SCRAM-SHA-256 logins: "
                    "use auth: md5, or give the plaintext password or a SCRAM verifier",
                )
            )
    if isinstance(server_password, str) and (
        is_scram_verifier(server_password) or is_md5_hash(server_password)
    ):
        problems.append(
            where.problem(
                ("users", name, "server_password"),
                "server_password must be the plaintext password, not a SCRAM verifier or md5 hash",
            )
        )
    return problems


def _entries(section: Any) -> list[tuple[Any, dict[Any, Any]]]:
    if not isinstance(section, dict):
        return []
    return [(name, entry) for name, entry in section.items() if isinstance(entry, dict)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- ruamel tree -> plain Python ---------------------------------------------------------------------


def _to_plain(node: Any, loc: Loc, where: _Locator, problems: list[ConfigProblem]) -> Any:
    """The document as dicts, lists and built-in scalars, mirroring the ruamel tree key for key.

    ruamel's round-trip types subclass int/str/float; strict pydantic types and `isinstance` checks on
    the plain values then behave the same whatever the YAML spelling (`0x10`, `|` blocks, anchors).
    """
    tag = getattr(getattr(node, "tag", None), "value", None)
    if isinstance(tag, str) and not tag.startswith(_STANDARD_TAG):
        problems.append(where.problem(loc, f"YAML tags such as {tag} are not supported"))
    if isinstance(node, TaggedScalar):
        return str(node.value)
    if isinstance(node, CommentedMap):
        return {_to_plain_key(k): _to_plain(v, (*loc, k), where, problems) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_to_plain(v, (*loc, i), where, problems) for i, v in enumerate(node)]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def _to_plain_key(key: Any) -> Any:
    if isinstance(key, bool):
        return bool(key)
    if isinstance(key, int):
        return int(key)
    if isinstance(key, str):
        return str(key)
    return key


# --- positions ---------------------------------------------------------------------------------------


class _Locator:
    """Maps a pydantic `loc` onto the ruamel node tree to find a 1-based line and column."""

    def __init__(self, root: CommentedMap, source: str) -> None:
        self.root = root
        self.source = source

    def problem(self, loc: Loc, message: str, *, at_key: bool = False) -> ConfigProblem:
        keys, line, col = self._locate(loc, at_key=at_key)
        return ConfigProblem(self.source, line, col, ".".join(_key_text(key) for key in keys), message)

    def _locate(self, loc: Loc, *, at_key: bool = False) -> tuple[tuple[Any, ...], int, int]:
        """`loc` as the file's own keys (`_file_key`), and where it is written. A value is located at
        the value, except collections and empty values, which are located at their key; `at_key` asks
        for the key itself (unknown keys). A loc that leaves the tree (a missing key) stops at the
        deepest node that exists."""
        keys: list[Any] = []
        line, col = 0, 0
        node: Any = self.root
        for i, part in enumerate(loc):
            if isinstance(node, CommentedMap):
                part = _file_key(node, part)
            keys.append(part)
            if isinstance(node, CommentedMap) and _contains(node, part):
                child = node[part]
                if at_key and i == len(loc) - 1:
                    line, col = _lc(node, "key", part, (line, col))
                    break
                on_key = child is None or isinstance(child, CommentedMap | CommentedSeq)
                line, col = _lc(node, "key" if on_key else "value", part, (line, col))
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                child = node[part]
                line, col = _lc(node, "item", part, (line, col))
            else:
                break
            node = child
        keys.extend(loc[len(keys) :])
        return tuple(keys), line + 1, col + 1

    def from_validation(
        self, exc: ValidationError, model: type[BaseModel], prefix: Loc = ()
    ) -> list[ConfigProblem]:
        problems = []
        for error in exc.errors(include_url=False):
            loc: Loc = tuple(error["loc"])
            at_key = error["type"] == "extra_forbidden"
            if loc and loc[-1] == "[key]":  # the key of a dict entry is what failed
                loc, at_key = loc[:-1], True
            message = _message(error, model, loc)
            problems.append(self.problem((*prefix, *loc), message, at_key=at_key))
        return problems


def _file_key(node: CommentedMap, part: Any) -> Any:
    """The key of `node` that a pydantic loc's `part` stands for: pydantic writes a null key as 'None'
    and a boolean one as 0 or 1."""
    same = [k for k in node if k == part or (k is None and part == "None")]
    exact = [k for k in same if type(k) is type(part)]
    return (exact or same or [part])[0]


def _key_text(key: Any) -> str:
    """A key as YAML spells it, in a dotted path."""
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _contains(node: CommentedMap, key: Any) -> bool:
    try:
        return key in node
    except TypeError:
        return False


def _lc(
    node: CommentedMap | CommentedSeq, kind: str, part: Any, fallback: tuple[int, int]
) -> tuple[int, int]:
    try:
        line, col = getattr(node.lc, kind)(part)
    except (KeyError, IndexError, TypeError):  # keys pulled in by a `<<:` merge have no position here
        return fallback
    return int(line), int(col)


# --- messages ----------------------------------------------------------------------------------------


def _message(error: ErrorDetails, model: type[BaseModel], loc: Loc) -> str:
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(str(loc[-1]), _keys_at(model, loc[:-1]))
    if kind == "missing":
        return "this key is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {_kind(given)}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {_kind(given)}"
    if kind == "string_type":
        return f"expected a string, got {_kind(given)}"
    if kind == "int_type":
        return f"expected a whole number, got {_kind(given)}"
    if kind == "too_short" and error.get("ctx", {}).get("min_length") == 1:
        return "must not be empty"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _kind(value: Any) -> str:
    # The value itself is never shown: it may be a password.
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _unknown_key(key: str, allowed: list[str] | None) -> str:
    if not allowed:
        return "unknown key"
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of: {', '.join(allowed)}"


def _keys_at(model: type[BaseModel], loc: Loc) -> list[str] | None:
    """The keys the model accepts at `loc`, found by walking the field annotations."""
    annotation: Any = model
    parts = list(loc)
    while True:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
            if not parts:
                return [field.alias or name for name, field in fields.items()]
            by_key = {field.alias or name: field for name, field in fields.items()}
            field = by_key.get(str(parts.pop(0)))
            if field is None:
                return None
            annotation = field.annotation
        elif parts and get_origin(annotation) in (dict, Mapping):
            parts.pop(0)
            annotation = get_args(annotation)[1]
        elif parts and get_origin(annotation) in (tuple, list, Sequence):
            parts.pop(0)
            annotation = get_args(annotation)[0]
        else:
            return None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation
