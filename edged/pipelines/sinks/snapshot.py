"""The newest frame in which something was detected, annotated, as a JPEG people look at.

A frame sink: the runner hands it the frame and the model's outputs with each result
(`write_frame`), and only to sinks that ask (`wants_frames`). When the result counts as
something detected (`detected`) and `min_interval_s` has passed since the last snapshot,
the frame is drawn on (edged/pipelines/annotate.py), encoded within `max_jpeg_bytes`, kept
in the snapshot directory (`SnapshotFiles`) and, with MQTT on, put into the outbox
retained on `edged/devices/{id}/snapshots/{pipeline}`, replacing one still waiting.
Frames in between are never drawn, so the cost is bounded by the interval. A failure
(a full disk, a refused message) never reaches the pipeline: it is counted, shown as
`problem` (the pipeline is `degraded`) and logged once when it starts or changes and
once when that output works again.
"""

from __future__ import annotations

import logging
import time

from edged.config import SinkSettings
from edged.pipelines.annotate import Seen, annotate, encode_jpeg
from edged.pipelines.mqtt_port import SharedPort
from edged.pipelines.sinks.snapshot_files import SnapshotFiles

log = logging.getLogger(__name__)


def detected(result: dict, settings: SinkSettings) -> bool:
    """Whether a result shows something worth a snapshot, by what its decoder reports:
    detections: one scoring `min_score` or more; segmentation: a mask covering
    `min_coverage` of the frame or more; classes: one of `labels` (any label when
    none are given) scoring `min_score` or more. Raw outputs: never."""
    if "detections" in result:
        return any(d["score"] >= settings.min_score for d in result["detections"])
    if "coverage" in result:
        return result["coverage"] >= settings.min_coverage
    if "classes" in result:
        return any(c["score"] >= settings.min_score and (not settings.labels or c["label"] in settings.labels)
                   for c in result["classes"])
    return False


class SnapshotSink:
    kind = "snapshot"
    wants_frames = True

    def __init__(self, settings: SinkSettings, pipeline: str, mqtt: SharedPort | None = None) -> None:
        if settings.path is None and mqtt is None:
            raise ValueError("a sink of kind = 'snapshot' needs a path, or mqtt.enabled to publish to")
        self.settings = settings
        self.pipeline = pipeline
        self.port = mqtt
        self.files = SnapshotFiles(settings.path, settings.history) if settings.path is not None else None
        self.taken = 0  # snapshots drawn and encoded
        self.written = 0  # ... kept in the directory
        self.published = 0  # ... put into the MQTT outbox
        self.rate_limited = 0  # frames with something detected, within min_interval_s of the last snapshot
        self.failed = 0  # snapshots that some output (or the drawing) lost
        self.last_error = ""
        self.last_bytes = 0  # the newest JPEG's size
        self._failing: dict[str, str] = {}  # step ("drawing", "file", "mqtt") -> why it fails now
        self.problem = ""  # what fails now, for the pipeline's status (read on other threads)
        self._last_at: float | None = None

    def write(self, result: dict) -> None:
        """A result without its frame: nothing to draw (the runner passes frames to `write_frame`)."""

    def write_frame(self, result: dict, seen: Seen) -> None:
        if not detected(result, self.settings):
            return
        now = time.monotonic()
        if self._last_at is not None and now - self._last_at < self.settings.min_interval_s:
            self.rate_limited += 1
            return
        self._last_at = now  # a failing disk is tried again only after the interval, too
        s = self.settings
        try:
            jpeg = encode_jpeg(annotate(result, seen, s.max_side), s.jpeg_quality, s.max_jpeg_bytes)
        except Exception as exc:  # a bug or a picture OpenCV refuses: the pipeline goes on
            self._fail("drawing", f"{type(exc).__name__}: {exc}")
            return
        self._works("drawing")
        self.taken += 1
        self.last_bytes = len(jpeg)
        lost = False
        if self.files is not None:
            try:
                self.files.write(jpeg, result.get("time", time.time()), result.get("frame", 0))
            except OSError as exc:
                lost = True
                self._fail("file", f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
            else:
                self.written += 1
                self._works("file")
        if self.port is not None:
            if self.port.put_snapshot(self.pipeline, jpeg):
                self.published += 1
                self._works("mqtt")
            else:
                lost = True
                self._fail("mqtt", "the MQTT outbox refused it (see the daemon log)")
        if lost:
            self.failed += 1

    def _fail(self, what: str, reason: str) -> None:
        if what == "drawing":
            self.failed += 1
        self.last_error = reason
        if self._failing.get(what) != reason:
            log.warning("pipeline %s: snapshot %s failing, snapshots are lost until it works: %s",
                        self.pipeline, what, reason)
            self._failing[what] = reason
            self._update_problem()

    def _works(self, what: str) -> None:
        if self._failing.pop(what, None) is not None:
            log.info("pipeline %s: snapshot %s works again", self.pipeline, what)
            self._update_problem()

    def _update_problem(self) -> None:
        """`problem` as one string, replaced whole: the status thread never sees it half made."""
        self.problem = "; ".join(f"snapshot {what} failing: {why}" for what, why in self._failing.items())

    def details(self) -> dict:
        return {"kind": self.kind, "path": str(self.settings.path or ""), "taken": self.taken,
                "written": self.written, "published": self.published, "rate_limited": self.rate_limited,
                "failed": self.failed, "last_bytes": self.last_bytes, "last_error": self.last_error}

    def close(self) -> None:
        """Nothing held open: every snapshot is a whole file, and the outbox sends what was put."""
