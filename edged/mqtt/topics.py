"""The MQTT topic map (docs/architecture.md), in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    @property
    def device(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}"

    @property
    def status(self) -> str:
        """Retained `online`/`offline`; the Last Will sets `offline`."""
        return f"{self.device}/status"

    @property
    def health(self) -> str:
        return f"{self.device}/health"

    @property
    def state(self) -> str:
        """Retained: desired and active version of each model."""
        return f"{self.device}/state"

    @property
    def events(self) -> str:
        return f"{self.device}/events"

    @property
    def commands(self) -> str:
        return f"{self.device}/cmd"

    def results(self, pipeline: str) -> str:
        return f"{self.device}/results/{pipeline}"
