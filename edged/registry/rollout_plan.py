"""The waves of a rollout: which devices are eligible, which of them each wave takes,
reproducibly.

Plain functions, so that a simulator or a test can put chosen devices in chosen waves:
percentage waves take devices in `wave_order`, group waves take a group's devices.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable

from edged.errors import InvalidInput
from edged.models.manifest import check_name
from edged.models.store import version_key
from edged.registry.fleet import DeviceReport
from edged.registry.rollout_files import Rollout

PERCENT = re.compile(r"^(\d{1,3}(?:\.\d{1,3})?)%$")
MAX_WAVES = 32


def wave_order(name: str, version: str, device_ids: Iterable[str]) -> list[str]:
    """The devices in the order percentage waves take them: by sha256 of
    "{name}/{version}/{device_id}", so each rollout takes a different, reproducible sample."""
    return sorted(device_ids, key=lambda d: (hashlib.sha256(f"{name}/{version}/{d}".encode()).digest(), d))


def parse_waves(text: str) -> list[str]:
    """`1%,10%,50%,100%` (increasing, the last 100%) or `canary,site-a,site-b` (group names)."""
    waves = [w.strip() for w in text.split(",") if w.strip()]
    if not waves or len(waves) > MAX_WAVES:
        raise InvalidInput(f"--waves takes 1 to {MAX_WAVES} waves, comma-separated")
    percents = [PERCENT.match(w) for w in waves]
    if all(percents):
        values = [float(m[1]) for m in percents if m]
        if any(not 0 < v <= 100 for v in values) or values != sorted(set(values)) or values[-1] != 100:
            raise InvalidInput("percentage waves must increase, each above 0%, and end at 100%")
        return waves
    if any(percents):
        raise InvalidInput("--waves takes either percentages or group names, not both")
    for wave in waves:
        check_name(wave, "group name")
    if len(set(waves)) != len(waves):
        raise InvalidInput("a group is named twice in --waves")
    return waves


def plan_waves(specs: list[str], name: str, version: str, eligible: dict[str, str | None]) -> list[list[str]]:
    """The devices of each wave. `eligible`: device id -> its group. Percentage wave k takes
    the first ceil(p_k x N) devices in wave_order (those before are earlier waves'); a named
    wave takes the devices of that group."""
    order = wave_order(name, version, eligible)
    if not specs[0].endswith("%"):
        return [[d for d in order if eligible[d] == group] for group in specs]
    waves, taken = [], 0
    for spec in specs:
        upto = min(len(order), math.ceil(float(spec[:-1]) / 100 * len(order) - 1e-9))
        waves.append(order[taken:upto])
        taken = max(taken, upto)
    return waves


def eligible_devices(rollout: Rollout, fleet: dict[str, DeviceReport]) -> dict[str, str | None]:
    """Device id -> group of the devices whose state lists the model with a desired or active
    version (in --group, if given), not already on a newer version than the rollout's."""
    return {d: r.group for d, r in fleet.items()
            if _follows(rollout, r) and not _newer(rollout, r)}


def skipped_devices(rollout: Rollout, fleet: dict[str, DeviceReport]) -> list[str]:
    """Devices that would be eligible but already run a newer version: never targeted."""
    return [d for d, r in fleet.items() if _follows(rollout, r) and _newer(rollout, r)]


def _follows(rollout: Rollout, report: DeviceReport) -> bool:
    model = report.models.get(rollout.name)
    return (model is not None and (model.desired or model.active) is not None
            and (rollout.group is None or report.group == rollout.group))


def _newer(rollout: Rollout, report: DeviceReport) -> bool:
    active = report.models[rollout.name].active
    return active is not None and version_key(active) > version_key(rollout.version)
