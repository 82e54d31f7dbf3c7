"""The device's update agent: follow the registry's releases and switch to them safely.

For each signed release that arrives (docs/updates.md): verify it before anything else
(signature against a pinned key, expiry, group, names, version, sizes, disk space), pull
its files in chunks (resumable, `transfer.py`, hashed as they arrive), move them into
the store, load the version and run its self-test (`checks.py`), and only then
activate it; the model manager hot-swaps it with no failed request. For `probation_s`
afterwards the agent watches the new version (errors, its files, the self-test through
the served path) and rolls back to the previous version when it goes bad. Every step is
an event.

A step that fails for a reason that may pass (no reply from the registry, a full disk)
is an `update_failed` event and the release is tried again (`retry.py`): after a backoff,
or at once when the registry is back or the disk has room, until it is installed or a
newer release replaces it. Releases are handled one at a time on the agent's own thread.
A release signed for this one device pins its model (`pins.py`) and may roll it back.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edged.config import UpdateSettings
from edged.control import Control
from edged.errors import EdgedError
from edged.models.store import version_key
from edged.mqtt.checks import MAX_RELEASE_BYTES, UpdateRefused, check_rollback, trusted_release
from edged.mqtt.install import Event, Installer
from edged.mqtt.link import MqttLink
from edged.mqtt.pins import SUBSCRIBED, PinHandling, Pins, seen_key
from edged.mqtt.retry import NotEnoughDisk, RetryBook, check_disk, disk_full, space_needed
from edged.mqtt.transfer import RegistrySilent, Transfer
from edged.signing import Release, trusted_keys, verify_envelope
from edged.topics import Topics

__all__ = ["NotEnoughDisk", "UpdateAgent", "UpdateRefused", "describe"]
log = logging.getLogger(__name__)
REMEMBERED = 1024


class UpdateAgent(PinHandling):
    """`event` queues an event (Reporter.event); `desired` says which version the registry
    wants of a model, None when it withdrew it (Reporter.set_desired)."""

    def __init__(self, settings: UpdateSettings, link: MqttLink, control: Control, event: Event,
                 desired: Callable[[str, str | None], None]) -> None:
        self.settings = settings
        self.link = link
        self.control = control
        self.event = event
        self.desired = desired
        self.trusted = trusted_keys(settings.public_keys)
        self.transfer = Transfer(self.link, settings.download_dir, chunk_bytes=settings.chunk_bytes,
                                 window=settings.window, timeout_s=settings.chunk_timeout_s,
                                 retries=settings.chunk_retries, on_reply=self._on_chunk_reply)
        self.retries = RetryBook(settings)
        self._stop = threading.Event()
        self.installer = Installer(settings, control, self.transfer, self._stop, event)
        self.pins = Pins(settings.pin_confirm_s)
        self.topics = self.link.topics.releases(settings.group)
        self.own_topic = next(t for t in self.topics if Topics.release_parts(t)[2] is not None)
        self.link.on_subscribed.append(self._on_subscribed)
        self.status_topic = self.link.topics.registry_status
        self._seen: dict[bytes, None] = {}  # releases handled (by topic and payload), oldest first
        self._queue: queue.Queue[tuple[str, bytes, float] | None] = queue.Queue(maxsize=256)
        self._wake_on_reply = threading.Event()  # idle, with a release waiting for the registry
        self._thread = threading.Thread(target=self._work, name="mqtt-updates", daemon=True)

    def start(self) -> None:
        for path in self.transfer.clear_leftovers():
            log.info("updates: removed %s, left by a copy into the store that did not finish", path)
        self.transfer.start()
        # This device's own releases first: the broker sends retained messages in the order of
        # the subscriptions, so a pin is known before the releases it overrides arrive.
        for topic in [self.own_topic, *(t for t in self.topics if t != self.own_topic), self.status_topic]:
            self.link.subscribe(topic, self._receive)
        self._thread.start()
        log.info("updates: following %s with %d trusted key(s)", ", ".join(self.topics), len(self.trusted))

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread.is_alive():  # not when stopped before it started
            self._thread.join(timeout=10)

    def _receive(self, message: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait((message.topic, bytes(message.payload), time.monotonic()))
        except queue.Full:
            log.warning("updates: too many releases waiting; %s dropped (it is retained: it comes back "
                        "on the next connect)", message.topic)

    def _on_chunk_reply(self) -> None:
        """paho's thread: a chunk reply while a release waits for the registry wakes the agent
        (once: not for every chunk of a download)."""
        if self._wake_on_reply.is_set():
            self._wake_on_reply.clear()
            try:
                self._queue.put_nowait(("", b"", time.monotonic()))
            except queue.Full:
                pass

    def _work(self) -> None:
        while not self._stop.is_set():
            if any(p.silent for p in self.retries):
                self._wake_on_reply.set()
            try:
                waits = [w for w in (self.retries.wait_s(), self.pins.wait_s()) if w is not None]
                item = self._queue.get(timeout=min(waits, default=None))
            except queue.Empty:
                item = ("", b"", 0.0)  # time for a retry
            self._wake_on_reply.clear()
            if item is None:
                return
            topic, payload, received_at = item
            try:
                if topic == self.status_topic:
                    self._registry_status(payload, received_at)
                elif topic and topic != SUBSCRIBED:
                    self.handle(topic, payload, received_at)
                self._check_pins(topic == SUBSCRIBED)
                self._retry_due()
            except Exception:  # a bug must not end the agent; the next release is tried
                log.exception("updates: handling %s failed", topic or "a retry")

    def _registry_status(self, payload: bytes, received_at: float) -> None:
        """The registry says it is online (it came back, or we reconnected): try now what
        failed before it said so."""
        try:
            online = json.loads(payload).get("state") == "online"
        except (ValueError, AttributeError):
            online = False
        if online and (count := self.retries.hurry(since=received_at)):
            log.info("updates: the registry is online; trying %d waiting release(s) now", count)

    def _retry_due(self) -> None:
        if self.transfer.last_reply and (count := self.retries.heard_since(self.transfer.last_reply)):
            log.info("updates: the registry answers again; trying %d waiting release(s) now", count)
        for pending in self.retries.due():
            if self._stop.is_set():
                return
            log.info("updates: trying %s %s again (try %d; last: %s)", pending.name, pending.version,
                     pending.attempts + 1, pending.reason)
            self._attempt(pending.topic, pending.payload)

    # --- one release ----------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, received_at: float | None = None) -> None:
        name, _group, device = Topics.release_parts(topic)
        if device is None:
            self.pins.remember(name, topic, payload)
            if not payload and self.pins.pinned(name):
                log.info("updates: the release of %s on %s was withdrawn (pinned by its device release)",
                         name, topic)
                return
        if not payload:
            log.info("updates: the release of %s on %s was withdrawn", name, topic)
            self._withdrawn(name, topic if device is not None else None)
            return
        if device is not None:
            self.pins.confirm(name, payload)
        key = seen_key(topic, payload)
        if key in self._seen:  # a repeat; sent after it failed, it says the registry is back
            pending = self.retries.get(name)
            since = time.monotonic() if received_at is None else received_at
            if pending is not None and pending.payload == payload and self.retries.hurry(name, since=since):
                log.info("updates: %s %s announced again; trying it now", name, pending.version)
            return
        self._seen[key] = None
        while len(self._seen) > REMEMBERED:
            del self._seen[next(iter(self._seen))]
        self._attempt(topic, payload)

    def _attempt(self, topic: str, payload: bytes) -> None:
        """Verify and install one release; on failure, event, log line, and (when it may
        pass) a retry."""
        name, group, device = Topics.release_parts(topic)
        if device is None and self.pins.pinned(name):
            log.info("updates: %s release on %s not installed: pinned by its device release", name, topic)
            return
        try:
            release = self._verify(name, group, device, topic, payload)
        except NotEnoughDisk as exc:
            self._failed("update_refused", name, exc.version, topic, payload, exc, disk=exc.disk)
            return
        except UpdateRefused as exc:  # not for this device: a waiting release stays, unless it was this
            log.warning("updates: %s refused: %s", name, exc)
            self.event("update_refused", model=name, **({"version": exc.version} if exc.version else {}),
                       reason=str(exc))
            self._give_up(name, payload)
            return
        if release is None:  # already active, or not followed
            self._give_up(name, payload)
            return
        version = release.manifest.version
        try:
            self.installer.install(release)
        except UpdateRefused as exc:  # a bad version: never retried
            log.error("updates: %s %s not installed: %s", name, version, exc)
            self.event("update_failed", model=name, version=version, reason=str(exc))
            self._give_up(name)
        except (EdgedError, OSError) as exc:
            if self._stop.is_set():  # shutting down: the download resumes at the next start
                log.info("updates: %s %s paused by the shutdown", name, version)
                return
            disk = self._space_needed(release) if disk_full(exc) else None
            if disk:  # the space is the problem: give back what this release holds
                for f in release.manifest.files:
                    self.transfer.discard(f.sha256)
            self._failed("update_failed", name, version, topic, payload, exc, disk=disk)
        else:
            self.retries.forget(name)
            self._sweep()

    def _failed(self, kind: str, name: str, version: str | None, topic: str, payload: bytes,
                exc: BaseException, disk: list[tuple[Path, int]] | None) -> None:
        reason = str(exc) if isinstance(exc, EdgedError) else f"{exc.strerror or exc}: {exc.filename}"
        pending = self.retries.failed(name, version or "?", topic, payload, reason, disk=disk,
                                      silent=isinstance(exc, RegistrySilent))
        self._sweep()  # what a release this one replaced had downloaded
        retry_in = round(pending.due - time.monotonic(), 1)
        when = f"again in {retry_in:g} s" + (" or once the disk has room" if disk else
                                              " or as soon as the registry is back")
        log.error("updates: %s %s %s: %s; trying %s", name, version or "release",
                  "refused" if kind == "update_refused" else "failed", reason, when)
        self.event(kind, model=name, **({"version": version} if version else {}), reason=reason,
                            attempt=pending.attempts, retry_in_s=retry_in, waiting_for_disk=bool(disk))

    def _give_up(self, name: str, payload: bytes | None = None) -> None:
        """No more tries for `name`'s waiting release (only if it is `payload`, when given);
        downloads no waiting release needs go."""
        pending = self.retries.get(name)
        if pending is not None and (payload is None or pending.payload == payload):
            self.retries.forget(name)
        self._sweep()

    def _sweep(self) -> None:
        """Remove downloads no waiting release needs (replaced, withdrawn, installed ones).
        Not while releases are queued: one of them may resume a download a restart left."""
        if not self._queue.empty():
            return
        keep = set()
        for pending in self.retries:
            try:
                release = Release.parse(verify_envelope(pending.payload, self.trusted, MAX_RELEASE_BYTES))
            except EdgedError:
                continue
            keep.update(f.sha256 for f in release.manifest.files)
        for digest in self.transfer.sweep(keep):
            log.info("updates: removed the download of %s (no release waits for it)", digest[:12])

    def _space_needed(self, release: Release) -> list[tuple[Path, int]]:
        total = sum(f.size for f in release.manifest.files)
        return space_needed(self.settings.download_dir, self.control.store_root, total)

    def _verify(self, name: str, group: str | None, device: str | None, topic: str,
                payload: bytes) -> Release | None:
        """The release, checked; None when there is nothing to do (already active). A
        followed one sets its desired version; a device release that passes the checks (a
        refused one does not) pins its model."""
        release = trusted_release(payload, self.trusted, MAX_RELEASE_BYTES, name, group, device)
        manifest = release.manifest
        if self.settings.models and name not in self.settings.models:
            return None
        self.desired(name, manifest.version)
        active = self.control.active(name)
        pin = self._pin if device is not None else lambda *_: None
        if active == manifest.version:
            pin(name, topic, payload, release)
            return None
        check_rollback(release, active)
        older = active is not None and version_key(manifest.version) < version_key(active)
        if older and not release.rollback:
            raise UpdateRefused(f"version {manifest.version} is older than the active {active} "
                                f"(roll back with the models.rollback command or a rollback release)",
                                manifest.version)
        if self.installer.from_store(release):
            pin(name, topic, payload, release)
            return release  # a rollback to a version the store still holds: nothing to download
        total = sum(f.size for f in manifest.files)
        if total > self.settings.max_model_bytes:
            raise UpdateRefused(f"{total} bytes is over the {self.settings.max_model_bytes} byte limit",
                                manifest.version)
        pin(name, topic, payload, release)  # a release waiting for disk space still pins
        check_disk(self.settings.download_dir, self._space_needed(release), manifest.version)
        return release


def describe(agent: UpdateAgent | None) -> dict[str, Any]:
    """The agent's section of the health document."""
    if agent is None:
        return {"enabled": False}
    return {"enabled": True, "following": agent.topics, "bytes_received": agent.transfer.bytes_received,
            "chunks_retried": agent.transfer.chunks_retried, "waiting": agent._queue.qsize(),
            "retrying": {p.name: p.describe() for p in agent.retries}, "pinned": agent.pins.describe()}
