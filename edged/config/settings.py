"""The root of the settings tree: every section, and the rules that span sections."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edged.config.base import TomlSettings, _for_daemon
from edged.config.homeassistant import HomeAssistantSettings
from edged.config.mqtt import MqttSettings
from edged.config.pipelines import PipelineSettings
from edged.config.serving import (
    BackendSettings,
    LoggingSettings,
    ModelSettings,
    SocketSettings,
    StoreSettings,
)
from edged.config.updates import UpdateSettings


class Settings(TomlSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGED_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    socket: SocketSettings = Field(default_factory=SocketSettings, description="The local API socket.")
    store: StoreSettings = Field(default_factory=StoreSettings, description="The model store.")
    backends: BackendSettings = Field(default_factory=BackendSettings, description="Inference runtimes.")
    models: dict[str, ModelSettings] = Field(
        default={}, description="Per-model settings, keyed by model name ([models.face])."
    )
    pipelines: dict[str, PipelineSettings] = Field(
        default={}, description="Continuous inference pipelines, keyed by name ([pipelines.door])."
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="The link to an MQTT broker.")
    updates: UpdateSettings = Field(
        default_factory=UpdateSettings, description="Model updates from the registry, over MQTT."
    )
    homeassistant: HomeAssistantSettings = Field(
        default_factory=HomeAssistantSettings, description="Home Assistant MQTT discovery."
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")

    @field_validator("models", "pipelines")
    @classmethod
    def _model_names(cls, value: dict) -> dict:
        from edged.models.manifest import check_name

        for name in value:
            check_name(name)
        return value

    @model_validator(mode="after")
    def _updates_need_mqtt_and_keys(self) -> Settings:
        if not _for_daemon.get():
            return self
        if self.updates.enabled and not self.mqtt.enabled:
            raise ValueError("updates.enabled needs mqtt.enabled: releases arrive over MQTT")
        if self.updates.enabled and not self.updates.public_keys:
            raise ValueError("updates.enabled needs updates.public_keys (from `edged-registry keygen`)")
        return self

    @model_validator(mode="after")
    def _homeassistant_needs_mqtt(self) -> Settings:
        if self.homeassistant.enabled and not self.mqtt.enabled and _for_daemon.get():
            raise ValueError("homeassistant.enabled needs mqtt.enabled: discovery configs go to the broker")
        return self

    @model_validator(mode="after")
    def _mqtt_pipelines_need_mqtt(self) -> Settings:
        if self.mqtt.enabled or not _for_daemon.get():
            return self
        for name, pipeline in self.pipelines.items():
            if pipeline.source.kind == "mqtt":
                raise ValueError(f"pipeline {name!r} reads its source over MQTT: it needs mqtt.enabled")
            if any(sink.kind == "mqtt" for sink in pipeline.sinks):
                raise ValueError(f"pipeline {name!r} publishes results over MQTT: it needs mqtt.enabled")
            if any(sink.kind == "snapshot" and sink.path is None for sink in pipeline.sinks):
                raise ValueError(f"pipeline {name!r}: a snapshot sink without a path publishes over MQTT "
                                 "only: it needs mqtt.enabled")
        return self

    @model_validator(mode="after")
    def _one_snapshot_directory_each(self) -> Settings:
        """Two snapshot sinks in one directory would overwrite each other's latest.jpg."""
        seen: dict[Path, str] = {}
        for name, pipeline in self.pipelines.items():
            for sink in pipeline.sinks:
                if sink.kind != "snapshot" or sink.path is None:
                    continue
                directory = sink.path.absolute()
                if directory in seen:
                    raise ValueError(f"pipelines {seen[directory]!r} and {name!r} both keep snapshots in "
                                     f"{directory}: give each its own directory")
                seen[directory] = name
        return self

    def model(self, name: str) -> ModelSettings:
        return self.models.get(name) or ModelSettings()
