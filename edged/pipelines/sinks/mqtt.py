"""Results to `edged/devices/{id}/results/{pipeline}` over the daemon's MQTT link.

A result is `put` into the link's on-disk outbox (a local SQLite insert), so the
pipeline never waits for the network and results made while the broker is away are
sent after it comes back. Two options keep a busy pipeline from flooding the broker:
a rate limit, and publishing only when the result changes (with a heartbeat so a
consumer still hears from a steady scene). The sink counts what it published and
what it left out, and never raises: a failure is counted and logged once per kind.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from edged.config import SinkSettings
from edged.pipelines.mqtt_port import SharedPort

log = logging.getLogger(__name__)
IGNORED = frozenset({"frame", "window", "time"})  # differ in every result, so never a change
ONE_TOKEN = 1.0 - 1e-9  # a token counts as whole despite float error (30 fps at 10 Hz stays 10 Hz)


def same_result(a: dict, b: dict, tolerance: float) -> bool:
    """Are two results alike, but for their frame or window number and time?

    Numbers are alike when they differ by less than `tolerance` (a box that jitters by
    a fraction of a pixel is the same box); integers, booleans, strings, the keys and
    the lengths of lists (how many detections) must be equal.
    """
    if a.keys() != b.keys():
        return False
    return all(_alike(a[key], b[key], tolerance) for key in a if key not in IGNORED)


def _alike(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if isinstance(a, float) or isinstance(b, float):
            return abs(a - b) < tolerance  # NaN is never alike
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_alike(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_alike(x, y, tolerance) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class ChangeFilter:
    """Lets a result through when it differs from the last one let through, or the heartbeat is due."""

    def __init__(self, digits: int, heartbeat_s: float = 0.0) -> None:
        self.tolerance = 10.0 ** -digits
        self.heartbeat_s = heartbeat_s
        self._last: dict | None = None
        self._last_at = -math.inf

    def wanted(self, result: dict, now: float) -> bool:
        if self._last is None:
            return True
        if self.heartbeat_s and now - self._last_at >= self.heartbeat_s:
            return True
        return not same_result(self._last, result, self.tolerance)

    def published(self, result: dict, now: float) -> None:
        self._last, self._last_at = result, now


class RateLimiter:
    """At most `rate_hz` per second: a token bucket holding one token, so at most
    1 + rate_hz * T over any T seconds, and no bursts after a quiet spell."""

    def __init__(self, rate_hz: float) -> None:
        self.rate_hz = rate_hz
        self._tokens = 1.0
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(1.0, self._tokens + (now - self._at) * self.rate_hz)
        self._at = now
        if self._tokens < ONE_TOKEN:
            return False
        self._tokens -= 1.0
        return True


class MqttSink:
    kind = "mqtt"

    def __init__(self, settings: SinkSettings, pipeline: str, port: SharedPort) -> None:
        self.pipeline = pipeline
        self.port = port
        self.changes = (ChangeFilter(settings.change_digits, settings.heartbeat_s) if settings.on_change
                        else None)
        self.limiter = RateLimiter(settings.max_rate_hz) if settings.max_rate_hz else None
        self.published = 0
        self.rate_limited = 0  # dropped: over max_rate_hz
        self.unchanged = 0  # left out: like the last one published (on_change)
        self.failed = 0
        self.last_error = ""
        self.problem = ""  # why publishing fails now, for the pipeline's status; '' while it works

    def write(self, result: dict) -> None:
        now = time.monotonic()
        try:
            if self.changes is not None and not self.changes.wanted(result, now):
                self.unchanged += 1
                return
            if self.limiter is not None and not self.limiter.allow(now):
                self.rate_limited += 1
                return
            if not self.port.put_result(self.pipeline, result):
                raise OSError("the MQTT outbox refused it (see the daemon log)")
        except Exception as exc:  # whatever it is, the pipeline goes on
            self.failed += 1
            message = f"{type(exc).__name__}: {exc}"
            if message != self.last_error or not self.problem:
                log.warning("pipeline %s: publishing a result failed: %s", self.pipeline, message)
            self.last_error = message
            self.problem = f"mqtt sink failing: {message}"
            return
        if self.changes is not None:
            self.changes.published(result, now)
        self.published += 1
        if self.problem:
            log.info("pipeline %s: publishing results again", self.pipeline)
            self.problem = ""

    def details(self) -> dict:
        return {"kind": self.kind, "published": self.published, "rate_limited": self.rate_limited,
                "unchanged": self.unchanged, "failed": self.failed, "last_error": self.last_error}

    def close(self) -> None:
        """Nothing to flush: what was put is in the outbox, which the link sends."""
