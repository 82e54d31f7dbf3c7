"""The fleet as `edged-registry fleet` (fleet_table.py) and a rollout see it: every device
the broker knows of, as the devices report themselves.

Status and state are retained, so they arrive at once; health reports and events are not,
so a device's health age is known only if it reported during the `--wait` window (make the
window longer than the devices' `health_interval_s` to hear from all of them).

Everything here comes from devices and is untrusted: device ids must be well formed, a
message over MAX_DOCUMENT_BYTES is not parsed, and what is kept per device is bounded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt

from edged.config.mqtt import DEVICE_ID
from edged.topics import Topics

log = logging.getLogger(__name__)
KINDS = ("status", "state", "health", "events")
MAX_DOCUMENT_BYTES = 64 << 10  # a state document names a few models; far more is not a device's
MAX_PROBLEMS = 5
MAX_OUTCOMES = 64  # (model, version) outcomes kept per device from its events
# Outcomes of an update, and its activation (the version serves, probation has begun).
UPDATE_EVENTS = frozenset({"update_activated", "update_kept", "update_failed", "update_refused",
                           "update_rolled_back"})


class UpdateEvent(NamedTuple):
    """A device's last update event for one (model, version)."""

    kind: str
    reason: str
    at: float  # the event's own time (epoch seconds), else when it arrived
    retrying: bool  # an update_failed the device tries again (it says attempt and retry_in_s)


@dataclass(frozen=True)
class ModelReport:
    """One model as a device's retained state says it."""

    desired: str | None
    active: str | None
    degraded: bool
    failure: dict[str, Any] | None  # {"version", "kind", "reason", "at"} of its last failed update


@dataclass(frozen=True)
class DeviceReport:
    """What a rollout needs of a device: its group, its models, its last update events."""

    online: bool
    group: str | None
    models: dict[str, ModelReport]
    outcomes: dict[tuple[str, str], UpdateEvent]  # (model, version) -> its last update event


@dataclass
class Device:
    device_id: str
    status: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    health_received: float | None = None  # time.monotonic() of the last health report
    problems: list[str] = field(default_factory=list)
    outcomes: dict[tuple[str, str], UpdateEvent] = field(default_factory=dict)


def _restarted(before: dict[str, Any] | None, after: dict[str, Any] | None) -> bool:
    """A new run of the daemon: a probation it was in was cut short by the stop, and no
    update_kept will come for it (the version stays active; docs/updates.md)."""
    started = (before or {}).get("started_at"), (after or {}).get("started_at")
    return None not in started and started[0] != started[1]


def _forget_activations(device: Device) -> None:
    """Activations whose update_kept will not come: the retained state says where it is."""
    for key in [k for k, e in device.outcomes.items() if e.kind == "update_activated"]:
        del device.outcomes[key]


