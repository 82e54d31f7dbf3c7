"""The daemon's one MQTT connection.

paho-mqtt runs the network in its own thread and reconnects forever; we only set
each wait (doubling, jittered, so a fleet does not reconnect in step after a broker
restart). Everything worth keeping (events, results, health, the state document)
is `put` into the on-disk outbox first; a sender thread publishes it in order with
a window of unacknowledged messages and deletes each one when the broker's PUBACK
comes back. So nothing in the outbox is lost to a broker outage or a `kill -9`:
after a reconnect or a restart it is simply sent again (QoS 1 may deliver a
message twice; events carry a sequence number for that).

A retained `status` says `online` on every connect, and the Last Will says
`offline` for us when the connection dies; a clean stop says it itself. The Will is
written before each attempt and carries `connected_at` (when that connection was made)
but no `time`: when the broker publishes it is not something the device can know.

A full disk under the outbox is the outbox's business (edged/mqtt/outbox.py): acks never
raise here, and what the outbox says about its file shows in the health document.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged import strict_json
from edged.config import MqttSettings
from edged.errors import OutboxError
from edged.mqtt.client import build_client, no_delay
from edged.mqtt.outbox import Outbox
from edged.mqtt.reconnect import WINDOW, Attempts, Backoff, SendWindow
from edged.topics import Topics

log = logging.getLogger(__name__)
MessageHandler = Callable[[mqtt.MQTTMessage], None]


class MqttLink:
    def __init__(self, settings: MqttSettings, outbox: Outbox,
                 online_document: Callable[[], dict[str, Any]] = dict) -> None:
        self.settings = settings
        self.outbox = outbox
        self.topics = Topics(settings.topic_prefix, settings.device_id)
        self.broker = f"{settings.host}:{settings.port}"
        self.online_document = online_document
        self.connected = threading.Event()
        self.attempts = Attempts()  # connections, failed attempts, the last problem
        self.put_failures = 0  # messages the outbox refused (disk trouble, oversize)
        self.max_packet_size: int | None = None  # the broker's limit, from its CONNACK
        self.on_connected: list[Callable[[], None]] = []
        # Called on paho's thread with a topic filter once the broker acknowledged its
        # subscription, on every connect: its retained messages come right after (updates.py
        # times its pins' confirmation from there).
        self.on_subscribed: list[Callable[[str], None]] = []
        self._suback: dict[int, str] = {}  # SUBSCRIBE mid -> filter (under `_subscribing`)
        self._handlers: dict[str, list[MessageHandler]] = {}  # topic filter -> handlers
        self._subscribing = threading.Lock()  # a filter added while connecting is never missed
        self._subscribed = False  # this connection has the filters (set under `_subscribing`)
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._window = SendWindow(WINDOW)  # the sender thread's, but for paho's PUBACKs
        self._send_error = ""  # the sender's last failure, logged once
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self.client = self._build_client()

    # --- set-up -------------------------------------------------------------------------
    def _build_client(self) -> mqtt.Client:
        client = build_client(self.settings, self.settings.device_id)
        client.on_pre_connect = self._set_will
        self._set_will(client, None)
        client.max_inflight_messages_set(WINDOW)
        client.max_queued_messages_set(0)  # the outbox is the bounded queue
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _set_will(self, client: mqtt.Client, userdata: object) -> None:
        """Before each attempt (paho's thread): the Will names the connection it belongs to."""
        will = {"state": "offline", "device": self.settings.device_id, "reason": "connection lost",
                "connected_at": round(time.time(), 3)}
        client.will_set(self.topics.status, _json(will), qos=1, retain=True)

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Call `handler` (on paho's thread: keep it quick) for every message on `topic_filter`,
        on this connection and every later one."""
        with self._subscribing:
            self._handlers.setdefault(topic_filter, []).append(handler)
            if self._subscribed:
                self._subscribe(topic_filter)

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if s.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s
            kwargs = {"clean_start": s.clean_start, "properties": properties}
        self._set_next_wait()
        self.client.connect_async(s.host, s.port, s.keepalive_s, **kwargs)
        self.client.loop_start()
        self._sender.start()
        log.info("MQTT: connecting to %s as %s", self.broker, s.device_id)

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Send what the outbox holds (for at most `flush_timeout`), say `offline`, disconnect.
        A link never started (a stop during the daemon's start-up) has nothing to close."""
        if self._sender.ident is None:
            self._stopping.set()
            return
        deadline = time.monotonic() + flush_timeout
        while self.connected.is_set() and self.outbox.backlog() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)
        if self.connected.is_set():
            info = self.client.publish(self.topics.status, self._status_payload("offline", "shutdown"),
                                       qos=1, retain=True)
            info.wait_for_publish(timeout=max(0.5, deadline - time.monotonic()))
        self._stopping.set()
        self._wake.set()
        self._sender.join(timeout=5)
        self.client.disconnect()  # a clean disconnect: the broker discards the Last Will
        self.client.loop_stop()
        self.connected.clear()
        try:  # the PUBACKs that came after the sender's last round: not sent again next run
            self._apply_acks()
        except OutboxError as exc:
            log.error("MQTT: could not record the last acknowledgements: %s", exc)

    # --- publishing ---------------------------------------------------------------------
    def put(self, kind: str, topic: str, document: dict | bytes, *, retain: bool = False,
            replace: bool = False) -> bool:
        """Queue a QoS 1 message in the outbox; it is sent in order, now or after a reconnect.
        False when the outbox refused it (counted and logged here)."""
        payload = document if isinstance(document, bytes) else _json(document)
        try:
            self.outbox.put(kind, topic, payload, qos=1, retain=retain, replace=replace)
        except OutboxError as exc:  # a full disk or a refused message: counted and said, never raised
            self.put_failures += 1
            self._problem(f"MQTT outbox refused a {kind} message for {topic}: {exc}")
            return False
        self._wake.set()
        return True

    def publish_now(self, topic: str, document: dict, properties: Properties | None = None) -> None:
        """Publish outside the outbox (command replies): lost if the broker is away, by design."""
        self.client.publish(topic, _json(document), qos=1, properties=properties)

    def publish_retained(self, topic: str, payload: bytes) -> str:
        """Publish a retained message outside the outbox (Home Assistant's discovery configs,
        derived state published again on every connect): lost if the broker is away.
        QoS 0, so that paho does not resend a stale copy after a reconnect, over the fresh one
        the connect publishes. '' when handed to the connection, else why not."""
        info = self.client.publish(topic, payload, qos=0, retain=True)
        return "" if info.rc == mqtt.MQTT_ERR_SUCCESS else mqtt.error_string(info.rc)

    def request(self, topic: str, payload: bytes, response_topic: str, correlation: bytes) -> None:
        """Publish a request (a chunk request) outside the outbox, QoS 1, with the MQTT v5
        response topic and correlation data its answer comes back with."""
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = response_topic
        properties.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=properties)

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._send_some()
            except Exception as exc:  # a broken outbox must not end the sender; the next wake retries
                problem = f"MQTT: sending from the outbox failed: {exc}"
                if problem != self._send_error:  # one line (and traceback) per new problem
                    log.error("%s", problem, exc_info=not isinstance(exc, OutboxError))
                self._send_error = problem
                self._stopping.wait(1.0)
            else:
                if self._send_error:
                    log.info("MQTT: sending from the outbox works again")
                self._send_error = ""

    def _apply_acks(self) -> None:
        """Hand the outbox what the broker acknowledged; kept for the next round if it fails
        (a full disk never makes it fail: the outbox keeps what it cannot write yet)."""
        acked = self._window.acks()
        if acked:
            self.outbox.ack(*acked)
            self._window.recorded()

    def _send_some(self) -> None:
        self._apply_acks()
        self.outbox.recover()  # a full disk is looked at again even while nothing is sent
        if not self.connected.is_set():
            return
        room = self._window.room()
        if room <= 0:
            return
        batch = self.outbox.pending(after_id=self._window.cursor, limit=room)
        for message in batch:
            info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                break
            if message.qos == 0:
                self._window.handed(message.id, None)
                self.outbox.ack(message.id)
            else:  # sent now, or queued by paho and sent again after a reconnect
                self._window.handed(message.id, info.mid)
        if batch:
            self._wake.set()  # more may be waiting behind this batch

    # --- paho callbacks (paho's network thread) -----------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self._failed(f"MQTT broker {self.broker} refused the connection: {reason}; retrying")
            return
        self.attempts.connected()
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)  # paho does not enforce it
        self._backoff.reset()
        self._set_next_wait()
        reconnects = self.attempts.reconnects
        log.info("MQTT: connected to %s%s", self.broker, f" (reconnect {reconnects})" if reconnects else "")
        no_delay(client)
        with self._subscribing:  # before `online`: whoever sees it can send commands at once
            self._suback.clear()  # the last connection's are never acknowledged
            for topic_filter in self._handlers:
                self._subscribe(topic_filter)
            self._subscribed = True
        client.publish(self.topics.status, self._status_payload("online"), qos=1, retain=True)
        self.connected.set()
        self._wake.set()
        for hook in self.on_connected:
            try:
                hook()
            except Exception:  # a hook must not break the connection
                log.exception("MQTT: on-connect hook failed")

    def _subscribe(self, topic_filter: str) -> None:
        """Under `_subscribing`: so a SUBACK is never handled before its mid is recorded."""
        result, mid = self.client.subscribe(topic_filter, 1)
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._suback[mid] = topic_filter

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[mqtt.ReasonCode], properties: Properties | None) -> None:
        with self._subscribing:
            topic_filter = self._suback.pop(mid, None)
        if topic_filter is None or any(code.is_failure for code in reason_codes):
            return
        for hook in self.on_subscribed:
            try:
                hook(topic_filter)
            except Exception:  # a hook must not break the connection
                log.exception("MQTT: on-subscribed hook failed")

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._failed(f"cannot connect to MQTT broker {self.broker}: {self._diagnose()}; retrying")
        self._set_next_wait()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        with self._subscribing:
            self._subscribed = False
        if self._stopping.is_set():
            return
        if was_connected:
            self._problem(f"lost MQTT broker {self.broker} ({reason}); reconnecting")
        self._set_next_wait()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        # paho holds its message lock here: only record the mid, the sender does the rest.
        self._window.acknowledged(mid)
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        for topic_filter, handlers in list(self._handlers.items()):
            if not mqtt.topic_matches_sub(topic_filter, message.topic):
                continue
            for handler in list(handlers):
                try:
                    handler(message)
                except Exception:  # one bad message must not end the network thread
                    log.exception("MQTT: handling a message on %s failed", message.topic)

    # --- helpers ------------------------------------------------------------------------
    def _set_next_wait(self) -> None:
        """Tell paho how long to wait before its next attempt: doubling, capped, jittered."""
        wait = self._backoff.next_wait()
        self.client.reconnect_delay_set(wait, wait)  # type: ignore[arg-type]  # paho takes floats

    def _diagnose(self) -> str:
        """Why the last attempt failed, in words (paho does not hand us the exception)."""
        try:
            with socket.create_connection((self.settings.host, self.settings.port), timeout=2):
                pass
        except OSError as exc:
            return exc.strerror or str(exc) or type(exc).__name__
        if self.settings.tls.enabled:
            return "the TLS handshake failed (check mqtt.tls.ca_file and the broker's certificate)"
        return "the connection was dropped before CONNACK"

    def _problem(self, message: str) -> None:
        """One log line per new problem, not one per retry."""
        if self.attempts.problem(message):
            log.error("%s", message)

    def _failed(self, message: str) -> None:
        """A connection attempt failed or was refused: counted, and said once per new problem."""
        if self.attempts.failed(message):
            log.error("%s", message)

    def _status_payload(self, state: str, reason: str = "") -> bytes:
        document: dict[str, Any] = {"state": state, "device": self.settings.device_id, "time": time.time()}
        if state == "online":
            document.update(self.online_document())
        if reason:
            document["reason"] = reason
        return _json(document)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True, "broker": self.broker, "connected": self.connected.is_set(),
            "reconnects": self.attempts.reconnects, "failed_attempts": self.attempts.failures,
            "last_error": self.attempts.last_error,
            "outbox": {"backlog": self.outbox.backlog(), "by_kind": self.outbox.backlog_by_kind(),
                       "bytes": self.outbox.backlog_bytes(), "dropped": self.outbox.dropped(),
                       "in_flight": len(self._window.inflight), "refused": self.put_failures,
                       **self.outbox.condition()},
        }



def _json(document: dict) -> bytes:
    return strict_json.dumpb(document, default=str)
