"""One settings tree for the whole daemon.

Sources, strongest first: command-line flags, `EDGED_<SECTION>__<KEY>`
environment variables, the TOML file (`--config`, else /etc/edged/edged.toml
when present), then the defaults written in the section modules. The TOML keys,
the variables and docs/configuration.md use the same names.

One module per section or group of sections (`serving`, `sources`, `pipelines`,
`mqtt`, `updates`), the shared base and loading in `base`, the root and its
cross-section rules in `settings`. Import from `edged.config`, not the modules:
this package's names are the stable ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edged.config.base import (
    ConfigError,
    Section,
    TomlSettings,
    _for_daemon,
    default_cache_dir,
    default_data_dir,
    default_socket_path,
    load_toml_settings,
)
from edged.config.homeassistant import HomeAssistantSettings
from edged.config.mqtt import DEVICE_ID, MqttSettings, MqttTlsSettings, default_device_id
from edged.config.pipelines import PipelineSettings, QualitySettings, SinkSettings
from edged.config.serving import (
    BackendSettings,
    LoggingSettings,
    ModelSettings,
    SocketSettings,
    StoreSettings,
)
from edged.config.settings import Settings
from edged.config.sources import LINE_KINDS, SENSOR_KINDS, SERIAL_RATES, SourceSettings
from edged.config.updates import UpdateSettings

__all__ = [
    "DEFAULT_CONFIG",
    "DEVICE_ID",
    "LINE_KINDS",
    "SENSOR_KINDS",
    "SERIAL_RATES",
    "BackendSettings",
    "ConfigError",
    "HomeAssistantSettings",
    "LoggingSettings",
    "ModelSettings",
    "MqttSettings",
    "MqttTlsSettings",
    "PipelineSettings",
    "QualitySettings",
    "Section",
    "Settings",
    "SinkSettings",
    "SocketSettings",
    "SourceSettings",
    "StoreSettings",
    "TomlSettings",
    "UpdateSettings",
    "default_cache_dir",
    "default_data_dir",
    "default_device_id",
    "default_socket_path",
    "load_settings",
    "load_toml_settings",
]

# Read at each call (not bound as a default), so a test can point it elsewhere.
DEFAULT_CONFIG = Path("/etc/edged/edged.toml")


def load_settings(path: Path | None = None, for_daemon: bool = True, **overrides: Any) -> Settings:
    """Build the daemon's settings; raise ConfigError naming the field or file line at fault.
    `for_daemon=False` (client commands) skips the rules about what a running daemon needs."""
    token = _for_daemon.set(for_daemon)
    try:
        return load_toml_settings(Settings, path, DEFAULT_CONFIG, "EDGED_", "configuration", **overrides)
    finally:
        _for_daemon.reset(token)
