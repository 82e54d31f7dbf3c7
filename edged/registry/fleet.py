"""`edged-registry fleet`: every device the broker knows of, as the devices report themselves.

Status and state are retained, so they arrive at once; health reports are not, so a
device's health age is known only if it reported during the `--wait` window (make the
window longer than the devices' `health_interval_s` to hear from all of them).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from edged.registry.config import RegistrySettings
from edged.registry.connection import Connection
from edged.topics import Topics

KINDS = ("status", "state", "health")


@dataclass
class Device:
    device_id: str
    status: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    health_received: float | None = None  # time.monotonic() of the last health report
    problems: list[str] = field(default_factory=list)


class FleetWatcher:
    """Records the status, state and health messages of every device, thread-safely."""

    def __init__(self, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.devices_root = f"{prefix}/devices/"
        self.devices: dict[str, Device] = {}
        self._lock = threading.Lock()

    def filters(self) -> list[str]:
        return [self.topics.of_device(kind) for kind in KINDS]

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        rest = message.topic.removeprefix(self.devices_root)
        device_id, _, kind = rest.partition("/")
        if kind not in KINDS or not device_id:
            return
        document: dict[str, Any] | None = None
        if message.payload:
            try:
                parsed = json.loads(message.payload)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                with self._lock:
                    self._device(device_id).problems.append(f"{kind} is not a JSON object")
                return
            document = parsed
        with self._lock:
            device = self._device(device_id)
            if kind == "health":
                device.health_received = time.monotonic()
            else:
                setattr(device, kind, document)  # an empty retained message clears it

    def _device(self, device_id: str) -> Device:
        return self.devices.setdefault(device_id, Device(device_id))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per device: status, reason, per model desired/active/degraded, health age in seconds."""
        now = time.monotonic()
        result = {}
        with self._lock:
            devices = sorted(self.devices.values(), key=lambda d: d.device_id)
        for device in devices:
            status = device.status or {}
            models: dict[str, dict[str, Any]] = {}
            for name, version in (status.get("models") or {}).items():
                models[str(name)] = {"desired": None, "active": version, "degraded": None}
            for name, entry in ((device.state or {}).get("models") or {}).items():
                if isinstance(entry, dict):
                    models[str(name)] = {"desired": entry.get("desired"), "active": entry.get("active"),
                                         "degraded": entry.get("degraded")}
            result[device.device_id] = {
                "status": status.get("state", "unknown"),
                "reason": status.get("reason"),
                "models": dict(sorted(models.items())),
                "health_age_s": None if device.health_received is None
                else round(now - device.health_received, 1),
                "problems": device.problems,
            }
        return result


def watch(settings: RegistrySettings, wait_s: float) -> dict[str, dict[str, Any]]:
    """Listen for `wait_s` seconds and summarise what the devices said."""
    watcher = FleetWatcher(settings.topic_prefix)
    connection = Connection(settings.mqtt, f"{settings.mqtt.device_id}-fleet-{uuid.uuid4().hex[:8]}")
    connection.on_message = watcher.on_message
    connection.open(settings.connect_timeout_s)
    try:
        connection.subscribe(watcher.filters(), settings.connect_timeout_s)
        time.sleep(wait_s)
    finally:
        connection.close()
    return watcher.summary()


def format_table(summary: dict[str, dict[str, Any]], wait_s: float) -> str:
    """One line per device and model; the device's columns only on its first line."""
    if not summary:
        return "(no devices seen)"
    rows = [("DEVICE", "STATUS", "MODEL", "DESIRED", "ACTIVE", "HEALTH")]
    for device_id, info in summary.items():
        status = info["status"] + (f" ({info['reason']})" if info["reason"] else "")
        age = info["health_age_s"]
        health = f"{age:.1f} s ago" if age is not None else f"none in {wait_s:g} s"
        models = info["models"] or {"-": {"desired": None, "active": None, "degraded": None}}
        for index, (name, model) in enumerate(models.items()):
            active = str(model["active"] or "-") + (" (degraded)" if model["degraded"] else "")
            first = index == 0
            rows.append((device_id if first else "", status if first else "", name,
                         str(model["desired"] or "-"), active, health if first else ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
