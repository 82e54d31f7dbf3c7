"""Device releases pin a model (docs/updates.md, "One device's release").

While the registry retains a release of a model for this one device (a staged rollout's
wave, or the rollback of an aborted one), the device runs that and nothing the
all-devices or group topics say about the model. It still remembers their latest release
per topic, so that once the pin ends it follows them again at once, without waiting for
the registry to publish them anew (retained messages are sent only on subscribe).

A pin ends when its device release is withdrawn (an empty retained message), when it
expires (`expires_at`), or when it is not retained any more: a withdrawal sent while the
device was offline never reaches a clean session, so after every (re)connect a pin must
see its release again within `pin_confirm_s` of the SUBACK (retained messages come right
after it) or it is taken as withdrawn. Used by the update agent's thread only.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

from edged.errors import EdgedError
from edged.models.store import version_key
from edged.mqtt.checks import MAX_RELEASE_BYTES, trusted_release
from edged.signing import Release
from edged.topics import Topics

log = logging.getLogger("edged.mqtt.updates")
SUBSCRIBED = "$subscribed"  # queued when the device topic's SUBACK came (no real topic starts with $)


@dataclass
class Pin:
    topic: str
    payload: bytes
    expires_at: float  # the release's, seconds since the epoch
    confirm_by: float | None = None  # monotonic deadline after a (re)connect; None: confirmed


class Pins:
    def __init__(self, confirm_s: float) -> None:
        self.confirm_s = confirm_s
        self._pinned: dict[str, Pin] = {}  # model -> its device release
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

    def pin(self, name: str, topic: str, payload: bytes, expires_at: float) -> bool:
        """A device release of `name` that passed its checks; True when it was not pinned yet."""
        new = name not in self._pinned
        self._pinned[name] = Pin(topic, payload, expires_at)
        return new

    def get(self, name: str) -> Pin | None:
        """The device release that pins `name`, if any."""
        return self._pinned.get(name)

    def confirm(self, name: str, payload: bytes) -> None:
        """`payload` arrived on the device topic: if it is the pin's, the pin is still retained."""
        pin = self._pinned.get(name)
        if pin is not None and pin.payload == payload:
            pin.confirm_by = None

    def reconnected(self) -> int:
        """The device topic's subscription was acknowledged: every pin must be confirmed
        again within `confirm_s`. The number of pins waiting for that."""
        deadline = time.monotonic() + self.confirm_s
        for pin in self._pinned.values():
            pin.confirm_by = deadline
        return len(self._pinned)

    def ended(self) -> list[tuple[str, str]]:
        """Pins that are over although no withdrawal arrived, with why (to log)."""
        now, wall = time.monotonic(), time.time()
        over = []
        for name, pin in self._pinned.items():
            if wall >= pin.expires_at:  # Release.expired's rule
                over.append((name, f"expired at {time.ctime(pin.expires_at)}"))
            elif pin.confirm_by is not None and now >= pin.confirm_by:
                over.append((name, f"was not retained after the reconnect ({self.confirm_s:g} s): "
                                   "withdrawn while the device was offline"))
        return over

    def wait_s(self) -> float | None:
        """How long the agent may sleep before a pin could end (None: no limit)."""
        waits = [pin.expires_at - time.time() for pin in self._pinned.values()]
        now = time.monotonic()
        waits += [pin.confirm_by - now for pin in self._pinned.values() if pin.confirm_by is not None]
        return max(0.05, min(waits)) if waits else None

    def unpin(self, name: str) -> list[tuple[str, bytes]]:
        """The pin of `name` ended: the remembered all-devices and group releases to follow
        again (none when it was not pinned)."""
        if self._pinned.pop(name, None) is None:
            return []
        return list(self._followed.get(name, {}).items())

    def describe(self) -> dict[str, str]:
        """Pinned models and the topic of their device release (the health document)."""
        return {name: pin.topic for name, pin in list(self._pinned.items())}


def newest(followed: list[tuple[str, bytes]],
           verify: Callable[[str, bytes], Release]) -> tuple[str, bytes, Release] | None:
    """The newest remembered release that still verifies: the only one worth following once
    a pin ends (an older one would only be refused). Those that do not verify (expired
    while pinned) are a log line, not an event: they were never this device's to install."""
    found: list[tuple[str, bytes, Release]] = []
    for topic, payload in followed:
        try:
            found.append((topic, payload, verify(topic, payload)))
        except EdgedError as exc:
            log.info("updates: the release on %s is not followed again: %s", topic, exc)
    return max(found, key=lambda item: version_key(item[2].manifest.version), default=None)


def seen_key(topic: str, payload: bytes) -> bytes:
    """A release as handled: the same envelope on another topic is another message."""
    return hashlib.sha256(topic.encode() + b"\0" + payload).digest()


class PinHandling:
    """The update agent's (`updates.py`) handling of pins, apart so that each file fits in a
    head; it uses the agent's pins, queue, retries, seen releases and `_attempt`."""

    def _on_subscribed(self, topic_filter: str) -> None:
        """paho's thread: the device topic is subscribed (again); its retained releases follow,
        queued behind this, so the pins' confirm window starts before they are handled."""
        if topic_filter == self.own_topic:
            try:
                self._queue.put_nowait((SUBSCRIBED, b"", time.monotonic()))
            except queue.Full:
                log.warning("updates: too many releases waiting; pins are not checked after this connect")

    def _check_pins(self, subscribed: bool) -> None:
        """After each message: a SUBACK makes pins unconfirmed; pins that ended are withdrawn."""
        if subscribed and (count := self.pins.reconnected()):
            log.info("updates: %d pin(s) wait for their device release to be retained again", count)
        for name, why in self.pins.ended():
            log.info("updates: %s no longer pinned: its device release %s", name, why)
            self._withdrawn(name, self.own_topic)

    def _pin(self, name: str, topic: str, payload: bytes, release: Release) -> None:
        """A device release of `name` that passed its checks: what the all-devices and group
        topics say waits until the pin ends. Any other waiting release (an aborted rollout's
        on this very topic too) is replaced: it must never come due later."""
        if self.pins.pin(name, topic, payload, release.expires_at):
            log.info("updates: %s pinned by its device release (%s)", name, topic)
        pending = self.retries.get(name)
        if pending is not None and pending.payload != payload:
            self.retries.forget(name)

    def _withdrawn(self, name: str, device_topic: str | None) -> None:
        """`name`'s release is withdrawn; on the device topic (or a pin that ended) the
        newest remembered all-devices or group release is followed again, quietly when it is
        not newer than the active version (nothing to install is no refusal)."""
        self.desired(name, None)
        self._give_up(name)
        if device_topic is None:
            return
        pin = self.pins.get(name)
        if pin is not None:  # the same release retained again later pins again
            self._seen.pop(seen_key(pin.topic, pin.payload), None)
        found = newest(self.pins.unpin(name), lambda topic, payload: trusted_release(
            payload, self.trusted, MAX_RELEASE_BYTES, *Topics.release_parts(topic)))
        if found is None:
            return
        topic, payload, release = found
        active, version = self.control.active(name), release.manifest.version
        if active is None or version_key(version) > version_key(active):
            log.info("updates: %s follows %s again", name, topic)
            self._attempt(topic, payload)
        elif not self.settings.models or name in self.settings.models:
            log.debug("updates: %s follows %s again: %s, the active version is %s", name, topic,
                      version, active)
            self.desired(name, version)
