"""Crash-safe file writes, shared by the model store, signing and the registry, and the
stat fingerprint that tells cheaply whether a file that was hashed may have changed since.

A rename is atomic, but only durable once the directory holding it is fsynced; a file's
bytes are only durable once the file is. These two helpers do both in the right order, so
that a power cut leaves the old file or the new one, never a mix or an empty file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the renames and links made in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write a temp file (mode 0600 from its first byte), fsync it, move it to `path`, fsync
    the directory. With `replace=False` an existing `path` is never replaced
    (FileExistsError), and of two writers racing only one wins."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp: str | None = name
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(name, path)
            tmp = None
        else:
            os.link(name, path)  # fails if `path` exists
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Fingerprint:
    """What `stat` says of a file whose bytes were hashed, so that checking it again costs a
    `stat`, not a read: a write changes mtime and ctime, a replacement the inode, a
    truncation the size, and ctime cannot be set back (mtime can, with `utime`)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def unwritten_since(self, earlier: Fingerprint) -> bool:
        """The same file, size and mtime as `earlier`: renamed or linked since (which moves
        only ctime), or written with its mtime put back. Only for the moment right after a
        rename of our own; trusting a proof takes equality, ctime included."""
        return (self.dev, self.ino, self.size, self.mtime_ns) == (
            earlier.dev, earlier.ino, earlier.size, earlier.mtime_ns)
