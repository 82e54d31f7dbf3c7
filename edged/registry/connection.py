"""The registry's MQTT 5 connection, built from the daemon's [mqtt] settings.

Commands (`publish`, `retire`, `fleet` ...) connect once, wait for each PUBACK and say
plainly when the broker is away or refuses; `serve` connects in the background and
reconnects forever, like the daemon's link.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.config import MqttSettings
from edged.errors import EdgedError
from edged.mqtt.client import build_client as build_mqtt_client
from edged.mqtt.client import no_delay

log = logging.getLogger(__name__)
MAX_INFLIGHT = 64
SHARED_NOT_SUPPORTED = 0x9E  # SUBACK reason code


class BrokerUnavailable(EdgedError):
    """The broker cannot be reached, refused us, or did not acknowledge in time."""


class BrokerRefused(BrokerUnavailable):
    """The broker answered no: bad credentials, or its ACL forbids the topic."""


class SharedUnsupported(BrokerRefused):
    """The broker refused a `$share/...` filter: it has no shared subscriptions."""


def build_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """The daemon's client set-up (credentials, TLS), with room for the registry's replies."""
    client = build_mqtt_client(settings, client_id)
    client.max_inflight_messages_set(MAX_INFLIGHT)
    return client


class _AckWaiter:
    """One wait_acked call: the mids it still waits for, and the event its last PUBACK sets."""

    def __init__(self, pending: set[int]) -> None:
        self.pending = pending
        self._event = threading.Event()

    def acked(self, mid: int) -> None:
        self.pending.discard(mid)
        if not self.pending:
            self._event.set()

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)


class Connection:
    """One paho client and the acknowledgements it has seen."""

    def __init__(self, settings: MqttSettings, client_id: str, *,
                 will: tuple[str, bytes] | None = None) -> None:
        self.settings = settings
        self.broker = f"{settings.host}:{settings.port}"
        self.client = build_client(settings, client_id)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connected = threading.Event()
        self.on_message: Callable[[mqtt.MQTTMessage], None] | None = None
        self.on_connected: Callable[[], None] | None = None
        self.on_acked: Callable[[int], None] | None = None  # each PUBACK's mid, in paho's thread
        self.last_error = ""
        self.shared_subscriptions = True  # what the last CONNACK said (absent: available)
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._acks: dict[int, tuple[int, ReasonCode]] = {}  # mid -> (ack number, reason)
        self._sent_after: dict[int, int] = {}  # mid -> acks counted when it was published
        self._ack_count = 0
        self._waiting: dict[int, list[_AckWaiter]] = {}  # mid -> who waits for its PUBACK
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._closing = False
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # --- connecting ----------------------------------------------------------------------
    def open(self, timeout: float) -> Connection:
        """Connect now and wait for the CONNACK; BrokerUnavailable says why not."""
        self.client.connect_timeout = timeout
        try:
            self.client.connect(self.settings.host, self.settings.port, self.settings.keepalive_s,
                                clean_start=True)
        except (OSError, ValueError) as exc:
            self.client._reset_sockets()
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise BrokerUnavailable(f"cannot reach the MQTT broker {self.broker}: {reason}") from None
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None, timeout)
            reason = self._connack
        if reason is None:
            self.close()
            raise BrokerUnavailable(f"the MQTT broker {self.broker} did not answer within {timeout:g} s")
        if reason.is_failure:
            self.close()
            raise BrokerRefused(f"the MQTT broker {self.broker} refused the connection: {reason}")
        return self

    def start(self) -> None:
        """Connect in the background and reconnect forever (for `serve`)."""
        s = self.settings
        self.client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_max_s)  # type: ignore[arg-type]
        self.client.connect_async(s.host, s.port, s.keepalive_s, clean_start=True)
        self.client.loop_start()

    def close(self) -> None:
        """A clean DISCONNECT (the broker drops the Last Will) and the network thread stopped."""
        self._closing = True
        if self.connected.is_set():
            self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()
        self.connected.clear()

    # --- publishing and subscribing ------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                properties: Properties | None = None) -> int:
        """Hand a message to paho; returns its mid (see wait_acked)."""
        with self._cond:
            since = self._ack_count
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerUnavailable(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        with self._cond:
            self._sent_after[info.mid] = since  # paho reuses mids: only a later ack counts
        return info.mid

    def _acked(self, mid: int) -> bool:
        return mid in self._acks and self._acks[mid][0] > self._sent_after.get(mid, 0)

    def wait_acked(self, mids: Iterable[int], timeout: float) -> None:
        """Wait for the PUBACK of every mid; BrokerUnavailable if one is refused or late.

        Each waiter is woken by its own PUBACKs only: `serve`'s workers each wait for their
        reply's, and waking all of them at every PUBACK took 28% of `serve`'s GIL-holding
        samples under 500 requesting devices (py-spy)."""
        wanted = set(mids)
        with self._cond:
            waiter = _AckWaiter({m for m in wanted if not self._acked(m)})
            for mid in waiter.pending:
                self._waiting.setdefault(mid, []).append(waiter)
        if waiter.pending:
            waiter.wait(timeout)
        with self._cond:
            for mid in waiter.pending:  # those that did not come in time
                others = [w for w in self._waiting.pop(mid, []) if w is not waiter]
                if others:
                    self._waiting[mid] = others
            done = all(self._acked(m) for m in wanted)
            refused = [self._acks[m][1] for m in wanted if self._acked(m) and self._acks[m][1].is_failure]
            for mid in wanted:
                self._sent_after.pop(mid, None)
        if refused:
            raise BrokerRefused(f"the MQTT broker {self.broker} refused the message: {refused[0]}")
        if not done:
            raise BrokerUnavailable(f"the MQTT broker {self.broker} did not acknowledge within {timeout:g} s")

    def forget(self, mid: int) -> None:
        """Drop what is kept for a publish nobody will wait for (its PUBACK came)."""
        with self._cond:
            self._acks.pop(mid, None)
            self._sent_after.pop(mid, None)

    def publish_and_wait(self, topic: str, payload: bytes, timeout: float, *, retain: bool = False) -> None:
        mid = self.publish(topic, payload, retain=retain)
        try:
            self.wait_acked([mid], timeout)
        except BrokerUnavailable as exc:
            raise type(exc)(f"{exc} (topic {topic})") from None

    def subscribe(self, filters: list[str], timeout: float | None = None) -> None:
        """Subscribe with QoS 1; with a timeout, wait for the SUBACK and raise if refused."""
        result, mid = self.client.subscribe([(f, 1) for f in filters])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"cannot subscribe to {', '.join(filters)}: {mqtt.error_string(result)}")
        if timeout is None:
            return
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise BrokerUnavailable(f"the MQTT broker {self.broker} did not acknowledge the subscription")
            reasons = self._subacks[mid]
        refused = [(f, r) for f, r in zip(filters, reasons, strict=False) if r.is_failure]
        if any(r.value == SHARED_NOT_SUPPORTED for _, r in refused):
            raise SharedUnsupported(f"the MQTT broker {self.broker} has no shared subscriptions")
        if refused:
            raise BrokerRefused(f"the MQTT broker {self.broker} refused the subscription to "
                                    f"{refused[0][0]}: {refused[0][1]}")

    # --- paho callbacks (network thread) -------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        with self._cond:
            self._connack = reason
            self._cond.notify_all()
        if reason.is_failure:
            self._problem(f"the MQTT broker {self.broker} refused the connection: {reason}; retrying")
            return
        self.last_error = ""
        self.shared_subscriptions = bool(getattr(properties, "SharedSubscriptionAvailable", 1))
        no_delay(client)
        self.connected.set()
        log.info("connected to the MQTT broker %s", self.broker)
        if self.on_connected is not None:
            self.on_connected()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._problem(f"cannot reach the MQTT broker {self.broker}; retrying")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected and not self._closing:
            self._problem(f"lost the MQTT broker {self.broker} ({reason}); reconnecting")

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        with self._cond:  # the dicts are keyed by mid, so they stay below 65535 entries
            self._ack_count += 1
            self._acks[mid] = (self._ack_count, reason)
            for waiter in self._waiting.pop(mid, ()):
                waiter.acked(mid)
        if self.on_acked is not None:
            self.on_acked(mid)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._cond:
            self._subacks[mid] = list(reasons)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(message)
        except Exception:  # one bad message must not end the network thread
            log.exception("handling a message on %s failed", message.topic)

    def _problem(self, message: str) -> None:
        """One log line per new problem, not one per retry."""
        if message != self.last_error:
            log.error("%s", message)
        self.last_error = message
