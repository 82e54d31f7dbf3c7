"""`edged-registry rollout ...`: record a rollout, pause, resume or abort it, and say where
it stands. Each change is made under the store's lock, as `serve`'s driver makes its own;
the driver (rollout_driver.py) does the waves."""

from __future__ import annotations

import time
from typing import Any

from edged.errors import EdgedError, InvalidInput, StoreError
from edged.models.manifest import check_name
from edged.registry.publisher import Publisher
from edged.registry.rollout import (
    OPEN_STATES,
    Rollout,
    RolloutFiles,
    abort,
    finish_abort,
    new_rollout,
    pause,
    resume,
)
from edged.registry.rollout_plan import parse_waves
from edged.registry.store import Target


def start_rollout(publisher: Publisher, name: str, version: str, waves: str, *, group: str | None,
                  soak_s: float, max_failures: int, report_timeout_s: float) -> Rollout:
    """Record a new rollout of a stored version; `serve` starts its first wave."""
    check_name(name)
    if group is not None:
        check_name(group, "group name")
    specs = parse_waves(waves)
    files = RolloutFiles(publisher.store.root)
    with publisher.store.lock():
        publisher.original(name, version)  # stored, not retired, with its signed release
        current = files.load(name)
        if current is not None and current.state in OPEN_STATES:
            advice = {"aborting": "wait until every device is back", "halted": "abort it first"}
            raise InvalidInput(f"{current.label()} is {current.state}; "
                               + advice.get(current.state, "abort it or let it end"))
        rollout = new_rollout(name, version, specs, group=group, soak_s=soak_s, max_failures=max_failures,
                              report_timeout_s=report_timeout_s, now=time.time())
        files.save(rollout)
        publisher.store.touch()
    return rollout


def change_rollout(publisher: Publisher, name: str, action: str, *, force: bool = False
                   ) -> tuple[Rollout, list[str]]:
    """pause, resume or abort; returns the rollout and notes for the operator. An abort
    records a rollback release of each targeted device's previous version, signed to leave
    the rollout's version (or withdraws its device release when it had none) and announces
    them; `force` ends it at once (devices not back keep their rollback releases)."""
    files, store, notes = RolloutFiles(publisher.store.root), publisher.store, []
    targets: list[Target] = []
    with store.lock():
        rollout = files.load(name)
        if rollout is None:
            raise StoreError(f"no rollout of {name}")
        if action == "pause":
            pause(rollout)
        elif action == "resume":
            resume(rollout)
        else:
            now = time.time()
            for device, previous in abort(rollout, now, force).items():
                target = Target(name, device=device)
                envelope = b""
                if previous is not None and previous != rollout.version:
                    try:
                        envelope = publisher.envelope_for(target, previous, rollback_from=rollout.version)
                    except EdgedError as exc:
                        notes.append(f"{device} cannot be sent back to {previous} ({exc}); its device "
                                     "release is withdrawn instead")
                        rollout.devices[device].returned = True
                store.set_retained(target, envelope, touch=False)
                targets.append(target)
            finish_abort(rollout, now, force)
        files.save(rollout)
        store.touch()
    publisher.announce(targets, f"the rollback releases of {rollout.label()}")
    return rollout, notes


def load_rollouts(publisher: Publisher, name: str | None) -> list[Rollout]:
    """Read without the store's lock: each file is replaced whole (a rename), so a reader sees
    the old or the new one, and a status never waits for the driver or an announcement."""
    files = RolloutFiles(publisher.store.root)
    names = [name] if name is not None else files.names()
    found = [r for r in (files.load(n) for n in names) if r is not None]
    if name is not None and not found:
        raise StoreError(f"no rollout of {name}")
    return found


def status_dict(rollout: Rollout) -> dict[str, Any]:
    """The rollout as `rollout status --json` prints it: the file's fields and per-wave counts."""
    data = rollout.model_dump(mode="json", exclude={"paused_noted"})
    data["failures"] = len(rollout.failures())
    for index, wave in enumerate(data["waves"]):
        wave["counts"] = rollout.counts(index)
    return data


def format_status(rollout: Rollout) -> str:
    audience = f"group {rollout.group}" if rollout.group else "all devices"
    lines = [f"{rollout.name} {rollout.version} to {audience}: {rollout.state}",
             f"  soak {rollout.soak_s:g} s, report timeout {rollout.report_timeout_s:g} s, "
             f"failures {len(rollout.failures())} of at most {rollout.max_failures}"]
    if rollout.reason:
        lines.append(f"  reason: {rollout.reason}")
    if rollout.planned_at is None and rollout.state == "running":
        lines.append("  waiting for `edged-registry serve` to plan the first wave")
    if rollout.skipped:
        lines.append(f"  skipped: {rollout.skipped} devices already on a newer version")
    for index, wave in enumerate(rollout.waves):
        counts = rollout.counts(index)
        where = "not started" if wave.started_at is None else (
            "soaking" if wave.settled_at is not None and index == rollout.current else
            "settled" if wave.settled_at is not None else "in progress")
        lines.append(f"  wave {index + 1} {wave.spec:>8}: {counts['devices']:>4} devices, "
                     f"{counts['targeted']} targeted, {counts['done']} done, {counts['failed']} failed, "
                     f"{counts['silent']} silent, {counts['pending']} pending ({where})")
    if rollout.state in ("aborting", "aborted"):
        back = sum(1 for r in rollout.devices.values() if r.returned)
        lost = sum(1 for r in rollout.devices.values() if r.not_returned)
        lines.append(f"  back on their previous version: {back} of {len(rollout.devices)}"
                     + (f", {lost} not returned" if lost else ""))
    for device, record in rollout.devices.items():
        if record.outcome in ("failed", "silent"):
            lines.append(f"  {device}: {record.outcome}: {record.reason}")
    return "\n".join(lines)
