"""A snapshot directory: `latest.jpg` and a bounded history of earlier snapshots.

Each snapshot is written atomically (`fsio.atomic_write`: a temp file, fsynced, renamed),
so a reader never sees half a JPEG and a failed write (a full disk) leaves only the files
that were there before: the temp file is removed. With a history, the snapshot is written
once, under its time (`20261204T054512.345Z-000123.jpg`: UTC, then the frame number, so
names sort by time), and `latest.jpg` becomes a second name for it (a hard link renamed
into place): the bytes are written once (twice on a filesystem without hard links, such as
FAT). The oldest beyond `history` are deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import time
from collections import deque
from pathlib import Path

from edged.fsio import atomic_write, fsync_dir

LATEST = "latest.jpg"
HISTORY_NAME = re.compile(r"\d{8}T\d{6}\.\d{3}Z-\d+\.jpg")
NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK}  # os.link where a filesystem has none
LEFTOVER = re.compile(r"\..+\.jpg\..+\.tmp")  # atomic_write's temp files, left by a crash


class SnapshotFiles:
    def __init__(self, directory: Path, history: int) -> None:
        """Checks the directory now (made when missing; ValueError or OSError when no file can
        be made in it), so a pipeline that cannot keep its snapshots does not start."""
        self.directory = Path(directory)
        self.history = history
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.directory.is_dir():
            raise ValueError(f"snapshot path {self.directory} is not a directory")
        try:  # the real test, for root too (a read-only mount)
            tempfile.TemporaryFile(dir=self.directory).close()
        except OSError as exc:  # named by the directory, not the temp file's name
            raise OSError(exc.errno, exc.strerror, str(self.directory)) from None
        names = sorted(entry.name for entry in os.scandir(self.directory))
        for name in names:
            if LEFTOVER.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
        self._links = True  # latest.jpg is a hard link to the newest history file
        self._kept = deque(self.directory / n for n in names if HISTORY_NAME.fullmatch(n))
        self._prune()

    @property
    def latest(self) -> Path:
        return self.directory / LATEST

    def write(self, jpeg: bytes, captured_at: float, frame: int) -> None:
        """Keep `jpeg` as latest.jpg (and in the history); OSError when the disk refuses it."""
        if not self.history:
            atomic_write(self.latest, jpeg)
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(captured_at))
        millis = int(captured_at * 1000) % 1000
        path = self.directory / f"{stamp}.{millis:03d}Z-{frame:06d}.jpg"
        atomic_write(path, jpeg)
        try:
            if self._links:
                self._link_latest(path)
            else:
                atomic_write(self.latest, jpeg)
        finally:  # even when latest.jpg could not follow, the history file is counted and bounded
            if not self._kept or self._kept[-1] != path:
                self._kept.append(path)
            self._prune()

    def _link_latest(self, path: Path) -> None:
        temporary = self.directory / f".{LATEST}.{path.stem}.tmp"
        try:
            os.link(path, temporary)
        except OSError as exc:
            if exc.errno not in NO_LINKS:
                raise
            self._links = False  # a filesystem without hard links (FAT): latest.jpg is written too
            atomic_write(self.latest, path.read_bytes())
            return
        try:
            os.replace(temporary, self.latest)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        fsync_dir(self.directory)

    def _prune(self) -> None:
        while len(self._kept) > self.history:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._kept.popleft())
