"""Results to local subscribers (the socket's NDJSON event stream), never waiting for them.

Each subscriber has a bounded queue; when a slow subscriber's queue is full its
newest results are dropped and counted, and the pipeline goes on at full speed.
"""

from __future__ import annotations

import queue
import threading


class Subscription:
    def __init__(self, hub: EventHub, size: int) -> None:
        self.hub = hub
        self.queue: queue.Queue[dict] = queue.Queue(maxsize=size)
        self.dropped = 0

    def get(self, timeout: float) -> dict | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)


class EventHub:
    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def subscribe(self) -> Subscription:
        subscription = Subscription(self, self.queue_size)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def write(self, result: dict) -> None:
        for subscription in list(self._subscribers):
            try:
                subscription.queue.put_nowait(result)
            except queue.Full:
                subscription.dropped += 1

    def close(self) -> None:
        self.closed.set()
