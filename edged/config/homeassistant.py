"""[homeassistant]: Home Assistant MQTT discovery of this device and its pipelines."""

from __future__ import annotations

from pydantic import Field

from edged.config.base import Section


class HomeAssistantSettings(Section):
    enabled: bool = Field(
        default=False,
        description=(
            "Publish retained Home Assistant MQTT discovery configs: one device, entities per pipeline "
            "with an mqtt sink and diagnostic sensors per model (needs mqtt.enabled)."
        ),
    )
    discovery_prefix: str = Field(
        default="homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}$",
        description="First level(s) of the discovery topics; Home Assistant's discovery prefix.",
    )
    device_name: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="The device's name in Home Assistant; mqtt.device_id when unset.",
    )
