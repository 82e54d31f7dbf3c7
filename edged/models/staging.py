"""Writing one version into the store (`store.py`): a staging directory that becomes
`{version}/` by one rename once complete and fsynced, and the two ways a file gets in:
copied while hashed (one read), or hard-linked when its bytes were hashed already.
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
# A link the filesystem refuses (another filesystem, no hard links, too many): copy instead.
NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP})


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


def link_unwritten(source: Path, proof: Fingerprint, target: Path) -> bool:
    """Hard-link `source` as `target` and sync it, if it was not written since `proof` (taken
    when its bytes were hashed); False when it was, or the filesystem will not link."""
    if not Fingerprint.of(source.lstat()).unwritten_since(proof):
        return False
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in NO_LINK:
            return False
        raise
    if not Fingerprint.of(target.lstat()).unwritten_since(proof):  # written in between
        target.unlink()
        return False
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)  # a download is not synced as it arrives: the store's file must be
    finally:
        os.close(fd)
    return True
