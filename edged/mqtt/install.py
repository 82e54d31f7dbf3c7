"""One release installed: download its files, stage them in the store, load and self-test
the staged version, activate it, watch it through probation, roll back when it goes bad,
prune old versions. The update agent (`updates.py`) decides what to install and when to
try again; this does one install and raises when a step fails.

The backend the self-test ran on is the one that serves: the model manager adopts the
staged check's selection instead of probing again, so `update_tested` and
`update_activated` name the same backend.

Each file is hashed once on its way in (as its chunks arrive) and once more at the end of
probation. In between, the store keeps the proof (`ModelStore.keep_proofs`): staging links
the download in unread, and every check until then (the staged test, activation, the
load, probation's checks each second) costs a `stat` per file; a file whose stat moved is
hashed again, so a file changed under the new version still rolls it back.
"""

from __future__ import annotations

import logging
import threading
import time

from edged.config import UpdateSettings
from edged.errors import EdgedError
from edged.models.manager import ModelManager
from edged.models.store import version_key
from edged.mqtt.checks import UpdateRefused, check_served, check_staged
from edged.mqtt.reports import Reporter
from edged.mqtt.transfer import Transfer
from edged.signing import Release

log = logging.getLogger("edged.mqtt.updates")


class Installer:
    def __init__(self, settings: UpdateSettings, reporter: Reporter, manager: ModelManager,
                 transfer: Transfer, stop: threading.Event) -> None:
        self.settings = settings
        self.reporter = reporter
        self.manager = manager
        self.store = manager.store
        self.transfer = transfer
        self.stop = stop

    def install(self, release: Release) -> None:
        """Download, stage, test, activate, watch; raises on a failed step (nothing half-done stays)."""
        with self.store.keep_proofs(release.manifest.name, release.manifest.version):
            self._install(release)

    def _install(self, release: Release) -> None:
        manifest = release.manifest
        name, version = manifest.name, manifest.version
        previous = self.store.active(name) if name in self.store.names() else None
        self.reporter.event("update_started", model=name, version=version, previous=previous,
                            bytes=sum(f.size for f in manifest.files))
        staged = name in self.store.names() and version in self.store.versions(name)
        if not staged:  # else: staged before a restart; checked again below
            started = time.monotonic()
            downloads = {f.name: self.transfer.fetch(f.sha256, f.size, self.stop) for f in manifest.files}
            self.reporter.event("update_downloaded", model=name, version=version,
                                seconds=round(time.monotonic() - started, 3))
            self.store.add_verified(manifest, downloads)  # moved in: hashed as they arrived
            self.reporter.event("update_staged", model=name, version=version)
        tested = check_staged(self.manager, release)
        self.reporter.event("update_tested", model=name, version=version, backend=tested.backend,
                            selftest=release.selftest is not None)
        self.manager.adopt_selection(name, version, tested)
        self.store.activate(name, version)
        self.manager.sync()
        served = self.manager.served().get(name)
        if served is None or served.version != version:
            reason = self.manager.failures.get(name, "it did not load")
            self._roll_back(name, version, f"activation failed: {reason}")
            return
        self.reporter.event("update_activated", model=name, version=version, previous=previous,
                            backend=served.selection.backend)
        for f in manifest.files:
            self.transfer.discard(f.sha256)
        if self._probation(release):
            self.reporter.event("update_kept", model=name, version=version)
            self._prune(name)

    def _probation(self, release: Release) -> bool:
        """Watch the new version; roll back and return False when it goes bad."""
        name, version = release.manifest.name, release.manifest.version
        stats = self.manager.stats.get(name)
        errors_before = stats.backend_errors if stats else 0
        deadline = time.monotonic() + self.settings.probation_s
        while not self.stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            last = time.monotonic() >= deadline
            try:
                errors = (stats.backend_errors if stats else 0) - errors_before
                if errors >= self.settings.probation_max_errors:
                    raise UpdateRefused(f"{errors} inference errors during probation")
                check_served(self.manager, release, full=last)  # a stat per file, all bytes at the end
            except EdgedError as exc:
                self._roll_back(name, version, str(exc))
                return False
            if last:
                return True
        return True  # stopping: what is active stays; the next start serves it

    def _roll_back(self, name: str, version: str, reason: str) -> None:
        try:
            restored = self.store.rollback(name)
        except EdgedError as exc:
            log.error("updates: %s %s went bad (%s) and cannot roll back: %s", name, version, reason, exc)
            self.reporter.event("update_failed", model=name, version=version,
                                reason=f"{reason}; no rollback: {exc}")
            return
        self.manager.sync()
        log.error("updates: %s %s rolled back to %s: %s", name, version, restored, reason)
        self.reporter.event("update_rolled_back", model=name, version=version, to=restored, reason=reason)

    def _prune(self, name: str) -> None:
        """Keep `keep_versions` versions: the active one, the rollback target, the newest others."""
        keep = {self.store.active(name), *self.store.history(name)[:1]}
        versions = sorted(self.store.versions(name), key=version_key, reverse=True)
        for version in versions:
            if len(keep) >= self.settings.keep_versions:
                break
            keep.add(version)
        for version in versions:
            if version not in keep:
                self.store.remove(name, version)
                log.info("updates: removed %s %s (keeping %d versions)", name, version,
                         self.settings.keep_versions)
