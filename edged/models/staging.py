"""Writing one version into the store (`store.py`): a staging directory that becomes
`{version}/` by one rename once complete and fsynced, and the two ways a file gets in:
copied while hashed (one read), or moved in unread (a rename) when its bytes were hashed
already and its whole stat fingerprint, ctime included, is still the one taken then.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edged.errors import StoreError
from edged.fsio import Fingerprint, atomic_write, fsync_dir
from edged.models.manifest import Manifest, ManifestFile

STAGING_PREFIX = ".staging-"
# A move the filesystem refuses (another filesystem, not permitted): copy instead.
NO_MOVE = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP})


@contextlib.contextmanager
def new_version(model_dir: Path, final: Path, manifest: Manifest) -> Iterator[Path]:
    """A fresh staging directory for the caller to fill. On a clean exit the manifest is
    written, everything fsynced and the directory renamed to `final`: the version appears
    complete or not at all. On an error nothing half-written stays (a full disk gets its
    space back) and an OSError becomes a one-line StoreError."""
    staging: Path | None = None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        yield staging
        atomic_write(staging / "manifest.json", manifest.to_json())
        fsync_dir(staging)
        os.rename(staging, final)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StoreError(f"{manifest.name} {manifest.version} not added: cannot write "
                             f"{exc.filename or model_dir}: {exc.strerror or exc}") from exc
        raise
    fsync_dir(model_dir)


def copy_hashed(source: Path, target: Path) -> ManifestFile:
    """Copy and fsync, hashing the bytes as they pass: what was written, in one read."""
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as src, target.open("xb") as dst:
        while block := src.read(1 << 20):
            digest.update(block)
            dst.write(block)
            size += len(block)
        dst.flush()
        os.fsync(dst.fileno())
    return ManifestFile(name=target.name, sha256=digest.hexdigest(), size=size)


def move_unwritten(source: Path, proof: Fingerprint, target: Path) -> bool:
    """Move `source` to `target` (same filesystem: a rename, no byte read) and sync it, if its
    fingerprint is still `proof` (taken when its bytes were hashed), ctime included: a write
    with its mtime put back moves ctime, which cannot be set back. False (`source` left
    where it was) when it changed, or the filesystem will not move it."""
    if Fingerprint.of(source.lstat()) != proof:
        return False
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno in NO_MOVE:
            return False
        raise
    fd = os.open(target, os.O_RDONLY)
    try:  # the rename moves ctime (on most filesystems) but not mtime, size or inode
        if not Fingerprint.of(os.fstat(fd)).unwritten_since(proof):  # written in between
            os.rename(target, source)
            return False
        os.fsync(fd)  # a download is not synced as it arrives: the store's file must be
    finally:
        os.close(fd)
    return True


def put_back(moved: dict[Path, Path]) -> None:
    """A version not added: the downloads `move_unwritten` took ({source: target}) go back
    to where they came from, so a download is not lost with it (best effort)."""
    for source, target in moved.items():
        with contextlib.suppress(OSError):
            os.rename(target, source)
