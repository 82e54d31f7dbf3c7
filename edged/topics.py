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

    def snapshots(self, pipeline: str) -> str:
        """Retained: the pipeline's newest annotated snapshot, JPEG bytes."""
        return self.of_device(f"snapshots/{pipeline}")

    # --- the registry's topics ---------------------------------------------------------
    def release(self, name: str, group: str | None = None, device: str | None = None) -> str:
        """Where the release of `name` is retained: for every device, one group, or one device."""
        return f"{self.prefix}/registry/{release_suffix(name, group, device)}"

    def releases(self, group: str | None = None) -> list[str]:
        """The filters a device follows: every device's releases, its group's, and (on a
        device, not on the registry's `+`) its own device's."""
        filters = [self.release("+")] + ([self.release("+", group)] if group else [])
        if self.device_id != "+":
            filters.append(self.release("+", device=self.device_id))
        return filters

    @staticmethod
    def release_parts(topic: str) -> tuple[str, str | None, str | None]:
        """(model, group, device) of a release topic; group and device None for every
        device's, one of them set for a group's or a device's."""
        parts = topic.split("/")
        if len(parts) >= 6 and parts[-5] == "registry" and parts[-2] == "models":
            if parts[-4] == "groups":
                return parts[-1], parts[-3], None
            if parts[-4] == "devices":
                return parts[-1], None, parts[-3]
        return parts[-1], None, None

    @property
    def fetch(self) -> str:
        """Chunk requests from devices."""
        return f"{self.prefix}/registry/fetch"

    @property
    def registry_status(self) -> str:
        """Retained online/offline of `edged-registry serve` (its Last Will says offline)."""
        return f"{self.prefix}/registry/status"


def release_suffix(name: str, group: str | None, device: str | None = None) -> str:
    """The release topic after `{prefix}/registry/`; the registry's store keeps its file at
    the same path. A release is for every device, one group or one device, never two."""
    if group is not None and device is not None:
        raise ValueError("a release is for a group or for a device, not both")
    if device is not None:
        return f"devices/{device}/models/{name}"
    return f"models/{name}" if group is None else f"groups/{group}/models/{name}"
