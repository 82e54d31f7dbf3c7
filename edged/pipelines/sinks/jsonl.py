"""Results as JSON lines in a file, rotated by size (path, path.1, path.2, ...)."""

from __future__ import annotations

import os
from pathlib import Path

from edged import strict_json
from edged.config import SinkSettings


class JsonlSink:
    kind = "jsonl"

    def __init__(self, settings: SinkSettings) -> None:
        if settings.path is None:  # SinkSettings requires it; a hand-built one may not have it
            raise ValueError("a sink of kind = 'jsonl' needs a path")
        self.path = Path(settings.path)
        self.max_bytes = settings.max_bytes
        self.backups = settings.backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self.written = 0

    def write(self, result: dict) -> None:
        line = strict_json.dumps(result) + "\n"
        if self._file.closed:  # a rotation failed earlier (the directory went away): try again
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        if self._file.tell() + len(line) > self.max_bytes and self._file.tell() > 0:
            self._rotate()
        self._file.write(line)
        self._file.flush()
        self.written += 1

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            newer = self.path if index == 1 else self.path.with_name(f"{self.path.name}.{index - 1}")
            if newer.exists():
                os.replace(newer, older)
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def details(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "written": self.written}

    def close(self) -> None:
        self._file.close()
