"""Is the input worth trusting? A camera or a sensor can be online and still useless.

A frozen picture (the same frame for `frozen_after_s`), or frames that stay black
or saturated for `for_s`, make the pipeline `degraded` with the reason; so does a
sensor whose every channel stays on one value for `stuck_after_s`. It recovers by
itself when the input does. The picture check looks at a 32x24 grey thumbnail; making
it reads the whole frame (~0.15 ms for 640x480), so a pipeline shows the monitor a
frame at most 10 times a second (`runner.PICTURE_CHECK_S`), enough for what is judged
over seconds. A sensor window is checked every time: that costs next to nothing.
"""

from __future__ import annotations

import numpy as np

from edged.config import QualitySettings


class QualityMonitor:
    def __init__(self, settings: QualitySettings) -> None:
        self.settings = settings
        self._thumbnail: np.ndarray | None = None
        self._changed_at: float | None = None
        self._level_since: dict[str, float] = {}
        self.reason = ""

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
        reasons = []
        frozen_for = now - self._changed_at
        if frozen_for >= self.settings.frozen_after_s:
            reasons.append(f"frozen picture for {frozen_for:.0f} s")
        for name, bad in (("black", level <= self.settings.dark_below),
                          ("saturated", level >= self.settings.bright_above)):
            if not bad:
                self._level_since.pop(name, None)
                continue
            since = self._level_since.setdefault(name, now)
            if now - since >= self.settings.for_s:
                reasons.append(f"{name} frames for {now - since:.0f} s (mean level {level:.0f})")
        self.reason = "; ".join(reasons)
        return self.reason


class SensorQualityMonitor:
    """A sensor stuck on one value: no channel moved more than `stuck_tolerance` for a while."""

    def __init__(self, settings: QualitySettings) -> None:
        self.settings = settings
        self._reference: np.ndarray | None = None  # the sample at the last change
        self._changed_at = 0.0
        self._samples = 0
        self.reason = ""

    def check(self, window: np.ndarray, samples: int, now: float) -> str:
        """Look at a window [N, C] that ends with sample number `samples`; return the reason or ''."""
        new = samples - self._samples
        self._samples = samples
        if self.settings.stuck_after_s <= 0 or len(window) == 0:
            self.reason = ""
            return ""
        # Only samples not seen in an earlier window count; all of them after a gap or a reset.
        fresh = window[-new:] if 0 < new < len(window) else window
        if (self._reference is None
                or np.abs(fresh - self._reference).max() > self.settings.stuck_tolerance):
            self._reference = window[-1].copy()
            self._changed_at = now
        stuck_for = now - self._changed_at
        self.reason = ""
        if stuck_for >= self.settings.stuck_after_s:
            values = ", ".join(str(round(float(v), 6)) for v in self._reference)
            self.reason = f"sensor stuck on {values} for {stuck_for:.0f} s"
        return self.reason
