"""Is the input worth trusting? A camera or a sensor can be online and still useless.

A frozen picture (the same frame for `frozen_after_s`), or frames that stay black
or saturated for `for_s`, make the pipeline `degraded` with the reason; so does a
sensor whose every channel stays on one value for `stuck_after_s`. It recovers by
itself when the input does. The picture check looks at a 32x24 grey thumbnail; making
it reads the whole frame (~0.15 ms for 640x480), so `InputQuality` shows the monitor a
frame at most 10 times a second (`PICTURE_CHECK_S`), enough for what is judged over
seconds. A sensor window is checked every time: that costs next to nothing.
"""

from __future__ import annotations

import logging

import numpy as np

from edged.config import QualitySettings
from edged.pipelines.sources import Frame, Window

log = logging.getLogger(__name__)
PICTURE_CHECK_S = 0.1


class QualityMonitor:
    def __init__(self, settings: QualitySettings) -> None:
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Forget the frames seen: what comes next is judged afresh."""
        self._thumbnail: np.ndarray | None = None
        self._changed_at: float | None = None
        self._level_since: dict[str, float] = {}
        self.reason = ""
        self.kinds: tuple[str, ...] = ()  # what is wrong ("frozen", "black", "saturated"), not for how long

    def check(self, image: np.ndarray, now: float) -> str:
        """Look at one frame taken at `now` (seconds); return the degradation reason or ''."""
        import cv2

        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        thumbnail = cv2.resize(grey, (32, 24), interpolation=cv2.INTER_AREA).astype(np.int16)
        if (self._thumbnail is None or self._changed_at is None
                or np.abs(thumbnail - self._thumbnail).max() > self.settings.frozen_tolerance):
            self._changed_at = now
        self._thumbnail = thumbnail
        level = float(thumbnail.mean())
        reasons, kinds = [], []
        frozen_for = now - self._changed_at
        if frozen_for >= self.settings.frozen_after_s:
            reasons.append(f"frozen picture for {frozen_for:.0f} s")
            kinds.append("frozen")
        for name, bad in (("black", level <= self.settings.dark_below),
                          ("saturated", level >= self.settings.bright_above)):
            if not bad:
                self._level_since.pop(name, None)
                continue
            since = self._level_since.setdefault(name, now)
            if now - since >= self.settings.for_s:
                reasons.append(f"{name} frames for {now - since:.0f} s (mean level {level:.0f})")
                kinds.append(name)
        self.reason, self.kinds = "; ".join(reasons), tuple(kinds)
        return self.reason


class SensorQualityMonitor:
    """A sensor stuck on one value: no channel moved more than `stuck_tolerance` for a while."""

    def __init__(self, settings: QualitySettings) -> None:
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        """Forget the samples seen: what comes next is judged afresh."""
        self._reference: np.ndarray | None = None  # the sample at the last change
        self._changed_at = 0.0
        self._samples = 0
        self.reason = ""
        self.kinds: tuple[str, ...] = ()

    def check(self, window: np.ndarray, samples: int, now: float) -> str:
        """Look at a window [N, C] that ends with sample number `samples`; return the reason or ''."""
        new = samples - self._samples
        self._samples = samples
        self.reason, self.kinds = "", ()
        if self.settings.stuck_after_s <= 0 or len(window) == 0:
            return ""
        # Only samples not seen in an earlier window count; all of them after a gap or a reset.
        fresh = window[-new:] if 0 < new < len(window) else window
        if (self._reference is None
                or np.abs(fresh - self._reference).max() > self.settings.stuck_tolerance):
            self._reference = window[-1].copy()
            self._changed_at = now
        stuck_for = now - self._changed_at
        if stuck_for >= self.settings.stuck_after_s:
            values = ", ".join(str(round(float(v), 6)) for v in self._reference)
            self.reason = f"sensor stuck on {values} for {stuck_for:.0f} s"
            self.kinds = ("stuck",)
        return self.reason


class InputQuality:
    """A pipeline's input as its monitor judges it, logged once per change.

    The reason names how long ("black frames for 12 s") and so changes every second;
    the log follows the kinds instead: a line when a degraded state starts, when what is
    wrong changes (black -> frozen) and when it ends. After the source reconnects the
    monitor starts afresh: the time the source was away is no frozen picture, no stuck
    sensor.
    """

    def __init__(self, settings: QualitySettings, sensor: bool, pipeline: str,
                 log_fields: dict[str, str]) -> None:
        self.monitor = SensorQualityMonitor(settings) if sensor else QualityMonitor(settings)
        self.pipeline = pipeline
        self._log_fields = log_fields
        self._due = 0.0  # monotonic time of the next picture check
        self._reconnects = 0

    @property
    def reason(self) -> str:
        return self.monitor.reason

    def see(self, item: Frame | Window, reconnects: int, now: float) -> None:
        """Judge a frame (at most every `PICTURE_CHECK_S`) or window taken from a source that
        has reconnected `reconnects` times; `now` is monotonic."""
        was = self.monitor.kinds
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self.monitor.reset()
            self._due = 0.0
            if was:
                log.info("pipeline %s: source reconnected, its input judged afresh (was: %s)",
                         self.pipeline, ", ".join(was), extra=self._log_fields)
            was = ()
        if isinstance(item, Window):
            assert isinstance(self.monitor, SensorQualityMonitor)
            self.monitor.check(item.data, item.samples, now)
        elif now >= self._due:
            assert isinstance(self.monitor, QualityMonitor)
            self._due = now + PICTURE_CHECK_S
            self.monitor.check(item.image, now)
        if self.monitor.kinds == was:
            return
        if self.monitor.kinds:
            log.warning("pipeline %s degraded: %s", self.pipeline, self.monitor.reason,
                        extra=self._log_fields)
        else:
            log.info("pipeline %s: input recovered", self.pipeline, extra=self._log_fields)
