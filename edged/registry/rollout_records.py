"""The releases a rollout's step asks for, signed and recorded in the store; and, when a
driver takes a rollout over, the store put back in line with the rollout's file.

The driver saves the rollout before it records releases, so a crash in between leaves
releases missing (recorded again here) rather than releases the file does not know (which
would make abort read the wrong previous version); device releases of the model that the
rollout does not know (an older registry's crash) are withdrawn.
"""

from __future__ import annotations

import logging

from edged.models.store import version_key
from edged.registry.publisher import Publisher, release_version
from edged.registry.rollout import Changes, Rollout
from edged.registry.store import Target

log = logging.getLogger(__name__)


def record_changes(publisher: Publisher, rollout: Rollout, changes: Changes) -> None:
    """Sign and record in the store the releases a step asked for (the caller holds the lock)."""
    store, name = publisher.store, rollout.name
    original = publisher.original(name, rollout.version) if changes.target or changes.finish else None
    try:
        for device in changes.target:
            target = Target(name, device=device)
            store.set_retained(target, publisher.envelope_for(target, rollout.version, original=original),
                               touch=False)
        for device in changes.withdraw:
            store.set_retained(Target(name, device=device), b"", touch=False)
        if changes.finish:
            base = Target(name, rollout.group)
            held = release_version(store.retained_for(base) or b"")
            if held is not None and version_key(held) > version_key(rollout.version):
                changes.messages.append(f"{rollout.label()}: {base.describe()} already holds {held}, newer; "
                                        "left as it is (only the device releases are withdrawn)")
            else:
                store.set_retained(base, publisher.envelope_for(base, rollout.version, original=original),
                                   touch=False)
            for device in rollout.devices:
                store.set_retained(Target(name, device=device), b"", touch=False)
    finally:
        store.touch()


def reconcile(publisher: Publisher, rollout: Rollout) -> Changes:
    """What the store lacks or has too many of for this rollout (the caller holds the lock
    and records the result with record_changes)."""
    changes = Changes()
    recorded = {t.device: e for t, e in publisher.store.retained().items()
                if t.name == rollout.name and t.device is not None and e}
    for device in recorded.keys() - rollout.devices.keys():
        changes.withdraw.append(device)
    if rollout.state in ("running", "paused", "halted"):
        changes.target = [d for d in rollout.devices if d not in recorded]
    elif rollout.state == "completed":
        # The base release is written first, then the device releases withdrawn: one left over
        # means the finish was cut short (a later promote of the base is the operator's).
        changes.finish = bool(recorded.keys() & rollout.devices.keys())
    if changes.target or changes.withdraw or changes.finish:
        changes.say(f"{rollout.label()}: the store put back in line with the rollout's file: "
                    f"{len(changes.target)} device releases recorded again, {len(changes.withdraw)} unknown "
                    f"ones withdrawn{', the final release recorded again' if changes.finish else ''}")
    return changes
