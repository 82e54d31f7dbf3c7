"""Frames from anything OpenCV can open: a V4L2 device, an RTSP/HTTP stream, a video file.

A grabber thread reads as fast as the source delivers and keeps the newest
frame. A device that disappears or a stream that stalls is reopened with a
doubling backoff, reported through `state` and `last_error`, never fatal.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edged.config import SourceSettings
from edged.pipelines.sources import ThreadedSource

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0


def _open_target(uri: str) -> int | str:
    """A device index ("0") or anything else OpenCV opens by name."""
    return int(uri) if uri.isascii() and uri.isdigit() and len(uri) <= 4 else uri


class CameraSource(ThreadedSource):
    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings.uri)
        self.settings = settings
        self._is_file = False

    def _grab(self) -> None:
        import cv2

        backoff = self.settings.reopen_backoff_s
        while not self._stop.is_set():
            self._is_file = Path(self.settings.uri).is_file()
            try:
                capture = self._open(cv2)
            except Exception as exc:  # OpenCV refuses some names outright
                self._lost(f"cannot open {self.settings.uri}: {type(exc).__name__}: {exc}")
                capture = None
            if capture is not None and not capture.isOpened():
                capture.release()
                self._lost(f"cannot open {self.settings.uri}")
            elif capture is not None:
                self.state = "running"
                self.last_error = ""
                try:
                    outcome, frames = self._read_until_lost(capture)
                except Exception as exc:  # a decoder bug must not end the source for good
                    log.exception("source %s failed", self.settings.uri)
                    self._lost(f"reading failed: {type(exc).__name__}: {exc}")
                    outcome, frames = "lost", 0
                finally:
                    capture.release()
                if outcome == "ended" and frames and self.settings.loop:
                    continue  # play the file again from the start
                if outcome == "ended" and frames:
                    self.state = "finished"
                    return
                if frames:
                    backoff = self.settings.reopen_backoff_s
                if outcome == "ended":
                    self._lost(f"{self.settings.uri} holds no readable frame")
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, max(MAX_BACKOFF_S, self.settings.reopen_backoff_s))
            self.reconnects += 1
        self.state = "stopped"

    def _open(self, cv2):
        target = _open_target(self.settings.uri)
        if isinstance(target, str) and "://" in target:
            # A stream that stalls must not block the grabber forever.
            timeout_ms = max(1, int(self.settings.read_timeout_s * 1000))
            return cv2.VideoCapture(target, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms,
            ])
        return cv2.VideoCapture(target)

    def _read_until_lost(self, capture) -> tuple[str, int]:
        """Read frames until the file ends, the source fails or we stop: (outcome, frames read)."""
        import cv2

        frames = 0
        pace = 0.0
        if self._is_file and self.settings.realtime:
            fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
            pace = 1.0 / fps
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self._is_file and not self.settings.realtime:
                # A file can wait: decode the next frame only once this one is taken,
                # so no frame is decoded in vain and none is dropped.
                if not self.frames.wait_taken(0.5):
                    continue
            ok, image = capture.read()
            if ok:
                if pace:
                    next_at += pace
                    self._stop.wait(max(0.0, next_at - time.monotonic()))
                self.frames.put(image)
                frames += 1
                continue
            if self._is_file:
                return "ended", frames
            self._lost(f"{self.settings.uri} stopped delivering frames")
            return "lost", frames
        return "stopped", frames

    def _lost(self, reason: str) -> None:
        if self.last_error != reason or self.state != "reconnecting":
            log.warning("source %s: %s; reopening", self.settings.uri, reason)
        self.state = "reconnecting"
        self.last_error = reason
