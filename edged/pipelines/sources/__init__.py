"""Where frames and sensor windows come from. Every source keeps only the newest item:
a slow model drops frames or windows (and counts them) instead of building a queue."""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edged.config import SourceSettings

if TYPE_CHECKING:
    from edged.pipelines.mqtt_port import SharedPort


@dataclass
class Frame:
    number: int
    image: np.ndarray  # BGR uint8
    captured_at: float  # time.time()


@dataclass
class Window:
    """The newest `window` samples of a sensor, oldest first: float32 [N samples, C channels]."""

    number: int
    data: np.ndarray
    captured_at: float  # time.time() of the newest sample
    samples: int = 0  # samples the source had read when this window was complete


class LatestFrame:
    """A one-slot mailbox: `put` replaces an unread item (a drop), `take` waits for a new one.

    `on_put`, when set, is called after each put (outside the mailbox's lock): a reader
    that waits for more than this mailbox (a pipeline's worker) learns of the new item.
    """

    def __init__(self, item: type[Frame] | type[Window] = Frame) -> None:
        self._item = item
        self._frame: Frame | Window | None = None
        self._unread = False
        self._cond = threading.Condition()
        self.received = 0
        self.dropped = 0
        self.taken = 0
        self.on_put: Callable[[], None] | None = None

    def put(self, data: np.ndarray, **extra: int) -> None:
        with self._cond:
            if self._unread:
                self.dropped += 1
            self.received += 1
            self._frame = self._item(self.received, data, time.time(), **extra)
            self._unread = True
            self._cond.notify_all()
        if self.on_put is not None:
            self.on_put()

    @property
    def pending(self) -> int:
        """1 while a frame waits in the slot."""
        return int(self._unread)

    def wait_taken(self, timeout: float) -> bool:
        """For sources that can wait (files): block until the frame in the slot was taken."""
        with self._cond:
            if self._unread:
                self._cond.wait(timeout)
            return not self._unread

    def take(self, timeout: float) -> Frame | Window | None:
        with self._cond:
            if not self._unread:
                self._cond.wait(timeout)
            if not self._unread:
                return None
            self._unread = False
            self.taken += 1
            self._cond.notify_all()  # a waiting file reader may decode the next frame
            return self._frame


class ThreadedSource(abc.ABC):
    """A grabber thread filling a `LatestFrame`; subclasses write `_grab`."""

    def __init__(self, uri: str) -> None:
        self.frames = LatestFrame()
        self.state = "starting"  # starting | running | reconnecting | finished | stopping | stopped
        self.last_error = ""
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._grab, name=f"source-{uri[:30]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        # A grabber stuck inside a driver call is left to finish on its own.
        self.state = "stopped" if not self._thread.is_alive() else "stopping"

    def take(self, timeout: float) -> Frame | Window | None:
        return self.frames.take(timeout)

    def details(self) -> dict:
        """What this kind of source adds to the pipeline's status."""
        return {}

    @abc.abstractmethod
    def _grab(self) -> None:
        """Put frames until `_stop` is set; keep `state` and `last_error` true."""


def build_source(settings: SourceSettings, name: str = "", mqtt: SharedPort | None = None) -> ThreadedSource:
    """The source `settings.kind` names; `name` (the pipeline's) labels its log lines;
    `mqtt` (the daemon's link, when it has one) feeds `kind = "mqtt"`."""
    from edged.pipelines.sources.camera import CameraSource
    from edged.pipelines.sources.fifo import FifoSource
    from edged.pipelines.sources.iio import IioSource
    from edged.pipelines.sources.images import ImageFolderSource
    from edged.pipelines.sources.mqtt_topic import MqttTopicSource
    from edged.pipelines.sources.sensors import FollowedFileSource, LineSource, SerialSource, StdinSource

    line_sources: dict[str, type[LineSource]] = {
        "serial": SerialSource, "fifo": FifoSource, "file": FollowedFileSource, "stdin": StdinSource}
    if settings.kind == "mqtt":
        if mqtt is None:
            raise ValueError("a source of kind = 'mqtt' needs mqtt.enabled (and a daemon restarted with it)")
        return MqttTopicSource(settings, name, mqtt)
    if settings.kind == "images":
        return ImageFolderSource(settings)
    if settings.kind == "iio":
        return IioSource(settings, name)
    if settings.kind in line_sources:
        return line_sources[settings.kind](settings, name)
    return CameraSource(settings)
