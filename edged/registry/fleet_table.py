"""`edged-registry fleet`: listen for a while and print what the devices said."""

from __future__ import annotations

import time
import uuid
from typing import Any

from edged.registry.config import RegistrySettings
from edged.registry.connection import Connection
from edged.registry.fleet import FleetWatcher


def watch(settings: RegistrySettings, wait_s: float) -> dict[str, dict[str, Any]]:
    """Listen for `wait_s` seconds and summarise what the devices said."""
    watcher = FleetWatcher(settings.topic_prefix, settings.fleet_max_devices)
    connection = Connection(settings.mqtt, f"{settings.mqtt.device_id}-fleet-{uuid.uuid4().hex[:8]}")
    connection.on_message = watcher.on_message
    connection.open(settings.connect_timeout_s)
    try:
        connection.subscribe(watcher.filters(), settings.connect_timeout_s)
        time.sleep(wait_s)
    finally:
        connection.close()
    return watcher.summary()


def _failure_text(failure: dict[str, Any] | None) -> str:
    if not failure:
        return ""
    kind = str(failure.get("kind") or "failed").removeprefix("update_")
    return f"{failure.get('version')} {kind}: {failure.get('reason') or ''}".strip().rstrip(":")


def format_table(summary: dict[str, dict[str, Any]], wait_s: float) -> str:
    """One line per device and model; the device's columns only on its first line."""
    if not summary:
        return "(no devices seen)"
    rows = [("DEVICE", "STATUS", "MODEL", "DESIRED", "ACTIVE", "HEALTH", "LAST FAILURE")]
    for device_id, info in summary.items():
        status = info["status"] + (f" ({info['reason']})" if info["reason"] else "")
        age = info["health_age_s"]
        health = f"{age:.1f} s ago" if age is not None else f"none in {wait_s:g} s"
        empty = {"desired": None, "active": None, "degraded": None, "failure": None}
        models = info["models"] or {"-": empty}
        for index, (name, model) in enumerate(models.items()):
            active = str(model["active"] or "-") + (" (degraded)" if model["degraded"] else "")
            first = index == 0
            rows.append((device_id if first else "", status if first else "", name,
                         str(model["desired"] or "-"), active, health if first else "",
                         _failure_text(model.get("failure"))))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
