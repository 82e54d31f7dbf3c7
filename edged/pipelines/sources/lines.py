"""Sensor samples from text lines, and the windows of samples a model sees.

Nothing here does I/O, so every line source (serial, FIFO, followed file, stdin)
and later MQTT messages share one parser and one window. A line that does not
give exactly the configured channels as finite numbers is malformed: counted,
skipped, and logged in one line at most every `LOG_EVERY_S` per source, so a
flood of bad lines does not flood the log.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0
SHOWN_CHARS = 60  # of a malformed line, in the log and the status
FLOAT32_MAX = float(np.finfo(np.float32).max)


class Rejects:
    """Counts bad input and logs it without flooding: one line, then one per `LOG_EVERY_S`."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.count = 0
        self.last = ""
        self._logged_at = -math.inf
        self._unlogged = 0

    def note(self, reason: str, text: str = "") -> None:
        self.count += 1
        self.last = f"{reason}: {text[:SHOWN_CHARS]!r}" if text else reason
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        log.warning("%s: skipped a malformed sample, %s%s", self.label, self.last, more)
        self._logged_at, self._unlogged = now, 0


class LineParser:
    """One line of CSV or JSON -> one sample: float32 [channels], or None (blank or malformed).

    csv: comma-separated numbers; `columns` picks and orders them (all when empty).
    jsonl: a list of numbers, or an object whose `fields` are read in order.
    """

    def __init__(self, fmt: str, channels: int, fields: Sequence[str] = (), columns: Sequence[int] = (),
                 label: str = "sensor") -> None:
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"format {fmt!r} is not csv or jsonl")
        self.format = fmt
        self.channels = channels
        self.fields = list(fields)
        self.columns = list(columns)
        self.rejects = Rejects(label)

    @property
    def malformed(self) -> int:
        return self.rejects.count

    def parse(self, line: bytes | str) -> np.ndarray | None:
        if isinstance(line, bytes):
            try:
                line = line.decode()
            except UnicodeDecodeError:
                self.rejects.note("not UTF-8", line.decode(errors="replace"))
                return None
        text = line.strip()
        if not text:
            return None
        try:
            values = self._csv(text) if self.format == "csv" else self._json(text)
            if len(values) != self.channels:
                raise ValueError(f"{len(values)} values, expected {self.channels}")
            exact = np.array(values, np.float64)
            if not (np.abs(exact) <= FLOAT32_MAX).all():  # also false for NaN
                raise ValueError("a value is not a finite float32")
        except (ValueError, OverflowError) as exc:
            self.rejects.note(str(exc), text)
            return None
        return exact.astype(np.float32)

    def _csv(self, text: str) -> list[float]:
        parts = text.split(",")
        if self.columns:
            if max(self.columns) >= len(parts):
                raise ValueError(f"{len(parts)} columns, column {max(self.columns)} wanted")
            parts = [parts[c] for c in self.columns]
        try:
            return [float(part) for part in parts]
        except ValueError:
            raise ValueError("not a number") from None

    def _json(self, text: str) -> list[float]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg})") from None
        if isinstance(value, dict):
            if not self.fields:
                raise ValueError("a JSON object, but source.fields names none of its keys")
            missing = [f for f in self.fields if f not in value]
            if missing:
                raise ValueError(f"no field {missing[0]!r}")
            value = [value[f] for f in self.fields]
        elif not isinstance(value, list):
            raise ValueError("not a JSON list or object")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ValueError("a value is not a number")
        return value


class SampleWindow:
    """The last `size` samples; a window once it is first full, then every `stride` new samples.

    Every sample is written twice, `size` rows apart, so the current window is always one
    contiguous slice to copy, whatever the write position.
    """

    def __init__(self, size: int, stride: int, channels: int) -> None:
        self.size = size
        self.stride = stride
        self.channels = channels
        self.samples = 0  # pushed in all
        self._rows = np.zeros((2 * size, channels), np.float32)
        self._head = 0  # where the next sample goes
        self._filled = 0
        self._since = 0  # samples since the last window

    def push(self, sample: np.ndarray) -> np.ndarray | None:
        """Add one sample; return a new float32 [size, channels] window when one is due."""
        self._rows[self._head] = self._rows[self._head + self.size] = sample
        self._head = (self._head + 1) % self.size
        self.samples += 1
        if self._filled < self.size:
            self._filled += 1
            if self._filled < self.size:
                return None
        else:
            self._since += 1
            if self._since < self.stride:
                return None
        self._since = 0
        return self._rows[self._head : self._head + self.size].copy()

    def reset(self) -> None:
        """Forget the samples so far (the sensor was lost): the next window starts afresh."""
        self._filled = self._since = 0
