"""The device's update agent: follow the registry's releases and switch to them safely.

For each signed release that arrives (docs/updates.md): verify it before anything else
(signature against a pinned key, expiry, group, names, version, sizes, disk space), pull
its files in chunks (resumable, `transfer.py`), stage them in the store (which checks
every hash again), load the version and run its self-test, and only then activate it;
the model manager hot-swaps it with no failed request. For `probation_s` afterwards the
agent watches the new version (errors, its files, the self-test through the served
path) and rolls back to the previous version when it goes bad. Every step is an event.

Releases are handled one at a time on the agent's own thread, in arrival order.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edged.backends.selection import select
from edged.config import UpdateSettings
from edged.errors import EdgedError
from edged.models.manager import ModelManager
from edged.models.store import version_key
from edged.models.validation import validate_inputs
from edged.mqtt.reports import Reporter
from edged.mqtt.transfer import Transfer
from edged.signing import Release, key_id, load_public_key, verify_envelope

log = logging.getLogger(__name__)
MAX_RELEASE_BYTES = 1 << 20
REMEMBERED = 1024
DISK_MARGIN = 64 << 20


class UpdateRefused(EdgedError):
    """A release that will not be installed; the message is the reason."""


class UpdateAgent:
    def __init__(self, settings: UpdateSettings, reporter: Reporter, manager: ModelManager) -> None:
        self.settings = settings
        self.reporter = reporter
        self.link = reporter.link
        self.manager = manager
        self.store = manager.store
        self.trusted = {}
        for text in settings.public_keys:
            public = load_public_key(text)
            self.trusted[key_id(public)] = public
        self.transfer = Transfer(self.link, settings.download_dir, chunk_bytes=settings.chunk_bytes,
                                 window=settings.window, timeout_s=settings.chunk_timeout_s,
                                 retries=settings.chunk_retries)
        prefix = self.link.topics.prefix
        self.topics = [f"{prefix}/registry/models/+"]
        if settings.group:
            self.topics.append(f"{prefix}/registry/groups/{settings.group}/models/+")
        self._seen: dict[bytes, None] = {}  # releases handled (by signature), oldest first
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="mqtt-updates", daemon=True)

    def start(self) -> None:
        self.transfer.start()
        for topic in self.topics:
            self.link.subscribe(topic, self._receive)
        self._thread.start()
        log.info("updates: following %s with %d trusted key(s)", ", ".join(self.topics), len(self.trusted))

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=10)

    def _receive(self, message: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            log.warning("updates: too many releases waiting; %s dropped (it is retained: it comes back "
                        "on the next connect)", message.topic)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            topic, payload = item
            try:
                self.handle(topic, payload)
            except Exception:  # a bug must not end the agent; the next release is tried
                log.exception("updates: handling %s failed", topic)

    # --- one release ----------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        name, group = self._topic_parts(topic)
        if not payload:
            log.info("updates: the release of %s was withdrawn", name)
            self.reporter.desired.pop(name, None)
            return
        key = hashlib.sha256(payload).digest()
        if key in self._seen:
            return
        self._seen[key] = None
        while len(self._seen) > REMEMBERED:
            del self._seen[next(iter(self._seen))]
        try:
            release = self._verify(name, group, payload)
        except UpdateRefused as exc:
            log.warning("updates: %s refused: %s", name, exc)
            self.reporter.event("update_refused", model=name, reason=str(exc))
            return
        if release is None:
            return
        version = release.manifest.version
        self.reporter.desired[name] = version
        self.reporter.publish_state()
        try:
            self._install(release)
        except EdgedError as exc:
            if self._stop.is_set():  # shutting down: the download resumes at the next start
                log.info("updates: %s %s paused by the shutdown", name, version)
                return
            log.error("updates: %s %s not installed: %s", name, version, exc)
            self.reporter.event("update_failed", model=name, version=version, reason=str(exc))

    def _topic_parts(self, topic: str) -> tuple[str, str | None]:
        parts = topic.split("/")
        return parts[-1], (parts[-3] if "/groups/" in topic else None)

    def _verify(self, name: str, group: str | None, payload: bytes) -> Release | None:
        """The release, checked; None when there is nothing to do (already active)."""
        try:
            release = Release.parse(verify_envelope(payload, self.trusted, MAX_RELEASE_BYTES))
        except EdgedError as exc:
            raise UpdateRefused(str(exc)) from None
        manifest = release.manifest
        if manifest.name != name:
            raise UpdateRefused(f"release of {manifest.name!r} on the topic of {name!r}")
        if release.group != group:
            raise UpdateRefused(f"release signed for group {release.group!r}, received for {group!r}")
        if release.expires_at < time.time():
            raise UpdateRefused(f"release {manifest.version} expired at {time.ctime(release.expires_at)}")
        if self.settings.models and name not in self.settings.models:
            return None
        active = self.store.active(name) if name in self.store.names() else None
        if active == manifest.version:
            return None
        if active is not None and version_key(manifest.version) < version_key(active):
            raise UpdateRefused(f"version {manifest.version} is older than the active {active} "
                                f"(roll back with the models.rollback command)")
        total = sum(f.size for f in manifest.files)
        if total > self.settings.max_model_bytes:
            raise UpdateRefused(f"{total} bytes is over the {self.settings.max_model_bytes} byte limit")
        self.settings.download_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        free = shutil.disk_usage(self.settings.download_dir).free
        if free < 2 * total + DISK_MARGIN:
            raise UpdateRefused(f"not enough disk: {2 * total + DISK_MARGIN} bytes needed, {free} free")
        return release

    def _install(self, release: Release) -> None:
        manifest = release.manifest
        name, version = manifest.name, manifest.version
        previous = self.store.active(name) if name in self.store.names() else None
        self.reporter.event("update_started", model=name, version=version, previous=previous,
                            bytes=sum(f.size for f in manifest.files))
        staged = name in self.store.names() and version in self.store.versions(name)
        if not staged:  # else: staged before a restart; checked again below
            started = time.monotonic()
            paths = {f.name: self.transfer.fetch(f.sha256, f.size, self._stop) for f in manifest.files}
            self.reporter.event("update_downloaded", model=name, version=version,
                                seconds=round(time.monotonic() - started, 3))
            self._stage(release, paths)
        self._self_test_staged(release)
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

    def _stage(self, release: Release, paths: dict[str, Path]) -> None:
        """Into the store under the manifest's own file names (the store hashes them again)."""
        manifest = release.manifest
        with tempfile.TemporaryDirectory(dir=self.settings.download_dir) as scratch:
            named = []
            for file_name, path in paths.items():
                link = Path(scratch) / file_name  # a plain name: checked by the manifest schema
                link.hardlink_to(path)
                named.append(link)
            stored = self.store.add(manifest.name, named, manifest.version, labels=manifest.labels,
                                    preprocessing=manifest.preprocessing, decoder=manifest.decoder,
                                    description=manifest.description)
        if stored.files != manifest.files:
            self.store.remove(manifest.name, manifest.version)
            raise UpdateRefused("the stored files differ from the release's manifest")
        self.reporter.event("update_staged", model=manifest.name, version=manifest.version)

    def _self_test_staged(self, release: Release) -> None:
        """Load the staged version on its own and run the self-test; a failure removes it."""
        manifest = release.manifest
        settings = self.manager.settings.model(manifest.name)
        directory = self.store.version_dir(manifest.name, manifest.version)
        try:
            self.store.verify(manifest.name, manifest.version)
            loaded, selection = select(directory / manifest.entry, manifest.format, settings.backend,
                                       self.manager.load_options(settings),
                                       self.manager.settings.backends.probe_runs)
            try:
                if release.selftest is not None:
                    inputs, expected = self._self_test_data(release)
                    checked = validate_inputs({loaded.inputs[0].name: inputs}, loaded.inputs,
                                              reject_non_finite=True)
                    check_outputs(loaded.infer(checked), expected, release)
            finally:
                loaded.close()
        except EdgedError as exc:
            self.store.remove(manifest.name, manifest.version)
            raise UpdateRefused(f"{manifest.version} failed its checks and was removed: {exc}") from None
        self.reporter.event("update_tested", model=manifest.name, version=manifest.version,
                            backend=selection.backend, selftest=release.selftest is not None)

    def _self_test_data(self, release: Release) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        selftest = release.selftest
        directory = self.store.version_dir(release.manifest.name, release.manifest.version)
        try:
            inputs = np.load(directory / selftest.input, allow_pickle=False)
            with np.load(directory / selftest.expected, allow_pickle=False) as archive:
                expected = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as exc:
            raise UpdateRefused(f"self-test files unreadable: {exc}") from None
        return inputs, expected

    def _probation(self, release: Release) -> bool:
        """Watch the new version; roll back and return False when it goes bad."""
        name, version = release.manifest.name, release.manifest.version
        stats = self.manager.stats.get(name)
        errors_before = stats.errors if stats else 0
        deadline = time.monotonic() + self.settings.probation_s
        while not self._stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            try:
                errors = (stats.errors if stats else 0) - errors_before
                if errors >= self.settings.probation_max_errors:
                    raise UpdateRefused(f"{errors} inference errors during probation")
                self.store.verify(name, version)
                if release.selftest is not None:
                    inputs, expected = self._self_test_data(release)
                    spec = self.manager.get(name, version).loaded.inputs[0]
                    result = self.manager.infer(name, {spec.name: inputs}, version=version)
                    check_outputs(result.outputs, expected, release)
            except EdgedError as exc:
                self._roll_back(name, version, str(exc))
                return False
            if time.monotonic() >= deadline:
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


def check_outputs(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray], release: Release) -> None:
    """Every expected output is there, of the same shape, and within atol + rtol * |expected|."""
    selftest = release.selftest
    for key, want in expected.items():
        got = outputs.get(key)
        if got is None:
            raise UpdateRefused(f"self-test: the model has no output {key!r}")
        if got.shape != want.shape:
            raise UpdateRefused(f"self-test: output {key!r} has shape {got.shape}, expected {want.shape}")
        if not np.allclose(got, want, atol=selftest.atol, rtol=selftest.rtol, equal_nan=False):
            worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            raise UpdateRefused(f"self-test: output {key!r} differs by up to {worst:.4g} "
                                f"(atol {selftest.atol:g}, rtol {selftest.rtol:g})")


def describe(agent: UpdateAgent | None) -> dict[str, Any]:
    """The agent's section of the health document."""
    if agent is None:
        return {"enabled": False}
    return {"enabled": True, "following": agent.topics, "bytes_received": agent.transfer.bytes_received,
            "chunks_retried": agent.transfer.chunks_retried, "waiting": agent._queue.qsize()}
