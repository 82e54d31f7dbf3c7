"""The health document: one set of figures for `GET /v2/edged/status`, `edged status`
and the MQTT health reports, so the three never disagree.

Transports add their own sections (`api`, `mqtt`) through `sections`; this module
imports none of them. System figures come from /proc and /sys, read directly: a
few small files, no extra dependency.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edged import __version__
from edged.models.manager import ModelManager

log = logging.getLogger(__name__)
THERMAL = Path("/sys/class/thermal")


class Health:
    def __init__(self, manager: ModelManager, store_root: Path) -> None:
        self.manager = manager
        self.store_root = store_root
        self.started = time.time()
        self.sections: dict[str, Callable[[], dict[str, Any]]] = {}  # e.g. "pipelines", "api", "mqtt"
        # What else readiness needs beyond loaded models (e.g. the API: its socket reachable).
        self.ready_checks: list[Callable[[], bool]] = []
        self._cpu = CpuMeter()

    def document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "version": __version__,
            "started_at": round(self.started, 3),
            "uptime_s": round(time.time() - self.started, 3),
            "ready": self.ready(),
            "models": self.manager.status(),
        }
        for name, section in list(self.sections.items()):
            try:
                document[name] = section()
            except Exception as exc:  # a broken section must not hide the others
                log.exception("health section %s failed", name)
                document[name] = {"error": f"{type(exc).__name__}: {exc}"}
        document["system"] = self.system()
        return document

    def ready(self) -> bool:
        return self.manager.ready() and all(check() for check in self.ready_checks)

    def system(self) -> dict[str, Any]:
        return {
            "cpu_percent": self._cpu.percent(),
            "load_1m": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
            "memory_rss_bytes": rss_bytes(),
            "memory_available_bytes": meminfo().get("MemAvailable"),
            "temperatures_c": temperatures(),
            "store_free_bytes": free_bytes(self.store_root),
        }


class CpuMeter:
    """This process's CPU use since the previous reading, in % of one core."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), _cpu_seconds())

    def percent(self) -> float:
        now, cpu = time.monotonic(), _cpu_seconds()
        (then, before), self._last = self._last, (now, cpu)
        return round(100.0 * (cpu - before) / max(now - then, 1e-6), 1)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return values


def temperatures(root: Path = THERMAL) -> dict[str, float]:
    """Each thermal zone's temperature, by its type (e.g. "cpu-thermal": 51.2); {} when there are none."""
    found: dict[str, float] = {}
    for zone in sorted(root.glob("thermal_zone*")) if root.is_dir() else []:
        try:
            kind = (zone / "type").read_text().strip() or zone.name
            found[kind if kind not in found else f"{kind}.{zone.name}"] = round(
                int((zone / "temp").read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):  # zones that cannot be read (disabled sensors) are left out
            continue
    return found


def free_bytes(path: Path) -> int | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
