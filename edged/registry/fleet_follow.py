"""`serve` following the fleet for its rollouts: subscribe to the devices' status, state and
events, then publish a marker that arrives after the retained ones (the view is complete)."""

from __future__ import annotations

import logging

from edged.registry.connection import BrokerRefused, BrokerUnavailable, Connection
from edged.registry.fleet import FleetWatcher

log = logging.getLogger(__name__)


def follow_fleet(connection: Connection, watcher: FleetWatcher, timeout: float) -> bool:
    """Subscribe and mark; False when the broker was unavailable (try again shortly). An
    account refused the devices' topics is said once per connect: this instance cannot drive
    rollouts (its driver never takes the driver lock)."""
    states = watcher.filters(("status", "state"))
    try:
        connection.subscribe([*states, watcher.sync_topic], timeout)
    except BrokerRefused as exc:
        log.warning("rollouts cannot be driven from this instance: %s (the registry's account needs "
                    "read access to %s)", exc, ", ".join(states))
        return True
    except BrokerUnavailable as exc:
        log.error("%s; following the fleet again shortly", exc)
        return False
    try:  # without events a rollout still sees failures in the retained states
        connection.subscribe(watcher.filters(("events",)), timeout)
    except BrokerUnavailable as exc:
        log.warning("%s: rollouts judge devices by their retained state only", exc)
    try:
        connection.publish(watcher.sync_topic, watcher.mark_sync())
    except BrokerUnavailable as exc:
        log.error("%s; the fleet view is complete at the next connect", exc)
    return True
