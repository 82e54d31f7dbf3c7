"""Staged rollouts: the state machine (the recorded rollout: rollout_files.py; the waves:
rollout_plan.py).

No MQTT and no signing here: `step` reads what devices report (fleet.DeviceReport), moves
the rollout on and says which retained releases must change; the driver (rollout_driver.py)
saves the rollout, then signs and records them, under the store's lock.

States: running -> (paused <-> running) -> completed, or halted (too many failures), or
aborting -> aborted (the targeted devices sent back to their previous versions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edged.errors import InvalidInput
from edged.registry.fleet import DeviceReport
from edged.registry.rollout_files import OPEN_STATES as OPEN_STATES  # re-exported
from edged.registry.rollout_files import DeviceRecord, Outcome, Rollout
from edged.registry.rollout_files import RolloutFiles as RolloutFiles  # re-exported
from edged.registry.rollout_files import new_rollout as new_rollout  # re-exported
from edged.registry.rollout_plan import eligible_devices, plan_waves, skipped_devices
from edged.registry.rollout_plan import parse_waves as parse_waves  # re-exported: tools/fleet_sim.py
from edged.registry.rollout_plan import wave_order as wave_order  # re-exported

# Failures that count at once; an update_failed the device retries is "retrying" (pending).
HARD_FAILURES = frozenset({"update_refused", "update_rolled_back"})
FAIL_EVENTS = HARD_FAILURES | {"update_failed"}
SELF_TEST = "self-test"  # how the device's reason for a failed self-test begins (never retried)


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


def judge(rollout: Rollout, report: DeviceReport | None, since: float) -> tuple[Outcome | str, str] | None:
    """A targeted device's outcome now, from its state and events newer than `since` (when
    it was targeted: an older failure is another attempt's); None: nothing decided yet.
    Done: the version is active and not degraded and, if its activation was seen, its
    probation passed (update_kept). "retrying": an update_failed the device tries again, still
    pending. Failed at once: refused, rolled back, or a failure it does not retry (a self-test)."""
    if report is None:
        return None
    model = report.models.get(rollout.name)
    event = report.outcomes.get((rollout.name, rollout.version))
    if event is not None and event.at < since:
        event = None
    failure = model.failure if model is not None else None
    if failure is None or failure.get("version") != rollout.version or (failure.get("at") or since) < since:
        failure = None
    if event is not None and event.kind in FAIL_EVENTS and not event.retrying:
        return "failed", f"{event.kind}: {event.reason}".rstrip(": ")
    failure = failure or {}
    kind, reason = failure.get("kind") or "update_failed", failure.get("reason") or ""
    said = f"{kind}: {reason}".rstrip(": ")
    if failure and _hard(kind, reason):
        return "failed", said
    if event is not None and event.kind == "update_activated":
        return None  # on probation: done once update_kept arrives (or, that missed, never seen)
    if model is not None and model.active == rollout.version and not model.degraded:
        return "done", "update_kept" if event is not None and event.kind == "update_kept" else "active"
    if event is not None and event.kind in FAIL_EVENTS:
        return "retrying", f"{event.kind}: {event.reason}".rstrip(": ")
    if failure:
        return "retrying", said
    return None


def _hard(kind: str, reason: str) -> bool:
    """A failure the device does not try again: the state's failure does not say whether it
    retries, so an update_failed counts at once only for a failed self-test."""
    return kind in HARD_FAILURES or reason.startswith(SELF_TEST)


def step(rollout: Rollout, fleet: dict[str, DeviceReport], now: float) -> Changes:
    """Move the rollout on by what the fleet reports now; `fleet` must be complete (the
    retained states all arrived) before the first wave is planned."""
    changes = Changes()
    if rollout.state == "aborting":
        _returning(rollout, fleet, now, changes)
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


def _plan(rollout: Rollout, fleet: dict[str, DeviceReport], now: float, changes: Changes) -> None:
    eligible = eligible_devices(rollout, fleet)
    rollout.skipped = len(skipped_devices(rollout, fleet))
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
        found = judge(rollout, fleet.get(device), record.targeted_at)
        if found is None or found[0] == "retrying":
            late = record.outcome == "pending" and now - record.targeted_at > rollout.report_timeout_s
            if late and found is not None:
                record.outcome, record.reason, record.at = "failed", (
                    f"still failing after {rollout.report_timeout_s:g} s: {found[1]}"), round(now, 3)
                changes.say(f"{rollout.label()}: {device} failed ({record.reason})")
            elif late:
                record.outcome, record.reason, record.at = "silent", (
                    f"no report of {rollout.version} within {rollout.report_timeout_s:g} s"), round(now, 3)
                changes.say(f"{rollout.label()}: {device} is silent ({record.reason})")
            elif found is not None and record.outcome == "pending" and record.reason != (
                    retrying := f"retrying: {found[1]}"):
                record.reason = retrying
                changes.note(f"{rollout.label()}: {device} {retrying}")
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
        existing = rollout.devices.get(device)  # recorded before: its previous is the true one
        rollout.devices[device] = DeviceRecord(
            wave=index, targeted_at=round(now, 3),
            previous=existing.previous if existing else model.active if model else None)
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


def abort(rollout: Rollout, now: float, force: bool = False) -> dict[str, str | None]:
    """Mark it aborting; returns each targeted device's previous version (None: none known),
    for the caller to record a rollback release of (or withdraw the device release).
    `force`: end it at once, every device not back marked not returned (its rollback release
    stays); an aborting rollout can be forced too (nothing new to record then)."""
    if force and rollout.state == "aborting":
        _end_abort(rollout, now, "abort --force")
        return {}
    if rollout.state not in ("running", "paused", "halted"):
        raise InvalidInput(f"{rollout.label()} is {rollout.state}; only a running, paused or halted "
                           "rollout can be aborted" + (" (or an aborting one with --force)"
                                                       if rollout.state == "aborting" else ""))
    rollout.state = "aborting" if rollout.devices else "aborted"
    rollout.reason = "aborted by the operator" + (f" after: {rollout.reason}" if rollout.reason else "")
    rollout.finished_at = rollout.aborted_at = round(now, 3)
    back = {}
    for device, record in rollout.devices.items():
        back[device] = record.previous
        if record.previous is None or record.previous == rollout.version:
            record.returned = True  # nothing to go back to: its device release is withdrawn
    return back


def finish_abort(rollout: Rollout, now: float, force: bool) -> None:
    """After the caller recorded the rollback releases: aborted if every device is back (or
    none needs to come back), or at once with `force`."""
    if force:
        _end_abort(rollout, now, "abort --force")
    elif all(r.returned for r in rollout.devices.values()):
        rollout.state = "aborted"


def _end_abort(rollout: Rollout, now: float, why: str) -> None:
    missing = [r for r in rollout.devices.values() if not r.returned]
    for record in missing:
        record.not_returned = True
    rollout.state, rollout.finished_at = "aborted", round(now, 3)
    if missing:
        rollout.reason = (f"{rollout.reason or 'aborted'}; {len(missing)} devices not returned ({why}): "
                          "their rollback releases stay retained")


def _returning(rollout: Rollout, fleet: dict[str, DeviceReport], now: float, changes: Changes) -> None:
    """Aborting: withdraw each rollback release once its device runs the previous version
    again and no longer wants the rollout's; then it follows the group and all-device releases
    as before. A device not back within report_timeout_s of the abort is not returned."""
    for device, record in rollout.devices.items():
        if record.returned or record.not_returned:
            continue
        report = fleet.get(device)
        model = report.models.get(rollout.name) if report else None
        if model is not None and model.active == record.previous and model.desired != rollout.version:
            record.returned = True
            changes.withdraw.append(device)
            changes.say(f"{rollout.label()}: {device} is back on {record.previous}")
    if all(r.returned for r in rollout.devices.values()):
        rollout.state, rollout.finished_at = "aborted", round(now, 3)
        changes.say(f"{rollout.label()} aborted: every targeted device is back")
    elif now - (rollout.aborted_at or rollout.finished_at or now) > rollout.report_timeout_s:
        _end_abort(rollout, now, f"not back within {rollout.report_timeout_s:g} s")
        changes.say(f"{rollout.label()} aborted: {rollout.reason}")
