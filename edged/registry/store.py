"""The registry's directory store.

Layout under `root`:
    keys/registry.key                  the Ed25519 signing key (PEM PKCS8, mode 0600)
    keys/registry.pub                  its public key, base64: what devices pin
    models/{name}/{version}/           the version's files + manifest.json (a ModelStore)
    models/{name}/{version}/.retired   marker: retired, its files are no longer served
    retained/models/{name}.json                  the envelope retained on {prefix}/registry/models/{name}
    retained/groups/{group}/models/{name}.json   ... on {prefix}/registry/groups/{group}/models/{name}
    retained/devices/{device}/models/{name}.json ... on {prefix}/registry/devices/{device}/models/{name}
    rollouts/{name}.json               a staged rollout of the model (rollout.py), and .driver
    .changed                           rewritten after each change (batch), so `serve` notices
    .lock                              held while the store changes
    tmp/                               scratch space for publishing

`retained/` mirrors what the broker should retain, one file per topic: a release is
written there before it is announced, so `serve` can announce (again) whatever a
command could not. An empty file is a withdrawn release (an empty retained message); a
withdrawn device release's file is deleted once the broker acknowledged the withdrawal.
Every write is atomic (temp file, fsync, rename), so a crash leaves the old or the new.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged.config.mqtt import DEVICE_ID
from edged.errors import InvalidInput, ModelNotFound, StoreError
from edged.fsio import atomic_write
from edged.models.manifest import Manifest, check_name, is_valid_name
from edged.models.store import ModelStore
from edged.signing import (
    SignatureError,
    generate_key,
    load_private_key,
    public_key_text,
    save_private_key,
)
from edged.topics import release_suffix

log = logging.getLogger(__name__)
KEY_FILE = Path("keys/registry.key")
PUBLIC_FILE = Path("keys/registry.pub")
RETIRED_MARKER = ".retired"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Target:
    """Where a release is retained: for every device (`group` and `device` None), one group,
    or one device (a rollout's per-device release)."""

    name: str
    group: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.group is not None and self.device is not None:
            raise ValueError("a release is for a group or for a device, not both")

    @property
    def suffix(self) -> str:
        return release_suffix(self.name, self.group, self.device)

    def describe(self) -> str:
        if self.device is not None:
            return f"{self.name} (device {self.device})"
        return f"{self.name} (all devices)" if self.group is None else f"{self.name} (group {self.group})"

    def order(self) -> tuple[str, str, str]:
        return (self.name, self.group or "", self.device or "")


@dataclass(frozen=True)
class ServedFile:
    path: Path
    size: int
    model: str
    version: str


class RegistryStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.models = ModelStore(self.root / "models")
        self.retained_dir = self.root / "retained"
        self.changed_file = self.root / ".changed"

    # --- the signing key ---------------------------------------------------------------
    def create_key(self) -> Ed25519PrivateKey:
        """A new signing key; never replaces one (devices pin the public key)."""
        path = self.root / KEY_FILE
        if path.exists():
            raise StoreError(f"{path} already exists; refusing to replace the signing key")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        key = generate_key()
        try:
            save_private_key(path, key)
        except FileExistsError:
            raise StoreError(f"{path} already exists; refusing to replace the signing key") from None
        atomic_write(self.root / PUBLIC_FILE, f"{public_key_text(key)}\n".encode())
        return key

    def signing_key(self) -> Ed25519PrivateKey:
        path = self.root / KEY_FILE
        if not path.exists():
            raise StoreError(f"no signing key at {path}: run `edged-registry keygen` first")
        try:
            return load_private_key(path)
        except SignatureError as exc:
            raise StoreError(str(exc)) from None

    # --- versions ----------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.models.names()

    def versions(self, name: str) -> list[str]:
        return self.models.versions(name)

    def manifest(self, name: str, version: str) -> Manifest:
        return self.models.manifest(name, version)

    def version_dir(self, name: str, version: str) -> Path:
        return self.models.version_dir(name, version)

    def require_version(self, name: str, version: str) -> Manifest:
        """The manifest of a version that exists and is not retired."""
        manifest = self.manifest(name, version)
        if self.is_retired(name, version):
            raise StoreError(f"{name} {version} is retired")
        return manifest

    def add_version(self, name: str, files: list[Path], version: str, **manifest_fields: object) -> Manifest:
        """Copy `files` in as a new version (it appears complete or not at all)."""
        for path in files:
            if Path(path).name == MANIFEST_FILE:
                raise InvalidInput(f"a model file cannot be called {MANIFEST_FILE}: the store keeps its own")
        manifest = self.models.add(name, [Path(f) for f in files], version, **manifest_fields)  # type: ignore[arg-type]
        self.touch()
        return manifest

    def is_retired(self, name: str, version: str) -> bool:
        return (self.version_dir(name, version) / RETIRED_MARKER).exists()

    def mark_retired(self, name: str, version: str) -> None:
        directory = self.version_dir(name, version)
        if not directory.is_dir():
            raise ModelNotFound(name, version)
        atomic_write(directory / RETIRED_MARKER, f"{time.time():.3f}\n".encode())
        self.touch()

    # --- retained releases ---------------------------------------------------------------
    def retained_path(self, target: Target) -> Path:
        check_name(target.name)
        if target.group is not None:
            check_name(target.group, "group name")
        if target.device is not None and not DEVICE_ID.fullmatch(target.device):
            raise InvalidInput(f"invalid device id {target.device[:80]!r}")
        return self.retained_dir / f"{target.suffix}.json"

    def set_retained(self, target: Target, envelope: bytes, *, touch: bool = True) -> None:
        """Record what the broker should retain for `target`; b"" withdraws the release.
        `touch=False`: the caller touches once after a batch (a wave is many devices)."""
        path = self.retained_path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, envelope)
        if touch:
            self.touch()

    def forget_withdrawn(self, target: Target) -> bool:
        """Delete a device release's file once its withdrawal reached the broker (the caller
        holds the lock): otherwise every withdrawn device release is kept and re-sent for
        ever. Group and all-device files stay (they are few)."""
        path = self.retained_path(target)
        if target.device is None or self.retained_for(target) != b"":
            return False
        path.unlink(missing_ok=True)
        return True

    def retained_for(self, target: Target) -> bytes | None:
        """The envelope recorded for `target`: b"" if withdrawn, None if there never was one."""
        try:
            return self.retained_path(target).read_bytes()
        except FileNotFoundError:
            return None

    def retained(self) -> dict[Target, bytes]:
        """Every recorded target and its envelope (b"" for a withdrawn one)."""
        found: dict[Target, bytes] = {}
        candidates: list[tuple[Path, str | None, str | None]] = [
            (path, None, None) for path in self.retained_dir.glob("models/*.json")]
        for group_dir in self.retained_dir.glob("groups/*"):
            if is_valid_name(group_dir.name):
                candidates += [(path, group_dir.name, None) for path in group_dir.glob("models/*.json")]
        for device_dir in self.retained_dir.glob("devices/*"):
            if DEVICE_ID.fullmatch(device_dir.name):
                candidates += [(path, None, device_dir.name) for path in device_dir.glob("models/*.json")]
        for path, group, device in candidates:
            name = path.name[: -len(".json")]
            if not is_valid_name(name) or not path.is_file():
                continue
            try:
                found[Target(name, group, device)] = path.read_bytes()
            except OSError as exc:
                log.error("cannot read %s: %s", path, exc.strerror or exc)
        return dict(sorted(found.items(), key=lambda item: item[0].order()))

    # --- serving -------------------------------------------------------------------------
    def file_index(self) -> dict[str, ServedFile]:
        """sha256 -> a file of a version that is not retired: what `serve` may hand out."""
        index: dict[str, ServedFile] = {}
        for name in self.names():
            for version in self.versions(name):
                if self.is_retired(name, version):
                    continue
                try:
                    manifest = self.manifest(name, version)
                except (StoreError, ModelNotFound) as exc:
                    log.error("not serving %s %s: %s", name, version, exc)
                    continue
                directory = self.version_dir(name, version)
                for entry in manifest.files:
                    path = directory / entry.name
                    try:
                        size = path.stat().st_size
                    except OSError:
                        size = -1
                    if size != entry.size:
                        log.error("not serving %s of %s %s: missing or not %d bytes", entry.name, name,
                                  version, entry.size)
                        continue
                    index.setdefault(entry.sha256, ServedFile(path, entry.size, name, version))
        return index

    def touch(self) -> None:
        """Say the store changed: `serve` compares this file's identity."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.changed_file, f"{time.time_ns()}\n".encode())

    def generation(self) -> tuple[int, int]:
        """Changes whenever touch() ran (a new inode each time: no mtime granularity issue)."""
        try:
            st = self.changed_file.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_ino, st.st_mtime_ns)

    # --- helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's lock: one change at a time across commands and `serve`."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private directory under root/tmp, removed afterwards."""
        base = self.root / "tmp"
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=base, prefix=f"{os.getpid()}-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
