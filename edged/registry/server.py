"""`edged-registry serve`: answers chunk requests and keeps the releases retained.

Any number of instances may serve one store (docs/fleet.md): they share the chunk
requests through an MQTT 5 shared subscription, and announce and re-sign under the
store's lock, so the broker always ends up retaining what the store records.

Threads: paho's network thread only checks and queues each request (workers.py);
`serve_threads` workers read the chunks and reply; the main thread watches the store,
re-announces and re-signs releases (announcer.py), and handles signals; the rollout driver
(rollout_driver.py) follows the fleet (fleet_follow.py).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt

from edged.registry.announcer import Announcer
from edged.registry.config import RegistrySettings
from edged.registry.connection import BrokerRefused, BrokerUnavailable, Connection, SharedUnsupported
from edged.registry.fleet import FleetWatcher
from edged.registry.fleet_follow import follow_fleet
from edged.registry.publisher import Publisher
from edged.registry.rollout_driver import RolloutDriver
from edged.registry.store import RegistryStore, ServedFile
from edged.registry.workers import ChunkWorkers
from edged.topics import Topics

log = logging.getLogger(__name__)
MAX_QUEUED = 4096  # replies paho may hold unsent (busy ones are not waited for): bounded memory
RESIGN_CHECK_S = 600.0  # re-signing is due after days; checking every 10 minutes is plenty
SUMMARY_EVERY_S = 60.0


class ChunkServer:
    def __init__(self, settings: RegistrySettings, store: RegistryStore) -> None:
        self.settings = settings
        self.store = store
        self.topics = Topics(settings.topic_prefix)
        self.index: dict[str, ServedFile] = {}
        self._key = store.signing_key()
        self._generation: tuple[int, int] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reconnected = threading.Event()
        self._say_online = threading.Event()  # another instance's "offline" covers ours
        self._rewatch = threading.Event()  # following the devices failed for now: try again
        self._online = False
        self._fetch_filter = self.topics.fetch
        # Each instance its own client id: instances with one id would push each other off.
        self.client_id = f"{settings.mqtt.device_id}-{uuid.uuid4().hex[:8]}"
        self.connection = Connection(settings.mqtt, self.client_id,
                                     will=(self.topics.registry_status,
                                           self._status("offline", "connection lost")))
        self.connection.client.max_queued_messages_set(MAX_QUEUED)
        self.connection.on_message = self._on_message
        self.connection.on_connected = self._on_connected
        self.workers = ChunkWorkers(self.connection, settings.topic_prefix, settings.max_chunk_bytes,
                                    settings.serve_threads, self._index_for)
        self.announcer = Announcer(settings, store, self.connection, self._key, on_resigned=self._resigned)
        self.watcher = FleetWatcher(settings.topic_prefix, settings.fleet_max_devices)
        self.driver = RolloutDriver(store, Publisher(settings, store), self.watcher, settings.rollout_tick_s,
                                    ready=self._fleet_ready, on_change=self._wake.set)

    # --- lifecycle -----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the store at once."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT,
                                                                          signal.SIGHUP)}
        try:
            self._reload_store()
            self.workers.start()
            self.connection.start()
            self.driver.start()
            log.info("serving the registry %s through %s as %s", self.store.root, self.connection.broker,
                     self.client_id)
            next_resign = time.monotonic() + RESIGN_CHECK_S
            next_summary, summary = time.monotonic() + SUMMARY_EVERY_S, ""
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
                    self.announcer.announce(force=False)
                if self._rewatch.is_set() and self.connection.connected.is_set():
                    self._rewatch.clear()
                    self._watch_fleet()
                if self._say_online.is_set():
                    self._say_online.clear()
                    if self._online and self.connection.connected.is_set():
                        # Not while away: paho would send it first thing on the reconnect,
                        # before the releases are retained again.
                        self._publish_online()
                if time.monotonic() >= next_resign:
                    next_resign = time.monotonic() + RESIGN_CHECK_S
                if time.monotonic() >= next_summary:  # counts, also of refusals, when they change
                    next_summary = time.monotonic() + SUMMARY_EVERY_S
                    if self.workers.summary() != summary:
                        summary = self.workers.summary()
                        log.info("%s", summary)
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _shutdown(self) -> None:
        self._online = False
        self.driver.stop()
        self.connection.client.unsubscribe(self._fetch_filter)
        self.workers.stop()
        if self.connection.connected.is_set():
            try:
                self.connection.publish_and_wait(self.topics.registry_status,
                                                 self._status("offline", "shutdown"),
                                                 self.settings.connect_timeout_s, retain=True)
            except BrokerUnavailable as exc:
                log.warning("could not say offline: %s", exc)
        self.connection.close()
        log.info("stopped: %s", self.workers.summary())

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
        """The index first, then the generation it reflects: a worker that finds a hash
        missing meanwhile sees the generation differ and reads the store itself, rather than
        refusing a file published a moment ago."""
        generation = self.store.generation()
        self.index = self.store.file_index()  # replaced whole: workers see the old or the new
        self._generation = generation
        log.info("serving %d files", len(self.index))

    def _on_connected(self) -> None:
        """paho's thread: leave the work to the main thread."""
        self._online = False
        self.watcher.synced.clear()
        self._reconnected.set()
        self._wake.set()

    def _go_online(self) -> None:
        """After each connect: subscribe, retain every release again (a restarted broker may
        have lost them), then say online. A broker that refuses the subscription ends `serve`."""
        try:
            self._subscribe()
        except BrokerRefused:
            raise
        except BrokerUnavailable as exc:
            log.error("%s; trying again", exc)
            self._reconnected.set()
            return
        self.announcer.announce(force=True)
        if self._publish_online():
            log.info("online: answering chunk requests on %s", self._fetch_filter)
        self._watch_fleet()

    def _watch_fleet(self) -> None:
        if not follow_fleet(self.connection, self.watcher, self.settings.connect_timeout_s):
            self._rewatch.set()

    def _resigned(self) -> None:
        self._generation = self.store.generation()

    def _fleet_ready(self) -> bool:
        return self.connection.connected.is_set() and self.watcher.synced.is_set()

    def _subscribe(self) -> None:
        """The fetch topic, shared with the other instances when the broker can, and the
        status topic (to say online again when another instance's Last Will says offline)."""
        timeout = self.settings.connect_timeout_s
        group = self.settings.share_group
        plain = self.topics.fetch
        why = ("share_group is empty" if not group else
               "the broker has no shared subscriptions" if not self.connection.shared_subscriptions else "")
        if not why:
            try:
                self.connection.subscribe([f"$share/{group}/{plain}", self.topics.registry_status], timeout)
                self._fetch_filter = f"$share/{group}/{plain}"
                return
            except SharedUnsupported:
                why = "the broker refused the shared subscription"
        log.warning("plain subscription to %s (%s): every instance on this broker answers every "
                    "request; run one instance", plain, why)
        self.connection.subscribe([plain, self.topics.registry_status], timeout)
        self._fetch_filter = plain

    def _publish_online(self) -> bool:
        try:
            self.connection.publish_and_wait(self.topics.registry_status, self._status("online"),
                                             self.settings.connect_timeout_s, retain=True)
        except BrokerUnavailable as exc:
            log.error("could not say online: %s", exc)
            return False
        self._online = True
        return True

    def _status(self, state: str, reason: str = "") -> bytes:
        document: dict[str, Any] = {"state": state, "time": round(time.time(), 3)}
        if state == "online":
            document.update(files=len(self.index), max_chunk_bytes=self.settings.max_chunk_bytes,
                            instance=self.client_id)
        if reason:
            document["reason"] = reason
        return json.dumps(document, separators=(",", ":")).encode()

    # --- messages (paho's thread) --------------------------------------------------------
    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.registry_status:
            self._on_status(message.payload)
        elif message.topic == self.topics.fetch:
            self.workers.submit(message)
        else:
            self.watcher.on_message(message)

    def _on_status(self, payload: bytes) -> None:
        """Another instance stopped or died while we serve: the retained status says offline,
        so say online again (devices only act on online)."""
        try:
            offline = json.loads(payload).get("state") == "offline"
        except (ValueError, AttributeError):
            offline = bool(payload)  # not ours: put ours back
        if offline and self._online and self.connection.connected.is_set() and not self._stop.is_set():
            self._say_online.set()
            self._wake.set()

    def _index_for(self, sha256: str) -> dict[str, ServedFile]:
        """A worker's view of the files; a hash published a moment ago is looked for in the
        store now rather than at the next reload (the main loop then announces the change)."""
        if sha256 not in self.index and self.store.generation() != self._generation:
            self.index = self.store.file_index()  # replaced whole: workers see the old or the new
            self._wake.set()
        return self.index


def serve(settings: RegistrySettings, store: RegistryStore) -> None:
    ChunkServer(settings, store).run()
