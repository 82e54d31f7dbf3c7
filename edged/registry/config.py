"""The registry's settings: a small tree of its own, with the daemon's MQTT section.

Sources, strongest first: `EDGED_REGISTRY_*` environment variables (nested keys with
`__`: `EDGED_REGISTRY_MQTT__HOST`), the TOML file (`--config`, else
/etc/edged/registry.toml when present), then the defaults written here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from edged.config import MqttSettings, TomlSettings, load_toml_settings

DEFAULT_CONFIG = Path("/etc/edged/registry.toml")
DEFAULT_CLIENT_ID = "edged-registry"
ENV_PREFIX = "EDGED_REGISTRY_"


def default_root() -> Path:
    """systemd's StateDirectory=, /var/lib/edged-registry as root, else under XDG_DATA_HOME."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edged-registry")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edged-registry"


def registry_mqtt(**values: Any) -> MqttSettings:
    """The daemon's MQTT section with the registry's own client id unless one is given."""
    return MqttSettings(**{"device_id": DEFAULT_CLIENT_ID, **values})


class RegistrySettings(TomlSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    root: Path = Field(
        default_factory=default_root,
        description="The registry's store: signing key, published versions, retained releases.",
    )
    topic_prefix: str = Field(
        default="edged", pattern=r"^[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64}){0,3}$",
        description="First level(s) of every topic; the devices' mqtt.topic_prefix.",
    )
    max_chunk_bytes: int = Field(
        default=1 << 20, ge=1024, le=16 << 20,
        description="Largest chunk `serve` sends in one reply; longer requests are refused.",
    )
    release_days: float = Field(
        default=30.0, gt=0, le=3650,
        description="How long a signed release is valid; `serve` re-signs it after two thirds of that.",
    )
    serve_threads: int = Field(
        default=4, ge=1, le=64, description="Chunk requests `serve` answers at once."
    )
    share_group: str = Field(
        default="edged-registry", pattern=r"^[A-Za-z0-9_.-]{0,64}$",
        description=(
            "MQTT 5 shared subscription group of `serve`: every instance subscribed as "
            "$share/<group>/{prefix}/registry/fetch gets its share of the chunk requests, each request "
            "goes to one of them. Empty: a plain subscription (one instance per broker, or every "
            "instance answers every request); also the fallback when the broker has no shared "
            "subscriptions."
        ),
    )
    reload_interval_s: float = Field(
        default=2.0, gt=0, le=3600,
        description="How often `serve` looks for changes to the store (SIGHUP: at once).",
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0, le=300,
        description="How long a command waits for the broker to connect or acknowledge.",
    )
    rollout_soak_s: float = Field(
        default=300.0, ge=0, le=7 * 86_400,
        description="Default `rollout --soak-s`: how long a wave's devices run the new version before the "
                    "next wave starts (a device failing meanwhile still counts).",
    )
    rollout_report_timeout_s: float = Field(
        default=900.0, gt=0, le=7 * 86_400,
        description="Default `rollout --report-timeout-s`: a targeted device that reports neither the new "
                    "version nor a failure within this time is silent, and counts as failed.",
    )
    rollout_max_failures: int = Field(
        default=0, ge=0, le=1_000_000,
        description="Default `rollout --max-failures`: more failed or silent devices than this halt a "
                    "rollout.",
    )
    rollout_tick_s: float = Field(
        default=2.0, gt=0, le=600,
        description="How often `serve` advances the rollouts it drives (and an idle instance tries to take "
                    "over driving).",
    )
    fleet_max_devices: int = Field(
        default=100_000, ge=1, le=10_000_000,
        description="Devices `serve` (and `fleet`) follow at most: each is memory, and any client that may "
                    "publish a device status can make up ids; more are refused, counted and logged once a "
                    "minute.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    mqtt: MqttSettings = Field(
        default_factory=registry_mqtt,
        description=(
            "The broker, as the daemon's [mqtt] section (host, port, username, password_file, tls). "
            "device_id is the registry's client id (default edged-registry); protocol must be 5. "
            "enabled and the outbox, health and command keys are not used."
        ),
    )

    @field_validator("mqtt", mode="before")
    @classmethod
    def _registry_client_id(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {"device_id": DEFAULT_CLIENT_ID, **value}
        return value

    @model_validator(mode="after")
    def _one_prefix(self) -> RegistrySettings:
        if self.mqtt.protocol != "5":
            raise ValueError("mqtt.protocol must be 5: chunk replies need MQTT 5 response topics")
        if "topic_prefix" in self.mqtt.model_fields_set and self.mqtt.topic_prefix != self.topic_prefix:
            if "topic_prefix" in self.model_fields_set:
                raise ValueError("topic_prefix and mqtt.topic_prefix differ; set topic_prefix only")
            self.topic_prefix = self.mqtt.topic_prefix
        return self


def load_registry_settings(path: Path | None = None) -> RegistrySettings:
    """Build the settings; raise ConfigError naming the field (and where to set it) at fault."""
    return load_toml_settings(RegistrySettings, path, DEFAULT_CONFIG, ENV_PREFIX, "registry configuration")
