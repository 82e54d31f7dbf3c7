"""Sensor samples from the messages of an MQTT topic filter (`kind = "mqtt"`).

Each message holds one or more lines, CSV or JSON as for the other line sources, parsed
by the same `LineParser` into samples and windows; a malformed line is counted and
skipped. The link calls us on its network thread, which must not wait: a message is
only queued there (bounded in bytes; what does not fit is dropped and counted), and the
source's own thread parses it. The source is `running` while the broker is connected
and `reconnecting` while not; the link subscribes again by itself after a reconnect.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from edged.config import SourceSettings
from edged.pipelines.mqtt_port import SharedPort
from edged.pipelines.sources.sensors import WAIT_S, LineSource

log = logging.getLogger(__name__)
MAX_MESSAGE = 1 << 20  # bytes; a bigger message is malformed
MAX_QUEUED = 4 << 20  # bytes of messages waiting to be parsed; more are dropped
NOT_CONNECTED = "MQTT broker not connected"


class MqttTopicSource(LineSource):
    def __init__(self, settings: SourceSettings, name: str, port: SharedPort) -> None:
        super().__init__(settings, name)
        self.port = port
        self.topic_filter = str(settings.uri)
        self.messages = 0  # received
        self.messages_dropped = 0  # received while MAX_QUEUED bytes waited
        self._inbox: collections.deque[bytes | int] = collections.deque()  # int: an oversized message
        self._queued = 0
        self._ready = threading.Condition()
        self._was_running = False
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        # Listening starts here, not in the thread: once the pipeline has started, no message is missed.
        self._unsubscribe = self.port.subscribe(self.topic_filter, self._on_message)
        super().start()

    def stop(self) -> None:
        super().stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_message(self, topic: str, payload: bytes) -> None:
        """On the MQTT network thread: queue the message and return."""
        with self._ready:
            self.messages += 1
            item: bytes | int = payload if len(payload) <= MAX_MESSAGE else len(payload)
            size = len(payload) if isinstance(item, bytes) else 0
            if self._queued + size > MAX_QUEUED:
                self.messages_dropped += 1
                return
            self._inbox.append(item)
            self._queued += size
            self._ready.notify()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._follow_link()
            item = self._next(WAIT_S)
            if item is not None:
                self._parse(item)

    def _follow_link(self) -> None:
        if self.port.connected.is_set():
            if self.state != "running":
                if self._was_running:
                    self.reconnects += 1
                    log.info("%s: MQTT broker connected again", self.label)
                self._was_running = True
                self._connected()
        elif self.state != "reconnecting":
            if self._was_running:
                log.warning("%s: %s; waiting for it", self.label, NOT_CONNECTED)
            while (item := self._next(0)) is not None:  # what came before the loss
                self._parse(item)
            assert self.window is not None
            self.window.reset()  # a window must not span the gap
            self.last_error = NOT_CONNECTED
            self.state = "reconnecting"

    def _next(self, timeout: float) -> bytes | int | None:
        with self._ready:
            if not self._inbox and timeout:
                self._ready.wait(timeout)
            if not self._inbox:
                return None
            item = self._inbox.popleft()
            self._queued -= len(item) if isinstance(item, bytes) else 0
            return item

    def _parse(self, item: bytes | int) -> None:
        if isinstance(item, int):
            self.rejects.note(f"a message of {item} bytes, over {MAX_MESSAGE}")
            return
        self._consume(item + b"\n")  # a message is whole: its last line needs no newline

    def details(self) -> dict:
        return {**super().details(), "messages": self.messages, "messages_dropped": self.messages_dropped}
