"""The recorded rollout and its file, `{root}/rollouts/{name}.json`, one per model.

Everything the driver decided is here, so a registry restarted (or another instance taking
over) continues where the last one stopped; the file is replaced whole (atomically), so a
reader without the store's lock sees the old or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edged.errors import InvalidInput, StoreError
from edged.fsio import atomic_write
from edged.models.manifest import check_name, is_valid_name, one_line

State = Literal["running", "paused", "halted", "completed", "aborting", "aborted"]
Outcome = Literal["pending", "done", "failed", "silent"]
OPEN_STATES = ("running", "paused", "halted", "aborting")  # a rollout that still pins devices


class DeviceRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wave: int = Field(description="Index of the device's wave.")
    targeted_at: float = Field(description="When its device release was recorded (epoch seconds).")
    previous: str | None = Field(description="Its active version then: where abort sends it back.")
    outcome: Outcome = "pending"
    reason: str | None = None
    at: float | None = Field(default=None, description="When the outcome was decided.")
    returned: bool = Field(default=False, description="Aborting: back on `previous`, release withdrawn.")
    not_returned: bool = Field(default=False, description="Aborting: not back within report_timeout_s "
                               "(or abort --force); its rollback release stays retained.")


class Wave(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: str
    devices: list[str] = Field(default_factory=list)
    started_at: float | None = None
    settled_at: float | None = Field(default=None, description="Every device done or failed: soak from here.")


class Rollout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    group: str | None = None
    soak_s: float = Field(ge=0)
    max_failures: int = Field(ge=0)
    report_timeout_s: float = Field(gt=0)
    state: State = "running"
    reason: str | None = Field(default=None, description="Why it halted or was aborted.")
    created_at: float
    planned_at: float | None = None
    finished_at: float | None = None
    aborted_at: float | None = Field(default=None, description="When abort was asked: returns time out "
                                     "report_timeout_s later.")
    current: int = Field(default=-1, description="The wave started last (-1: none yet).")
    waves: list[Wave]
    devices: dict[str, DeviceRecord] = Field(default_factory=dict)
    skipped: int = Field(default=0, description="Devices listing the model already on a newer version.")
    paused_noted: bool = False  # the driver said once that a wave waits for resume

    def failures(self) -> list[str]:
        return [d for d, r in self.devices.items() if r.outcome in ("failed", "silent")]

    def counts(self, wave: int) -> dict[str, int]:
        counts = {"devices": len(self.waves[wave].devices), "targeted": 0, "pending": 0, "done": 0,
                  "failed": 0, "silent": 0}
        for record in self.devices.values():
            if record.wave == wave:
                counts["targeted"] += 1
                counts[record.outcome] += 1
        return counts

    def label(self) -> str:
        return f"rollout {self.name} {self.version}"


def new_rollout(name: str, version: str, specs: list[str], *, group: str | None, soak_s: float,
                max_failures: int, report_timeout_s: float, now: float) -> Rollout:
    return Rollout(name=name, version=version, group=group, soak_s=soak_s, max_failures=max_failures,
                   report_timeout_s=report_timeout_s, created_at=round(now, 3),
                   waves=[Wave(spec=spec) for spec in specs])


class RolloutFiles:
    """`{root}/rollouts/{name}.json`, one per model; callers hold the store's lock."""

    def __init__(self, root: Path) -> None:
        self.directory = Path(root) / "rollouts"

    def path(self, name: str) -> Path:
        check_name(name)
        return self.directory / f"{name}.json"

    def load(self, name: str) -> Rollout | None:
        try:
            text = self.path(name).read_text()
        except FileNotFoundError:
            return None
        try:
            return Rollout.model_validate_json(text)
        except ValidationError as exc:
            raise StoreError(f"{self.path(name)} is damaged: {one_line(exc)}") from None

    def save(self, rollout: Rollout) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(rollout.name), json.dumps(rollout.model_dump(mode="json"), indent=1).encode())

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.json") if is_valid_name(p.stem))


def refuse_base_release(root: Path, name: str, group: str | None) -> None:
    """publish/promote to the base target of an open rollout would race its completion (which
    retains the rollout's version there): refused until the rollout ends."""
    rollout = RolloutFiles(root).load(name)
    if rollout is not None and rollout.state in OPEN_STATES and rollout.group == group:
        where = f"group {group}" if group else "all devices"
        raise InvalidInput(f"{rollout.label()} is {rollout.state} and releases {name} to {where} when it "
                           "completes; abort it (or let it end) before publishing or promoting there")
