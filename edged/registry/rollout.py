"""Staged rollouts: the recorded rollout and its state machine (the waves: rollout_plan.py).

No MQTT and no signing here: `step` reads what devices report (fleet.DeviceReport), moves
the rollout on and says which retained releases must change; the driver (rollout_driver.py)
signs and records them under the store's lock. The rollout itself is one JSON file,
`{root}/rollouts/{name}.json`, written atomically, so a registry restarted (or another
instance taking over) continues where the last one stopped.

States: running -> (paused <-> running) -> completed, or halted (too many failures), or
aborting -> aborted (the targeted devices sent back to their previous versions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edged.errors import InvalidInput, StoreError
from edged.fsio import atomic_write
from edged.models.manifest import check_name, is_valid_name, one_line
from edged.registry.fleet import DeviceReport
from edged.registry.rollout_plan import parse_waves as parse_waves  # re-exported: tools/fleet_sim.py
from edged.registry.rollout_plan import plan_waves
from edged.registry.rollout_plan import wave_order as wave_order  # re-exported

State = Literal["running", "paused", "halted", "completed", "aborting", "aborted"]
Outcome = Literal["pending", "done", "failed", "silent"]
OPEN_STATES = ("running", "paused", "halted", "aborting")  # a rollout that still pins devices
FAIL_EVENTS = frozenset({"update_failed", "update_refused", "update_rolled_back"})


# --- the recorded rollout ---------------------------------------------------------------------

class DeviceRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wave: int = Field(description="Index of the device's wave.")
    targeted_at: float = Field(description="When its device release was recorded (epoch seconds).")
    previous: str | None = Field(description="Its active version then: where abort sends it back.")
    outcome: Outcome = "pending"
    reason: str | None = None
    at: float | None = Field(default=None, description="When the outcome was decided.")
    returned: bool = Field(default=False, description="Aborting: back on `previous`, release withdrawn.")


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
    current: int = Field(default=-1, description="The wave started last (-1: none yet).")
    waves: list[Wave]
    devices: dict[str, DeviceRecord] = Field(default_factory=dict)
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


# --- the state machine ------------------------------------------------------------------------

@dataclass
class Changes:
    """What one step decided: releases to record, and a log line per transition."""

    target: list[str] = field(default_factory=list)  # a device release of the rollout's version
    withdraw: list[str] = field(default_factory=list)  # device releases to withdraw
    finish: bool = False  # the base release, then every device release withdrawn
    messages: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # each device done: debug lines (a fleet is large)
    changed: bool = False

    def say(self, message: str) -> None:
        self.messages.append(message)
        self.changed = True

    def note(self, message: str) -> None:
        self.details.append(message)
        self.changed = True


def judge(rollout: Rollout, device: str, report: DeviceReport | None) -> tuple[Outcome, str] | None:
    """A targeted device's outcome now, from its state and events; None: nothing decided yet.
    Done: the state says the version is active and not degraded, and, if its activation was
    seen, its probation passed (update_kept)."""
    if report is None:
        return None
    model = report.models.get(rollout.name)
    event = report.outcomes.get((rollout.name, rollout.version))
    if model is not None and model.failure and model.failure.get("version") == rollout.version:
        kind = model.failure.get("kind") or "update_failed"
        return "failed", f"{kind}: {model.failure.get('reason') or ''}".rstrip(": ")
    if event is not None and event[0] in FAIL_EVENTS:
        return "failed", f"{event[0]}: {event[1]}".rstrip(": ")
    if event is not None and event[0] == "update_activated":
        return None  # on probation: done once update_kept arrives (or, that missed, never seen)
    if model is not None and model.active == rollout.version and not model.degraded:
        return "done", "update_kept" if event is not None else "active"
    return None


def step(rollout: Rollout, fleet: dict[str, DeviceReport], now: float) -> Changes:
    """Move the rollout on by what the fleet reports now; `fleet` must be complete (the
    retained states all arrived) before the first wave is planned."""
    changes = Changes()
    if rollout.state == "aborting":
        _returning(rollout, fleet, changes)
        return changes
    if rollout.state not in ("running", "paused"):
        return changes
    if rollout.planned_at is None:
        _plan(rollout, fleet, now, changes)
        if rollout.state != "running":
            return changes
    _judge_all(rollout, fleet, now, changes)
    failures = rollout.failures()
    if len(failures) > rollout.max_failures:
        rollout.state = "halted"
        details = "; ".join(f"{d}: {rollout.devices[d].reason}" for d in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        rollout.reason = (f"{len(failures)} devices failed or were silent (max {rollout.max_failures}) "
                          f"in wave {rollout.current + 1}: {details}{more}")
        rollout.finished_at = round(now, 3)
        changes.say(f"{rollout.label()} halted: {rollout.reason}")
        return changes
    if rollout.current >= 0 and not _soaked(rollout, now, changes):
        return changes
    if rollout.state == "paused":
        if not rollout.paused_noted:
            rollout.paused_noted = True
            last = rollout.current + 1 == len(rollout.waves)
            nxt = "the base release" if last else f"wave {rollout.current + 2}"
            changes.say(f"{rollout.label()} paused: {nxt} waits for resume")
        return changes
    if rollout.current + 1 < len(rollout.waves):
        _start_wave(rollout, rollout.current + 1, fleet, now, changes)
    else:
        rollout.state = "completed"
        rollout.finished_at = round(now, 3)
        changes.finish = True
        changes.say(f"{rollout.label()} completed: {rollout.version} released to "
                    f"{'group ' + rollout.group if rollout.group else 'all devices'}; "
                    f"withdrawing {len(rollout.devices)} device releases")
    return changes


def eligible_devices(rollout: Rollout, fleet: dict[str, DeviceReport]) -> dict[str, str | None]:
    """Device id -> group of the devices whose state lists the model (in --group, if given)."""
    return {d: r.group for d, r in fleet.items()
            if rollout.name in r.models and (rollout.group is None or r.group == rollout.group)}


def _plan(rollout: Rollout, fleet: dict[str, DeviceReport], now: float, changes: Changes) -> None:
    eligible = eligible_devices(rollout, fleet)
    rollout.planned_at = round(now, 3)
    if not eligible:
        rollout.state = "halted"
        rollout.reason = f"no eligible device: none reports {rollout.name} in its state" + (
            f" in group {rollout.group}" if rollout.group else "")
        changes.say(f"{rollout.label()} halted: {rollout.reason}")
        return
    for wave, devices in zip(rollout.waves, plan_waves([w.spec for w in rollout.waves], rollout.name,
                                                      rollout.version, eligible), strict=True):
        wave.devices = devices
    sizes = ", ".join(f"{w.spec}: {len(w.devices)}" for w in rollout.waves)
    changes.say(f"{rollout.label()} planned over {len(eligible)} eligible devices ({sizes})")


def _judge_all(rollout: Rollout, fleet: dict[str, DeviceReport], now: float, changes: Changes) -> None:
    for device, record in rollout.devices.items():
        if record.outcome == "failed":
            continue
        found = judge(rollout, device, fleet.get(device))
        if found is None:
            if record.outcome == "pending" and now - record.targeted_at > rollout.report_timeout_s:
                record.outcome, record.reason, record.at = "silent", (
                    f"no report of {rollout.version} within {rollout.report_timeout_s:g} s"), round(now, 3)
                changes.say(f"{rollout.label()}: {device} is silent ({record.reason})")
            continue
        outcome, reason = found
        if outcome != record.outcome:
            record.outcome, record.reason, record.at = outcome, reason, round(now, 3)
            line = f"{rollout.label()}: {device} {outcome} ({reason})"
            if outcome == "done":
                changes.note(line)
            else:
                changes.say(line)


def _soaked(rollout: Rollout, now: float, changes: Changes) -> bool:
    wave = rollout.waves[rollout.current]
    if wave.settled_at is None:
        counts = rollout.counts(rollout.current)
        if counts["pending"]:
            return False
        wave.settled_at = round(now, 3)
        soak = f"; soaking {rollout.soak_s:g} s" if wave.devices and rollout.soak_s else ""
        changes.say(f"{rollout.label()} wave {rollout.current + 1} ({wave.spec}) settled: {counts['done']} "
                    f"done, {counts['failed']} failed, {counts['silent']} silent{soak}")
    return not wave.devices or now >= wave.settled_at + rollout.soak_s


def _start_wave(rollout: Rollout, index: int, fleet: dict[str, DeviceReport], now: float,
                changes: Changes) -> None:
    wave = rollout.waves[index]
    rollout.current, wave.started_at, rollout.paused_noted = index, round(now, 3), False
    for device in wave.devices:
        report = fleet.get(device)
        model = report.models.get(rollout.name) if report else None
        rollout.devices[device] = DeviceRecord(wave=index, targeted_at=round(now, 3),
                                               previous=model.active if model else None)
        changes.target.append(device)
    changes.say(f"{rollout.label()} wave {index + 1} of {len(rollout.waves)} ({wave.spec}) started: "
                f"{len(wave.devices)} devices")


# --- pause, resume, abort (the CLI, under the store's lock) -----------------------------------

def pause(rollout: Rollout) -> None:
    if rollout.state != "running":
        raise InvalidInput(f"{rollout.label()} is {rollout.state}, not running")
    rollout.state, rollout.paused_noted = "paused", False


def resume(rollout: Rollout) -> None:
    if rollout.state != "paused":
        raise InvalidInput(f"{rollout.label()} is {rollout.state}, not paused")
    rollout.state = "running"


def abort(rollout: Rollout, now: float) -> dict[str, str | None]:
    """Mark it aborting; returns each targeted device's previous version (None: none known),
    for the caller to record a rollback release of (or withdraw the device release)."""
    if rollout.state not in ("running", "paused", "halted"):
        raise InvalidInput(f"{rollout.label()} is {rollout.state}; only a running, paused or halted "
                           "rollout can be aborted")
    rollout.state = "aborting" if rollout.devices else "aborted"
    rollout.reason = "aborted by the operator" + (f" after: {rollout.reason}" if rollout.reason else "")
    rollout.finished_at = round(now, 3)
    back = {}
    for device, record in rollout.devices.items():
        back[device] = record.previous
        if record.previous is None or record.previous == rollout.version:
            record.returned = True  # nothing to go back to: its device release is withdrawn
    if rollout.devices and all(r.returned for r in rollout.devices.values()):
        rollout.state = "aborted"
    return back


def _returning(rollout: Rollout, fleet: dict[str, DeviceReport], changes: Changes) -> None:
    """Aborting: withdraw each rollback release once its device runs the previous version
    again and says the registry wants that (it has the rollback release); then it follows the
    group and all-device releases as before the rollout."""
    for device, record in rollout.devices.items():
        if record.returned:
            continue
        report = fleet.get(device)
        model = report.models.get(rollout.name) if report else None
        if model is not None and model.active == record.previous == model.desired:  # it saw the rollback
            record.returned = True
            changes.withdraw.append(device)
            changes.say(f"{rollout.label()}: {device} is back on {record.previous}")
    if all(r.returned for r in rollout.devices.values()):
        rollout.state = "aborted"
        changes.say(f"{rollout.label()} aborted: every targeted device is back")