def _text(value: object, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _items(value: object) -> list[tuple[str, Any]]:
    return list(value.items()) if isinstance(value, dict) else []


def model_report(entry: object) -> ModelReport | None:
    if not isinstance(entry, dict):
        return None
    failure = entry.get("failure")
    if isinstance(failure, dict) and isinstance(failure.get("version"), str):
        failure = {"version": _text(failure["version"], 64), "kind": _text(failure.get("kind"), 64),
                   "reason": _text(failure.get("reason")), "at": failure.get("at")
                   if isinstance(failure.get("at"), int | float) else None}
    else:
        failure = None
    return ModelReport(desired=_text(entry.get("desired"), 64), active=_text(entry.get("active"), 64),
                       degraded=bool(entry.get("degraded")), failure=failure)


class FleetWatcher:
    """Records the status, state, health and update events of every device, thread-safely.

    `synced` is set once the retained messages that the subscription brought have all
    arrived: `mark_sync` names a marker the caller publishes right after subscribing, which
    the broker delivers after them (one client's messages stay in order)."""

    def __init__(self, prefix: str, max_devices: int = 100_000) -> None:
        """`max_devices`: entries kept at most (each is memory; ids come from anyone who can
        publish a status); a device beyond them is refused, counted, logged once a minute."""
        self.max_devices = max_devices
        self.refused = 0
        self._refused_logged = -1.0
        self.topics = Topics(prefix)
        self.devices_root = f"{prefix}/devices/"
        self.sync_topic = f"{prefix}/registry/rollouts/sync"
        self.devices: dict[str, Device] = {}
        self.synced = threading.Event()
        self._marker = b""
        self._lock = threading.Lock()

    def filters(self, kinds: tuple[str, ...] = ("status", "state", "health")) -> list[str]:
        """`fleet` shows health ages; `serve` follows status, state and events (a rollout's
        signals) and not health, which is most of a fleet's traffic."""
        return [self.topics.of_device(kind) for kind in kinds]

    def mark_sync(self) -> bytes:
        """A new marker to publish on `sync_topic`; `synced` is cleared until it arrives.

        Called after each (re)subscribe: events sent while we were away are lost, so an
        activation seen before is forgotten (its update_kept may be among them), and the
        retained state, which arrives again, says where the device is."""
        self.synced.clear()
        self._marker = uuid.uuid4().hex.encode()
        with self._lock:
            for device in self.devices.values():
                _forget_activations(device)
        return self._marker

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.sync_topic:
            if message.payload == self._marker:
                self.synced.set()
            return
        rest = message.topic.removeprefix(self.devices_root)
        device_id, _, kind = rest.partition("/")
        if kind not in KINDS or not DEVICE_ID.fullmatch(device_id):
            return
        document: dict[str, Any] | None = None
        if message.payload:
            parsed = None
            if len(message.payload) <= MAX_DOCUMENT_BYTES:
                try:
                    parsed = json.loads(message.payload)
                except (ValueError, RecursionError):
                    parsed = None
            if not isinstance(parsed, dict):
                self._problem(device_id, f"{kind} is not a JSON object of at most {MAX_DOCUMENT_BYTES} bytes")
                return
            document = parsed
        with self._lock:
            if kind in ("status", "state"):  # retained: they alone create (and clear) an entry
                device = self.devices.get(device_id)
                if device is None and document is not None:
                    device = self._device(device_id)
                if device is not None:
                    if kind == "status" and _restarted(device.status, document):
                        _forget_activations(device)
                    setattr(device, kind, document)  # an empty retained message clears it
                    if device.status is None and device.state is None:
                        del self.devices[device_id]
                return
            device = self.devices.get(device_id)  # events and health of unknown devices: ignored
            if device is None:
                return
            if kind == "health":
                device.health_received = time.monotonic()
            elif document is not None:
                self._record_event(device, document)

    @staticmethod
    def _record_event(device: Device, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        model, version = _text(event.get("model"), 64), _text(event.get("version"), 64)
        if kind not in UPDATE_EVENTS or model is None or version is None:
            return
        at = event.get("time")
        device.outcomes.pop((model, version), None)  # the newest last
        device.outcomes[(model, version)] = UpdateEvent(
            kind, _text(event.get("reason")) or "", float(at) if isinstance(at, int | float) else time.time(),
            kind == "update_failed" and "retry_in_s" in event)
        while len(device.outcomes) > MAX_OUTCOMES:
            device.outcomes.pop(next(iter(device.outcomes)))

    def _problem(self, device_id: str, problem: str) -> None:
        with self._lock:
            device = self._device(device_id)
            if device is None:
                return
            problems = device.problems
            if problem not in problems:
                problems.append(problem)
                del problems[:-MAX_PROBLEMS]

    def _device(self, device_id: str) -> Device | None:
        """The device's entry, created if there is room (the caller holds the lock)."""
        device = self.devices.get(device_id)
        if device is None:
            if len(self.devices) >= self.max_devices:
                self.refused += 1
                now = time.monotonic()
                if self._refused_logged < 0 or now - self._refused_logged >= 60:
                    self._refused_logged = now
                    log.warning("fleet: %d devices refused so far: fleet_max_devices (%d) are followed",
                                self.refused, self.max_devices)
                return None
            device = self.devices[device_id] = Device(device_id)
        return device

    def reports(self) -> dict[str, DeviceReport]:
        """Every device that has a retained state, as a rollout reads it."""
        with self._lock:
            devices = [(d.device_id, d.status, d.state, dict(d.outcomes)) for d in self.devices.values()
                       if d.state is not None]
        reports = {}
        for device_id, status, state, outcomes in devices:
            models = {}
            for name, entry in _items(state.get("models")):
                report = model_report(entry)
                if report is not None:
                    models[str(name)] = report
            reports[device_id] = DeviceReport(
                online=(status or {}).get("state") == "online", group=_text(state.get("group"), 64),
                models=models, outcomes=outcomes)
        return reports

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per device: status, reason, per model desired/active/degraded and its last failure,
        health age in seconds."""
        now = time.monotonic()
        result = {}
        with self._lock:
            devices = sorted(self.devices.values(), key=lambda d: d.device_id)
        for device in devices:
            status = device.status or {}
            models: dict[str, dict[str, Any]] = {}
            for name, version in _items(status.get("models")):
                models[str(name)] = {"desired": None, "active": _text(version, 64), "degraded": None,
                                     "failure": None}
            for name, entry in _items((device.state or {}).get("models")):
                report = model_report(entry)
                if report is not None:
                    models[str(name)] = {"desired": report.desired, "active": report.active,
                                         "degraded": entry.get("degraded"), "failure": report.failure}
            result[device.device_id] = {
                "status": _text(status.get("state"), 64) or "unknown",
                "reason": _text(status.get("reason")),
                "group": _text((device.state or {}).get("group"), 64),
                "models": dict(sorted(models.items())),
                "health_age_s": None if device.health_received is None
                else round(now - device.health_received, 1),
                "problems": list(device.problems),
            }
        return result
