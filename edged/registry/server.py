"""`edged-registry serve`: answers chunk requests and keeps the releases retained.

Threads: paho's network thread only queues each request; `serve_threads` workers check
it, read the chunk and reply (each waits for its reply's PUBACK before taking another, so
memory stays near serve_threads x max_chunk_bytes however slow the broker is); the main
thread watches the store, re-announces and re-signs releases, and handles signals.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from edged.errors import EdgedError
from edged.registry.chunks import (
    RateLimitedLog,
    Refused,
    parse_request,
    read_chunk,
    reply_address,
    reply_properties,
    response_topics,
)
from edged.registry.config import RegistrySettings
from edged.registry.connection import BrokerRefused, BrokerUnavailable, Connection
from edged.registry.publisher import refreshed
from edged.registry.store import RegistryStore, ServedFile, Target
from edged.topics import Topics

log = logging.getLogger(__name__)
MAX_WAITING = 1024  # requests queued for the workers; more are answered "busy"
REPLY_ACK_TIMEOUT_S = 30.0
RESIGN_CHECK_S = 600.0  # re-signing is due after days; checking every 10 minutes is plenty


class ChunkServer:
    def __init__(self, settings: RegistrySettings, store: RegistryStore) -> None:
        self.settings = settings
        self.store = store
        self.topics = Topics(settings.topic_prefix)
        self.index: dict[str, ServedFile] = {}
        self.refusals = RateLimitedLog()
        self.stats = {"chunks": 0, "bytes": 0, "refused": 0}
        self._stats_lock = threading.Lock()
        self._key = store.signing_key()
        self._generation: tuple[int, int] | None = None
        self._published: dict[Target, bytes] = {}  # what this process last retained per target
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reconnected = threading.Event()
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._workers = ThreadPoolExecutor(settings.serve_threads, thread_name_prefix="chunk")
        self._response_topics = response_topics(settings.topic_prefix)
        self.connection = Connection(settings.mqtt, settings.mqtt.device_id,
                                     will=(self.topics.registry_status,
                                           self._status("offline", "connection lost")))
        self.connection.on_message = self._on_request
        self.connection.on_connected = self._on_connected

    # --- lifecycle -----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the store at once."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT,
                                                                          signal.SIGHUP)}
        try:
            self._reload_store()
            self.connection.start()
            log.info("serving the registry %s through %s", self.store.root, self.connection.broker)
            next_resign = time.monotonic() + RESIGN_CHECK_S
            while not self._stop.is_set():
                self._wake.wait(self.settings.reload_interval_s)
                self._wake.clear()
                if self._stop.is_set():
                    break
                changed = self._reload.is_set() or self.store.generation() != self._generation
                self._reload.clear()
                if changed:
                    self._reload_store()
                if self._reconnected.is_set() and self.connection.connected.is_set():
                    self._reconnected.clear()
                    self._go_online()
                elif changed or time.monotonic() >= next_resign:
                    self._announce(force=False)
                if time.monotonic() >= next_resign:
                    next_resign = time.monotonic() + RESIGN_CHECK_S
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _shutdown(self) -> None:
        self.connection.client.unsubscribe(self.topics.fetch)
        self._workers.shutdown(wait=True, cancel_futures=True)
        if self.connection.connected.is_set():
            try:
                self.connection.publish_and_wait(self.topics.registry_status,
                                                 self._status("offline", "shutdown"),
                                                 self.settings.connect_timeout_s, retain=True)
            except BrokerUnavailable as exc:
                log.warning("could not say offline: %s", exc)
        self.connection.close()
        log.info("stopped: served %d chunks (%d bytes), refused %d requests",
                 self.stats["chunks"], self.stats["bytes"], self.stats["refused"])

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()
        self._wake.set()

    # --- the store and the retained releases (main thread) -------------------------------
    def _reload_store(self) -> None:
        self._generation = self.store.generation()
        self.index = self.store.file_index()  # replaced whole: workers see the old or the new
        log.info("serving %d files", len(self.index))

    def _on_connected(self) -> None:
        """paho's thread: leave the work to the main thread."""
        self._reconnected.set()
        self._wake.set()

    def _go_online(self) -> None:
        """After each connect: subscribe, retain every release again (a restarted broker may
        have lost them), then say online. A broker that refuses the subscription ends `serve`."""
        timeout = self.settings.connect_timeout_s
        try:
            self.connection.subscribe([self.topics.fetch], timeout)
        except BrokerRefused:
            raise
        except BrokerUnavailable as exc:
            log.error("%s; trying again", exc)
            self._reconnected.set()
            return
        self._announce(force=True)
        try:
            self.connection.publish_and_wait(self.topics.registry_status, self._status("online"), timeout,
                                             retain=True)
        except BrokerUnavailable as exc:
            log.error("could not say online: %s", exc)
            return
        log.info("online: answering chunk requests on %s", self.topics.fetch)

    def _announce(self, force: bool) -> None:
        """Retain what the store records, re-signing releases past 2/3 of their validity."""
        now = time.time()
        sent: dict[int, Target] = {}
        for target, envelope in self.store.retained().items():
            payload = envelope
            if envelope:
                try:
                    with self.store.lock():  # re-read under the lock: a command may have changed it
                        current = self.store.retained_for(target) or b""
                        renewed = None
                        if current:
                            renewed = refreshed(current, self._key, self.settings.release_days, now)
                        if renewed is not None:
                            self.store.set_retained(target, renewed)
                            self._generation = self.store.generation()
                            log.info("re-signed the release of %s", target.describe())
                        payload = renewed or current
                except EdgedError as exc:
                    log.error("not announcing %s: %s", target.describe(), exc)
                    continue
            if not force and self._published.get(target) == payload:
                continue
            if not self.connection.connected.is_set():
                break
            sent[self.connection.publish(self.topics.release(target.name, target.group), payload,
                                         retain=True)] = target
            self._published[target] = payload
        for mid, target in sent.items():
            try:
                self.connection.wait_acked([mid], self.settings.connect_timeout_s)
            except BrokerUnavailable as exc:
                log.error("announcing %s failed: %s", target.describe(), exc)
                self._published.pop(target, None)
            else:
                payload = self._published.get(target)
                log.info("%s %s", "withdrew" if not payload else "announced", target.describe())

    def _status(self, state: str, reason: str = "") -> bytes:
        document: dict[str, Any] = {"state": state, "time": round(time.time(), 3)}
        if state == "online":
            document.update(files=len(self.index), max_chunk_bytes=self.settings.max_chunk_bytes)
        if reason:
            document["reason"] = reason
        return json.dumps(document, separators=(",", ":")).encode()

    # --- chunk requests ------------------------------------------------------------------
    def _on_request(self, message: mqtt.MQTTMessage) -> None:
        """paho's thread: hand the request to a worker, or say busy when too many wait."""
        with self._waiting_lock:
            busy = self._waiting >= MAX_WAITING
            if not busy:
                self._waiting += 1
        if busy:  # answered from paho's thread, without waiting for the PUBACK
            self._answer_refusal(message, Refused("busy", "the registry is busy; try again"), wait=False)
            return
        try:
            self._workers.submit(self._serve_one, message)
        except RuntimeError:  # shutting down
            with self._waiting_lock:
                self._waiting -= 1

    def _serve_one(self, message: mqtt.MQTTMessage) -> None:
        with self._waiting_lock:
            self._waiting -= 1
        try:
            request = parse_request(message, self._response_topics, self.settings.max_chunk_bytes)
            if request.sha256 not in self.index and self.store.generation() != self._generation:
                # Published a moment ago: look at the store now rather than at the next reload,
                # and have the main loop announce what changed.
                self.index = self.store.file_index()
                self._wake.set()
            data = read_chunk(self.index, request)
        except Refused as exc:
            self._answer_refusal(message, exc)
            return
        reply = reply_properties(request.correlation, status="ok", sha256=request.sha256,
                                 offset=str(request.offset))
        self._send(request.response_topic, data, reply, wait=True)
        with self._stats_lock:
            self.stats["chunks"] += 1
            self.stats["bytes"] += len(data)

    def _answer_refusal(self, message: mqtt.MQTTMessage, refusal: Refused, wait: bool = True) -> None:
        with self._stats_lock:
            self.stats["refused"] += 1
        self.refusals.warning(refusal.kind, f"refused a chunk request: {refusal}")
        address = reply_address(message, self._response_topics)
        if address is None:
            return  # nowhere we may answer
        topic, correlation = address
        payload = json.dumps({"error": str(refusal)}).encode()
        self._send(topic, payload, reply_properties(correlation, status="error"), wait=wait)

    def _send(self, topic: str, payload: bytes, properties: Properties, *, wait: bool) -> None:
        """Publish a reply; a worker waits for its PUBACK, which bounds the replies in flight."""
        try:
            mid = self.connection.publish(topic, payload, properties=properties)
            if wait:
                self.connection.wait_acked([mid], REPLY_ACK_TIMEOUT_S)
        except BrokerUnavailable as exc:
            self.refusals.warning("reply", f"a chunk reply was not acknowledged: {exc}")


def serve(settings: RegistrySettings, store: RegistryStore) -> None:
    ChunkServer(settings, store).run()
