"""The thread in `serve` that drives the store's rollouts (rollout.py), one instance at a time.

Every instance runs one, but only the holder of `{root}/rollouts/.driver` (an `flock`)
drives; the others try again each tick, so when the driving instance dies another takes
over. The lock is taken only while the instance can drive (connected, the fleet's retained
states arrived) and given up after NOT_READY_TICKS ticks without that, so an instance cut
off from the broker, or whose account cannot read the devices, does not hold it for ever.
Each step reads the rollout, decides, writes the rollout back and then records the releases
it needs, all under the store's lock; `serve`'s main loop then announces the changes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

from edged.errors import EdgedError
from edged.registry.fleet import FleetWatcher
from edged.registry.publisher import Publisher
from edged.registry.rollout import Rollout, RolloutFiles, step
from edged.registry.rollout_records import reconcile, record_changes
from edged.registry.store import RegistryStore

log = logging.getLogger(__name__)
DRIVER_LOCK = ".driver"
DONE_STATES = ("completed", "aborted", "halted")  # nothing to drive (until an abort of a halted one)
NOT_READY_TICKS = 3  # ticks unable to drive before the lock is given up for another instance


class RolloutDriver:
    def __init__(self, store: RegistryStore, publisher: Publisher, watcher: FleetWatcher, tick_s: float,
                 ready: Callable[[], bool], on_change: Callable[[], None]) -> None:
        """`ready()`: connected and the fleet's retained states all arrived; `on_change()`:
        the store changed (serve announces at once rather than at its next look)."""
        self.store = store
        self.publisher = publisher
        self.watcher = watcher
        self.files = RolloutFiles(store.root)
        self.tick_s = tick_s
        self.ready = ready
        self.on_change = on_change
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._last_error = ""
        self._not_ready = 0
        self._reconciled: set[str] = set()  # rollouts checked against the store since taking the lock

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._give_up()

    def _give_up(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._reconciled.clear()

    @property
    def driving(self) -> bool:
        return self._fd is not None

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
                self._last_error = ""
            except Exception as exc:  # a damaged file or a full disk: say so once, keep trying
                message = f"driving rollouts failed: {exc}"
                if message != self._last_error:
                    log.error("%s", message, exc_info=not isinstance(exc, EdgedError | OSError))
                self._last_error = message

    def _take(self) -> bool:
        if self._fd is not None:
            return True
        self.files.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.files.directory / DRIVER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        log.info("driving the rollouts of %s (pid %d)", self.store.root, os.getpid())
        return True

    def tick(self, now: float | None = None) -> None:
        """One look at every rollout, if the fleet view is complete and this instance drives."""
        if not self.ready():
            self._not_ready += 1
            if self._fd is not None and self._not_ready >= NOT_READY_TICKS:
                log.warning("giving up driving the rollouts of %s: no complete view of the fleet for %d "
                            "ticks (disconnected, or the account cannot read the devices)",
                            self.store.root, self._not_ready)
                self._give_up()
            return
        self._not_ready = 0
        if not self._take():
            return
        for name in self.files.names():
            self.advance(name, time.time() if now is None else now)

    def advance(self, name: str, now: float) -> Rollout | None:
        peek = self.files.load(name)  # files are replaced whole: no lock needed to look
        if peek is not None and name not in self._reconciled:
            self._reconcile(name)
        if peek is None or peek.state in DONE_STATES:
            return peek
        reports = self.watcher.reports()  # before the lock: a large fleet takes a moment
        with self.store.lock():
            rollout = self.files.load(name)
            if rollout is None or rollout.state in DONE_STATES:
                return rollout
            changes = step(rollout, reports, now)
            if not changes.changed:
                return rollout
            self.files.save(rollout)  # first: a release written is always one the file knows
            try:
                record_changes(self.publisher, rollout, changes)
            except (EdgedError, OSError) as exc:  # the version retired meanwhile, a full disk
                rollout.state, rollout.reason = "halted", f"cannot record its releases: {exc}"
                changes.messages.append(f"{rollout.label()} halted: {rollout.reason}")
                self.files.save(rollout)
        for detail in changes.details:
            log.debug("%s", detail)
        for message in changes.messages:
            log.info("%s", message)
        self.on_change()
        return rollout

    def _reconcile(self, name: str) -> None:
        """Once per rollout after taking the lock: record what a crash left out of the store."""
        with self.store.lock():
            rollout = self.files.load(name)
            if rollout is not None:
                changes = reconcile(self.publisher, rollout)
                if changes.changed:
                    record_changes(self.publisher, rollout, changes)
                    for message in changes.messages:
                        log.warning("%s", message)
                    self.on_change()
        self._reconciled.add(name)
