"""What pipelines need from the daemon's MQTT link, so that they never import `edged.mqtt`.

`MqttPipe` (edged/mqtt/parts.py: the daemon's outbox and link) implements `MqttPort` and is
given to `Pipelines` when it is built, which wraps it in one `SharedPort` for all pipelines. The link adds a
handler per `subscribe` call and never removes one (it has no unsubscribe), so a pipeline
that stopped would still be called and every restart would add another handler.
`SharedPort` subscribes the link once per topic filter, for good, and passes each message
to the pipelines listening now; `subscribe` returns the call that stops one listening, and
one pipeline's failing handler does not keep the message from the others.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)
MessageHandler = Callable[[str, bytes], None]  # (topic, payload), called on the MQTT network thread


class MqttPort(Protocol):
    @property
    def connected(self) -> threading.Event:
        """Set while the broker is connected."""
        ...

    def put_result(self, pipeline: str, document: dict) -> bool:
        """Queue a result for `edged/devices/{id}/results/{pipeline}` in the outbox; never waits.
        False when the outbox refused it."""
        ...

    def put_snapshot(self, pipeline: str, jpeg: bytes) -> bool:
        """Queue a JPEG for `edged/devices/{id}/snapshots/{pipeline}`, retained, in place of
        any older one still waiting; never waits. False when the outbox refused it."""
        ...

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Call `handler` for every message on `topic_filter`, on this connection and later ones."""
        ...


class SharedPort:
    """An `MqttPort` shared by every pipeline of the daemon."""

    def __init__(self, port: MqttPort) -> None:
        self.port = port
        self._handlers: dict[str, tuple[MessageHandler, ...]] = {}
        self._lock = threading.Lock()

    @property
    def connected(self) -> threading.Event:
        return self.port.connected

    def put_result(self, pipeline: str, document: dict) -> bool:
        return self.port.put_result(pipeline, document)

    def put_snapshot(self, pipeline: str, jpeg: bytes) -> bool:
        return self.port.put_snapshot(pipeline, jpeg)

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> Callable[[], None]:
        """Add `handler` for `topic_filter`; returns the call that removes it again."""
        with self._lock:
            known = topic_filter in self._handlers
            self._handlers[topic_filter] = (*self._handlers.get(topic_filter, ()), handler)
        if not known:  # the link's one handler for this filter, kept for good (no unsubscribe)
            self.port.subscribe(topic_filter, functools.partial(self._dispatch, topic_filter))
        return functools.partial(self._unsubscribe, topic_filter, handler)

    def _unsubscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        with self._lock:
            self._handlers[topic_filter] = tuple(h for h in self._handlers[topic_filter] if h != handler)

    def _dispatch(self, topic_filter: str, topic: str, payload: bytes) -> None:
        for handler in self._handlers.get(topic_filter, ()):
            try:
                handler(topic, payload)
            except Exception:  # one pipeline's bug must not starve the others of the message
                log.exception("handling an MQTT message on %s failed", topic)
