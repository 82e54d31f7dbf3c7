"""The MQTT topic map (docs/mqtt.md, docs/updates.md), in one place for both sides: the
device (edged/mqtt/) and the registry (edged/registry/) build every topic here, so the
two cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edged.config.mqtt import DEVICE_ID


@dataclass(frozen=True)
class Topics:
    """`device_id` is this device's on a device, `+` (every device) on the registry."""

    prefix: str
    device_id: str = "+"

    # --- a device's own topics ---------------------------------------------------------
    @property
    def device(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}"

    def of_device(self, what: str, device_id: str | None = None) -> str:
        """A device's topic (`status`, `state`, `health`, `fetch`, ...); `+` for every device."""
        return f"{self.prefix}/devices/{device_id or self.device_id}/{what}"

    def device_pattern(self, what: str) -> re.Pattern[str]:
        """Matches `what` of any well-named device (a chunk request's response topic)."""
        return re.compile(re.escape(f"{self.prefix}/devices/") + DEVICE_ID.pattern + re.escape(f"/{what}"))

    @property
    def status(self) -> str:
        """Retained `online`/`offline`; the Last Will sets `offline`."""
        return self.of_device("status")

    @property
    def health(self) -> str:
        return self.of_device("health")

    @property
    def state(self) -> str:
        """Retained: desired and active version of each model."""
        return self.of_device("state")

    @property
    def events(self) -> str:
        return self.of_device("events")

    @property
    def commands(self) -> str:
        return self.of_device("cmd")

    @property
    def replies(self) -> str:
        """Command replies with no response topic of their own."""
        return self.of_device("replies")

    @property
    def chunk_replies(self) -> str:
        """Where the registry answers this device's chunk requests."""
        return self.of_device("fetch")

    def results(self, pipeline: str) -> str:
        return self.of_device(f"results/{pipeline}")

    # --- the registry's topics ---------------------------------------------------------
    def release(self, name: str, group: str | None = None) -> str:
        """Where the release of `name` is retained: for every device, or for one group."""
        return f"{self.prefix}/registry/{release_suffix(name, group)}"

    def releases(self, group: str | None = None) -> list[str]:
        """The filters a device follows: every device's releases, and its group's."""
        return [self.release("+")] + ([self.release("+", group)] if group else [])

    @staticmethod
    def release_parts(topic: str) -> tuple[str, str | None]:
        """(model, group) of a release topic; group None for every device's."""
        parts = topic.split("/")
        return parts[-1], (parts[-3] if "/groups/" in topic else None)

    @property
    def fetch(self) -> str:
        """Chunk requests from devices."""
        return f"{self.prefix}/registry/fetch"

    @property
    def registry_status(self) -> str:
        """Retained online/offline of `edged-registry serve` (its Last Will says offline)."""
        return f"{self.prefix}/registry/status"


def release_suffix(name: str, group: str | None) -> str:
    """The release topic after `{prefix}/registry/`; the registry's store keeps its file at
    the same path."""
    return f"models/{name}" if group is None else f"groups/{group}/models/{name}"
