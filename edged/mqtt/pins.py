"""Device releases pin a model (docs/updates.md, "One device's release").

While the registry retains a release of a model for this one device (a staged rollout's
wave, or the rollback of an aborted one), the device runs that and nothing the
all-devices or group topics say about the model. It still remembers their latest release
per topic, so that once the device release is withdrawn it follows them again at once,
without waiting for the registry to publish them anew (retained messages are sent only
on subscribe). Used by the update agent's thread only.
"""

from __future__ import annotations

from edged.topics import Topics


class Pins:
    def __init__(self) -> None:
        self._pinned: dict[str, tuple[str, bytes]] = {}  # model -> (topic, payload) of its device release
        self._followed: dict[str, dict[str, bytes]] = {}  # model -> {all/group topic: latest release}

    def remember(self, name: str, topic: str, payload: bytes) -> None:
        """The latest release of `name` on an all-devices or group topic (empty: withdrawn)."""
        if payload:
            self._followed.setdefault(name, {})[topic] = payload
            return
        followed = self._followed.get(name, {})
        followed.pop(topic, None)
        if not followed:
            self._followed.pop(name, None)

    def pinned(self, name: str) -> bool:
        return name in self._pinned

    def pin(self, name: str, topic: str, payload: bytes) -> bool:
        """A trusted device release of `name` arrived on `topic`; True when it was not pinned yet."""
        new = name not in self._pinned
        self._pinned[name] = (topic, payload)
        return new

    def payload(self, name: str) -> bytes | None:
        """The device release that pins `name`, if any."""
        pinned = self._pinned.get(name)
        return pinned[1] if pinned else None

    def unpin(self, name: str) -> list[tuple[str, bytes]]:
        """The device release of `name` was withdrawn: the remembered all-devices and group
        releases to follow again, every device's first (none when it was not pinned)."""
        if self._pinned.pop(name, None) is None:
            return []
        followed = self._followed.get(name, {})
        return sorted(followed.items(), key=lambda item: Topics.release_parts(item[0])[1] is not None)

    def describe(self) -> dict[str, str]:
        """Pinned models and the topic of their device release (the health document)."""
        return {name: topic for name, (topic, _) in list(self._pinned.items())}
