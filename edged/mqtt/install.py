"""One release installed: download its files, stage them in the store, load and self-test
the staged version, activate it, watch it through probation, roll back when it goes bad,
prune old versions. The update agent (`updates.py`) decides what to install and when to
try again; this does one install and raises when a step fails.

The staged version is loaded once: the control service's `trial_load` runs the
self-test on that load and hands it to the model manager, which serves it as it is once
the version is activated (no second load or probe), so `update_tested` and
`update_activated` name the same backend. Whatever ends the install before the activation
has taken that load (a step that raises, a stop) closes it (`Control.drop_trial`).

Each file is hashed once on its way in (as its chunks arrive) and once more at the end of
probation. In between, the store keeps the proof (`ModelStore.keep_proofs`): staging moves
the download in unread, and every check until then (the staged test, activation, the
load, probation's checks each second) costs a `stat` per file; a file whose stat moved is
hashed again, so a file changed under the new version still rolls it back.

A rollback release (signed for one device, docs/updates.md) of a version the store still
holds, with the very files it names, is activated from the store: its files are hashed
once, and it is served again without a download, a self-test or probation (it served
before); `update_started`, `update_activated` and `update_kept` say `rollback: true`.

A stop during probation ends it with no event: the version stays active, but it was not
watched to the end, so `update_kept` would be a lie. The next start serves it as the
active version and does not watch it again (docs/updates.md, "On the device").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from edged.config import UpdateSettings
from edged.control import Control, NotServing
from edged.errors import EdgedError
from edged.models.manifest import Manifest
from edged.models.store import version_key
from edged.mqtt.checks import UpdateRefused, check_served, check_staged
from edged.mqtt.transfer import Transfer
from edged.signing import Release

log = logging.getLogger("edged.mqtt.updates")
Event = Callable[..., int]  # Reporter.event: kind, then the event's fields
Probation = Literal["kept", "rolled back", "interrupted"]


class Installer:
    def __init__(self, settings: UpdateSettings, control: Control, transfer: Transfer,
                 stop: threading.Event, event: Event) -> None:
        self.settings = settings
        self.control = control
        self.transfer = transfer
        self.stop = stop
        self.event = event

    def install(self, release: Release) -> None:
        """Download, stage, test, activate, watch; raises on a failed step (nothing half-done stays)."""
        with self.control.keep_proofs(release.manifest.name, release.manifest.version):
            if self.from_store(release) and self._reactivate(release):
                return
            self._install(release)

    def from_store(self, release: Release) -> bool:
        """A rollback to an older version than the active one that the store still holds."""
        name, version = release.manifest.name, release.manifest.version
        active = self.control.active(name)
        return (release.rollback and active is not None and version_key(version) < version_key(active)
                and self.control.has(name, version))

    def _reactivate(self, release: Release) -> bool:
        """Serve the store's copy again; False (the copy removed) when it is not the
        release's or does not verify: then it is installed as any other."""
        name, version = release.manifest.name, release.manifest.version
        wanted = {(f.name, f.sha256, f.size) for f in release.manifest.files}
        try:
            stored = Manifest.from_json(self.control.version_file(name, version, "manifest.json")
                                        .read_bytes())
            if {(f.name, f.sha256, f.size) for f in stored.files} != wanted:
                raise UpdateRefused("its files are not the release's")
            self.control.verify(name, version, full=True)  # proved once: activation checks a stat
        except (EdgedError, OSError) as exc:
            log.warning("updates: %s %s in the store cannot be rolled back to (%s); downloading it again",
                        name, version, exc)
            self.control.remove(name, version)
            return False
        previous = self.control.active(name)
        self.event("update_started", model=name, version=version, previous=previous, bytes=0, rollback=True)
        try:
            serving = self.control.activate(name, version)
        except NotServing as exc:
            self._roll_back(name, version, f"activation failed: {exc.reason}")
            return True
        self.event("update_activated", model=name, version=version, previous=previous,
                   backend=serving.backend, rollback=True)
        self.event("update_kept", model=name, version=version, rollback=True)
        return True

    def _install(self, release: Release) -> None:
        manifest = release.manifest
        name, version = manifest.name, manifest.version
        previous = self.control.active(name)
        self.event("update_started", model=name, version=version, previous=previous,
                   bytes=sum(f.size for f in manifest.files))
        if not self.control.has(name, version):  # else: staged before a restart; checked again below
            started = time.monotonic()
            downloads = {f.name: self.transfer.fetch(f.sha256, f.size, self.stop) for f in manifest.files}
            self.event("update_downloaded", model=name, version=version,
                       seconds=round(time.monotonic() - started, 3))
            self.control.stage(manifest, downloads)  # moved in: hashed as they arrived
            self.event("update_staged", model=name, version=version)
        tested = check_staged(self.control, release)  # loaded once: this load is what serves
        try:
            self.event("update_tested", model=name, version=version, backend=tested.backend,
                       selftest=release.selftest is not None)
            serving = self.control.activate(name, version)
        except NotServing as exc:
            self._roll_back(name, version, f"activation failed: {exc.reason}")
            return
        finally:  # a trial load no activation took (a step failed, or it served already) is closed
            self.control.drop_trial(name, version)
        self.event("update_activated", model=name, version=version, previous=previous,
                   backend=serving.backend)
        for f in manifest.files:
            self.transfer.discard(f.sha256)
        outcome = self._probation(release)
        if outcome == "interrupted":
            log.info("updates: %s %s stays active; its probation was cut short by the shutdown "
                     "(no update_kept)", name, version)
        elif outcome == "kept":
            self.event("update_kept", model=name, version=version)
            for removed in self.control.prune(name, self.settings.keep_versions):
                log.info("updates: removed %s %s (keeping %d versions)", name, removed,
                         self.settings.keep_versions)

    def _probation(self, release: Release) -> Probation:
        """Watch the new version; roll back when it goes bad. "interrupted": stopping."""
        name, version = release.manifest.name, release.manifest.version
        errors_before = self.control.backend_errors(name)
        deadline = time.monotonic() + self.settings.probation_s
        while not self.stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            last = time.monotonic() >= deadline
            try:
                errors = self.control.backend_errors(name) - errors_before
                if errors >= self.settings.probation_max_errors:
                    raise UpdateRefused(f"{errors} inference errors during probation")
                check_served(self.control, release, full=last)  # a stat per file, all bytes at the end
            except EdgedError as exc:
                self._roll_back(name, version, str(exc))
                return "rolled back"
            if last:
                return "kept"
        return "interrupted"  # what is active stays; the next start serves it

    def _roll_back(self, name: str, version: str, reason: str) -> None:
        try:
            restored = self.control.rollback(name).version
        except NotServing as exc:  # rolled back in the store; its failure is an event of its own
            restored = exc.version
        except EdgedError as exc:
            log.error("updates: %s %s went bad (%s) and cannot roll back: %s", name, version, reason, exc)
            self.event("update_failed", model=name, version=version, reason=f"{reason}; no rollback: {exc}")
            return
        log.error("updates: %s %s rolled back to %s: %s", name, version, restored, reason)
        self.event("update_rolled_back", model=name, version=version, to=restored, reason=reason)
