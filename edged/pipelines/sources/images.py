"""Frames from a folder of images (.jpg, .jpeg, .png, .bmp), in name order.

Like a video file, a folder is read as fast as the pipeline takes frames, once or in
a loop. A file that is not a readable image is counted in `last_error` and skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edged.config import SourceSettings
from edged.pipelines.sources import ThreadedSource

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class ImageFolderSource(ThreadedSource):
    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings.uri)
        self.settings = settings
        self.skipped = 0

    def _grab(self) -> None:
        import cv2

        folder = Path(self.settings.uri)
        backoff = self.settings.reopen_backoff_s
        while not self._stop.is_set():
            paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
                if folder.is_dir() else []
            if not paths:
                self.state = "reconnecting"
                self.last_error = f"{folder}: no images (.jpg, .png, .bmp) to read"
                self.reconnects += 1
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, max(30.0, self.settings.reopen_backoff_s))
                continue
            self.state = "running"
            shown = 0
            for path in paths:
                if self._stop.is_set() or not self._wait_for_room():
                    break
                image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if image is None:
                    self.skipped += 1
                    self.last_error = f"{path.name}: not a readable image (skipped)"
                    continue
                self.frames.put(image)
                shown += 1
            if self._stop.is_set():
                break
            if not self.settings.loop and shown:
                self.state = "finished"
                return
        self.state = "stopped"

    def _wait_for_room(self) -> bool:
        while not self._stop.is_set():
            if self.frames.wait_taken(0.5):
                return True
        return False
