"""Chunk requests from paho's thread to `serve_threads` workers, fairly, every refusal counted.

paho's thread only checks a request (at most 4 KiB of JSON) and queues it in a FairQueue
keyed by its response topic (one per device); what does not fit is answered `busy` at
once. Each worker takes the next request in turn, reads the chunk and waits for its
reply's PUBACK before taking another, so memory stays near serve_threads x max_chunk_bytes
plus the bounded queue, however many requests arrive and however slow the broker is.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

from paho.mqtt.client import MQTTMessage
from paho.mqtt.properties import Properties

from edged.registry.chunks import (
    ChunkRequest,
    RateLimitedLog,
    Refused,
    parse_request,
    read_chunk,
    reply_address,
    reply_properties,
    response_topics,
)
from edged.registry.connection import BrokerUnavailable, Connection
from edged.registry.fairness import FairQueue
from edged.registry.store import ServedFile

log = logging.getLogger(__name__)
REPLY_ACK_TIMEOUT_S = 30.0
UNACKED_REFUSALS = 1024  # refusals sent without waiting and not yet acknowledged; more: unanswered
BUSY = Refused("busy", "the registry is busy; try again")


class ChunkWorkers:
    def __init__(self, connection: Connection, prefix: str, max_chunk_bytes: int, threads: int,
                 index: Callable[[str], dict[str, ServedFile]]) -> None:
        """`index(sha256)` is the file index to answer from (the caller may look at the store
        again for a hash it does not know yet)."""
        self.connection = connection
        self.max_chunk_bytes = max_chunk_bytes
        self.index = index
        self.queue: FairQueue[ChunkRequest] = FairQueue()
        self.refusals = RateLimitedLog()
        self.stats = {"chunks": 0, "bytes": 0, "refused": 0, "busy": 0, "unanswered": 0}
        self._stats_lock = threading.Lock()
        self._unacked: set[int] = set()  # mids of refusals sent without waiting
        connection.on_acked = self._on_acked
        self._allowed = response_topics(prefix)
        self._threads = [threading.Thread(target=self._work, name=f"chunk-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Drop what waits (devices ask again), let the replies being sent finish."""
        self.queue.close()
        for thread in self._threads:
            thread.join(REPLY_ACK_TIMEOUT_S + 5)

    def summary(self) -> str:
        s = self.stats
        return (f"served {s['chunks']} chunks ({s['bytes']} bytes), refused {s['refused']} requests "
                f"({s['busy']} busy, {s['unanswered']} of them unanswered); {len(self.queue)} waiting "
                f"from {self.queue.requesters} devices")

    # --- paho's thread -------------------------------------------------------------------
    def submit(self, message: MQTTMessage) -> None:
        """Check the request and queue it; answer a bad one, or one that does not fit, at once."""
        try:
            request = parse_request(message, self._allowed, self.max_chunk_bytes)
        except Refused as exc:
            address = reply_address(message, self._allowed)
            self._refuse(address[0] if address else None, address[1] if address else None, exc, wait=False)
            return
        refused = self.queue.put(request.response_topic, request)
        if refused is not None:  # the new request, or the newest of a longer queue
            self._refuse(refused.response_topic, refused.correlation, BUSY, wait=False)

    # --- the workers ---------------------------------------------------------------------
    def _work(self) -> None:
        while (request := self.queue.get()) is not None:
            try:
                self._serve(request)
            except Exception:  # one request must not end a worker
                log.exception("answering a chunk request failed")

    def _serve(self, request: ChunkRequest) -> None:
        try:
            data = read_chunk(self.index(request.sha256), request)
        except Refused as exc:
            self._refuse(request.response_topic, request.correlation, exc, wait=True)
            return
        reply = reply_properties(request.correlation, status="ok", sha256=request.sha256,
                                 offset=str(request.offset))
        self._send(request.response_topic, data, reply, wait=True)
        with self._stats_lock:
            self.stats["chunks"] += 1
            self.stats["bytes"] += len(data)

    def _refuse(self, topic: str | None, correlation: bytes | None, refusal: Refused, *, wait: bool) -> None:
        with self._stats_lock:
            self.stats["refused"] += 1
            if refusal is BUSY:
                self.stats["busy"] += 1
        self.refusals.warning(refusal.kind, f"refused a chunk request: {refusal}")
        if topic is None:
            return  # nowhere we may answer
        with self._stats_lock:
            if not wait and len(self._unacked) >= UNACKED_REFUSALS:
                # The broker takes our refusals slower than they come: leave this one
                # unanswered (the sender times out) rather than crowd out the chunk replies.
                self.stats["unanswered"] += 1
                return
        payload = json.dumps({"error": str(refusal)}).encode()
        mid = self._send(topic, payload, reply_properties(correlation, status="error"), wait=wait)
        if not wait and mid is not None:
            with self._stats_lock:
                self._unacked.add(mid)

    def _on_acked(self, mid: int) -> None:
        with self._stats_lock:
            if mid not in self._unacked:
                return
            self._unacked.discard(mid)
        self.connection.forget(mid)  # else kept per mid until paho reuses it

    def _send(self, topic: str, payload: bytes, properties: Properties, *, wait: bool) -> int | None:
        """Publish a reply (its mid, None if not sent); a worker waits for its PUBACK, which
        bounds the replies in flight. Refusals sent without waiting (from paho's thread, which
        also receives the PUBACKs, so no ack can come before the mid is recorded) are bounded
        by UNACKED_REFUSALS, paho's whole queue by max_queued_messages_set."""
        try:
            mid = self.connection.publish(topic, payload, properties=properties)
            if wait:
                self.connection.wait_acked([mid], REPLY_ACK_TIMEOUT_S)
            return mid
        except BrokerUnavailable as exc:
            self.refusals.warning("reply", f"a chunk reply was not sent or not acknowledged: {exc}")
            return None
