"""Results as JSON lines in a file, rotated by size (path, path.1, path.2, ...).

A write that fails (a full disk, a directory gone) never reaches the pipeline: it is
counted, the sink says what is wrong (`problem`, which makes the pipeline `degraded`),
and it is logged once when the failing starts or changes and once when writes succeed
again. A line is written whole or not at all: a write the disk cut short is cut off
the file again, so the next line starts on a line of its own.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from edged import strict_json
from edged.config import SinkSettings

log = logging.getLogger(__name__)


class JsonlSink:
    kind = "jsonl"

    def __init__(self, settings: SinkSettings, pipeline: str = "") -> None:
        if settings.path is None:  # SinkSettings requires it; a hand-built one may not have it
            raise ValueError("a sink of kind = 'jsonl' needs a path")
        self.path = Path(settings.path)
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.label = f"pipeline {pipeline}: sink {self.path}" if pipeline else f"sink {self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()
        self.written = 0
        self.failed = 0  # results lost to failed writes
        self.last_error = ""  # the last failure, kept after recovery
        self.problem = ""  # why writes fail now, for the pipeline's status; '' while they succeed
        self._reason = ""
        self._failed_since_ok = 0
        self._ragged = False  # the file may end in a cut line that could not be removed

    def write(self, result: dict) -> None:
        data = (strict_json.dumps(result) + "\n").encode()
        try:
            self._append(data)
        except OSError as exc:
            self._failing(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
            return
        self.written += 1
        if self.problem:
            log.info("%s: recovered, writing results again (%d lost meanwhile)", self.label,
                     self._failed_since_ok)
            self.problem, self._reason, self._failed_since_ok = "", "", 0

    def _append(self, data: bytes) -> None:
        if self._file.closed:  # a rotation or a reopening failed earlier: try again
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._open()
        size = self._file.tell()
        if size + len(data) > self.max_bytes and size > 0:
            self._rotate()
            size = 0
        if self._ragged:
            data = b"\n" + data
        done = 0
        try:
            while done < len(data):  # unbuffered: a full disk shows as a short write, then ENOSPC
                done += self._file.write(data[done:]) or 0
        except OSError:
            if done:
                self._cut(size)
            raise
        self._ragged = False

    def _cut(self, size: int) -> None:
        """Remove what a failed write left of its line (shrinking a file needs no free space)."""
        try:
            os.ftruncate(self._file.fileno(), size)
            self._file.seek(size)
        except OSError:
            self._ragged = True  # the next line starts with a newline instead

    def _failing(self, reason: str) -> None:
        self.failed += 1
        self._failed_since_ok += 1
        self.last_error = reason
        if reason != self._reason:
            log.warning("%s: failing, results are lost until it can write: %s", self.label, reason)
            self._reason = reason
            self.problem = f"sink {self.path} failing: {reason}"

    def _open(self) -> io.FileIO:
        """Unbuffered: each line goes to the file at once, and a short write is seen."""
        return io.FileIO(self.path, "ab")

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            newer = self.path if index == 1 else self.path.with_name(f"{self.path.name}.{index - 1}")
            if newer.exists():
                os.replace(newer, older)
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        self._ragged = False  # a new file
        self._file = self._open()

    def details(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "written": self.written, "failed": self.failed,
                "last_error": self.last_error}

    def close(self) -> None:
        self._file.close()
