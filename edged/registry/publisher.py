"""Publishing: store a version, sign its release, retain it on the right topic.

Each command first records in the store what the broker should retain (so nothing is
lost when the broker is away), then announces it with QoS 1 and waits for the PUBACK.
An announcement that fails leaves the store as it is and raises NotAnnounced; `serve`
announces every recorded release when it (re)connects.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edged.errors import EdgedError, InvalidInput, StoreError
from edged.fsio import atomic_write
from edged.models.manifest import ENTRY_SUFFIX, Manifest, check_name, guess_format, one_line
from edged.models.store import version_key
from edged.registry.config import RegistrySettings
from edged.registry.connection import BrokerUnavailable, Connection
from edged.registry.rollout_files import refuse_base_release
from edged.registry.selftest import EXPECTED_FILE, INPUT_FILE, write_self_test
from edged.registry.store import MANIFEST_FILE, RegistryStore, Target
from edged.signing import (
    MAX_ENVELOPE_BYTES,
    Release,
    SelfTest,
    canonical_json,
    key_id,
    sign_release,
    verify_envelope,
)
from edged.topics import Topics

log = logging.getLogger(__name__)
RELEASE_FILE = "release.json"  # in the version's directory: its release as first published
DAY_S = 86_400.0


class NotAnnounced(EdgedError):
    """The store has the change, but the broker did not take it."""


@dataclass(frozen=True)
class Outcome:
    """What a command changed on one target, for the CLI to say."""

    target: Target
    version: str
    previous: str | None = None  # the version that was retained there before


# --- releases --------------------------------------------------------------------------------

def new_release(manifest: Manifest, group: str | None, days: float, selftest: SelfTest | None,
                now: float | None = None, *, device: str | None = None,
                rollback_from: str | None = None) -> Release:
    """A release for every device, one group or (`device`) one device; `rollback_from`: a
    rollback release, which the device installs although older, only while it runs that
    version (an aborted rollout's)."""
    published = round(time.time() if now is None else now, 3)
    return Release(manifest=manifest, group=group, device=device, rollback=rollback_from is not None,
                   rollback_from=rollback_from, published_at=published,
                   expires_at=round(published + days * DAY_S, 3), selftest=selftest)


def sign(release: Release, key: Ed25519PrivateKey) -> bytes:
    """The envelope as it is retained: canonical JSON, checked against the size devices take."""
    envelope = canonical_json(sign_release(release.to_dict(), key))
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise InvalidInput(f"the signed release is {len(envelope)} bytes, over {MAX_ENVELOPE_BYTES}; "
                           "fewer labels or a smaller preprocessing section would fit")
    return envelope


def open_release(envelope: bytes, key: Ed25519PrivateKey) -> Release:
    """A release this registry signed, checked again (a file in the store may be damaged)."""
    return Release.parse(verify_envelope(envelope, {key_id(key): key.public_key()}, MAX_ENVELOPE_BYTES))


def refreshed(envelope: bytes, key: Ed25519PrivateKey, days: float, now: float) -> bytes | None:
    """The release signed again with a new validity, if it is past 2/3 of it; else None."""
    release = open_release(envelope, key)
    if not release.due_for_resigning(now):
        return None
    published = round(now, 3)
    renewed = release.model_copy(update={"published_at": published,
                                         "expires_at": round(published + days * DAY_S, 3)})
    return sign(renewed, key)


def release_version(envelope: bytes) -> str | None:
    """The version an envelope of this store names (None for a withdrawn or unreadable one)."""
    try:
        return json.loads(envelope)["release"]["manifest"]["version"]
    except (ValueError, KeyError, TypeError):
        return None


# --- the commands ----------------------------------------------------------------------------

class Publisher:
    def __init__(self, settings: RegistrySettings, store: RegistryStore) -> None:
        self.settings = settings
        self.store = store
        self.topics = Topics(settings.topic_prefix)
        self._signing_key: Ed25519PrivateKey | None = None

    def publish(self, name: str, files: list[Path], version: str, *, group: str | None = None,
                labels: list[str] | None = None, preprocessing: dict | None = None,
                decoder: dict | None = None, description: str = "", selftest_input: Path | None = None,
                atol: float = 1e-3, rtol: float = 1e-2, hold: bool = False) -> Outcome:
        """Add a version, sign its release for `group` (None: every device) and announce it;
        `hold`: store and sign it but retain it nowhere (a rollout announces it later)."""
        check_name(name)
        check_name(version, "version")
        if group is not None:
            check_name(group, "group name")
        key = self.store.signing_key()  # before copying anything: no key, no version
        paths = [Path(f) for f in files]
        reserved = {MANIFEST_FILE, RELEASE_FILE} | ({INPUT_FILE, EXPECTED_FILE} if selftest_input else set())
        for path in paths:
            if path.name in reserved:
                raise InvalidInput(f"a model file cannot be called {path.name}: the registry writes it")
            if not path.is_file():
                raise InvalidInput(f"{path}: not a readable file")
        with self.store.lock():
            if not hold:
                refuse_base_release(self.store.root, name, group)
            if self.store.version_dir(name, version).exists():
                raise StoreError(f"{name} {version} already exists in the registry")
            selftest = None
            if selftest_input is not None:
                try:
                    selftest = SelfTest(input=INPUT_FILE, expected=EXPECTED_FILE, atol=atol, rtol=rtol)
                except ValidationError as exc:
                    raise InvalidInput(f"invalid self-test tolerance: {one_line(exc)}") from None
            with self.store.scratch() as scratch:
                if selftest_input is not None:
                    paths = self._with_self_test(scratch, paths, selftest_input)
                manifest = self.store.add_version(name, paths, version, labels=labels,
                                                  preprocessing=preprocessing, decoder=decoder,
                                                  description=description)
            try:
                envelope = sign(new_release(manifest, group, self.settings.release_days, selftest), key)
                atomic_write(self.store.version_dir(name, version) / RELEASE_FILE, envelope)
            except BaseException:  # a version without its release is no version: take it out again
                self.store.models.remove(name, version)
                raise
            if hold:
                return Outcome(Target(name, group), version)
            outcome = self._retain(Target(name, group), version, envelope)
        self.announce([outcome.target], f"{name} {version}")
        return outcome

    def original(self, name: str, version: str) -> Release:
        """The release a version was published with (checked again): its manifest and self-test."""
        self.store.require_version(name, version)
        try:
            original = (self.store.version_dir(name, version) / RELEASE_FILE).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{name} {version} has no {RELEASE_FILE} (its publish was interrupted); "
                             "retire it and publish it again") from None
        return open_release(original, self._key())

    def envelope_for(self, target: Target, version: str, *, rollback_from: str | None = None,
                     original: Release | None = None) -> bytes:
        """A stored version's release signed anew for `target` (a group, a device, every device);
        `rollback_from`: a rollback release leaving that version; `original`: its release as
        `original()` gave it (many devices: read it once)."""
        release = original or self.original(target.name, version)
        return sign(new_release(release.manifest, target.group, self.settings.release_days, release.selftest,
                                device=target.device, rollback_from=rollback_from), self._key())

    def _key(self) -> Ed25519PrivateKey:
        if self._signing_key is None:
            self._signing_key = self.store.signing_key()
        return self._signing_key

    def promote(self, name: str, version: str, group: str | None = None) -> Outcome:
        """Retain a stored version's release for `group` (None: every device), signed anew."""
        if group is not None:
            check_name(group, "group name")
        with self.store.lock():
            refuse_base_release(self.store.root, name, group)
            envelope = self.envelope_for(Target(name, group), version)
            outcome = self._retain(Target(name, group), version, envelope)
        self.announce([outcome.target], f"{name} {version}")
        return outcome

    def retire(self, name: str, version: str) -> list[Target]:
        """Stop serving a version's files and withdraw every release that names it."""
        with self.store.lock():
            self.store.manifest(name, version)  # ModelNotFound for a version never published
            self.store.mark_retired(name, version)
            withdrawn = [target for target, envelope in self.store.retained().items()
                         if target.name == name and release_version(envelope) == version]
            for target in withdrawn:
                self.store.set_retained(target, b"")
        self.announce(withdrawn, f"the withdrawal of {name} {version}")
        return withdrawn

    def _retain(self, target: Target, version: str, envelope: bytes) -> Outcome:
        before = self.store.retained_for(target)
        self.store.set_retained(target, envelope)
        return Outcome(target, version, release_version(before) if before else None)

    def _with_self_test(self, scratch: Path, paths: list[Path], input_path: Path) -> list[Path]:
        """Copy the model beside each other into `scratch`, compute the self-test there."""
        copies = []
        for path in paths:
            check_name(path.name, "file name")
            copies.append(Path(shutil.copyfile(path, scratch / path.name)))
        model_format = guess_format(copies)
        entry = next(p for p in copies if p.name.endswith(ENTRY_SUFFIX[model_format]))
        return copies + write_self_test(scratch, entry, model_format, input_path)

    # --- announcing ----------------------------------------------------------------------
    def topic(self, target: Target) -> str:
        return self.topics.release(target.name, target.group, target.device)

    def announce(self, targets: list[Target], what: str) -> None:
        """Retain each target's recorded envelope on its topic, waiting for the PUBACKs."""
        if not targets:
            return
        client_id = f"{self.settings.mqtt.device_id}-{uuid.uuid4().hex[:8]}"
        timeout = self.settings.connect_timeout_s
        try:
            connection = Connection(self.settings.mqtt, client_id).open(timeout)
            try:  # under the lock until acknowledged, as `serve` announces (docs/fleet.md)
                with self.store.lock():
                    for target in targets:
                        payload = self.store.retained_for(target) or b""
                        connection.publish_and_wait(self.topic(target), payload, timeout, retain=True)
            finally:
                connection.close()
        except BrokerUnavailable as exc:
            raise NotAnnounced(f"{what} is stored in {self.store.root} but was not announced: {exc}; "
                               "`edged-registry serve` announces it once it reaches the broker") from None


def newer_elsewhere(outcome: Outcome) -> bool:
    """True when the target held a newer version: its devices will not go back by themselves."""
    return outcome.previous is not None and version_key(outcome.previous) > version_key(outcome.version)
