"""The registry's topics (docs/updates.md), in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryTopics:
    prefix: str

    def release(self, name: str, group: str | None = None) -> str:
        """Where the release of `name` is retained: for every device, or for one group."""
        return f"{self.prefix}/registry/{release_suffix(name, group)}"

    @property
    def fetch(self) -> str:
        """Chunk requests from devices."""
        return f"{self.prefix}/registry/fetch"

    @property
    def status(self) -> str:
        """Retained online/offline of `serve` (its Last Will says offline)."""
        return f"{self.prefix}/registry/status"

    def device(self, what: str, device_id: str = "+") -> str:
        """A device's topic (`status`, `state`, `health`, `fetch`); `+` for every device."""
        return f"{self.prefix}/devices/{device_id}/{what}"


def release_suffix(name: str, group: str | None) -> str:
    """The release topic after `{prefix}/registry/`; the store keeps its file at the same path."""
    return f"models/{name}" if group is None else f"groups/{group}/models/{name}"
