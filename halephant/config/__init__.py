"""halephant's configuration: the `halephant.yaml` schema, its loader, and duration/size parsing.

`load_config(path, plugin_settings)` is the whole story for most callers. The plugin manager uses the two
steps apart: `read_config` (which plugins are disabled?), load the others, then `validate_config` with
each loaded plugin's settings model. Every problem is reported at once in a `ConfigError`.
"""

from __future__ import annotations

from halephant.config.loader import (
    RawConfig,
    load_config,
    plugin_problem,
    read_config,
    read_config_text,
    validate_config,
)
from halephant.config.schema import (
    AdminConfig,
    ClusterConfig,
    Config,
    DatabaseConfig,
    HostPort,
    LimitsConfig,
    LoggingConfig,
    PluginsConfig,
    UserConfig,
    is_md5_hash,
    is_scram_verifier,
)
from halephant.config.units import Duration, Size, parse_duration, parse_size
from halephant.errors import ConfigError, ConfigProblem

__all__ = [
    "AdminConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DatabaseConfig",
    "Duration",
    "HostPort",
    "LimitsConfig",
    "LoggingConfig",
    "PluginsConfig",
    "RawConfig",
    "Size",
    "UserConfig",
    "is_md5_hash",
    "is_scram_verifier",
    "load_config",
    "parse_duration",
    "parse_size",
    "plugin_problem",
    "read_config",
    "read_config_text",
    "validate_config",
]
