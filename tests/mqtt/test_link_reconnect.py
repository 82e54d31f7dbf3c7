"""The MQTT link's reconnect logic, fast: no broker, no daemon.

The bookkeeping (edged/mqtt/reconnect.py) is tested directly; the link itself is a real
`MqttLink` on a real outbox file whose paho client never connects: the tests call its paho
callbacks with real paho `ReasonCode`s, as paho's network thread would, and its sender's
round (`_send_some`) by hand. paho queues what is published while it is not connected,
as it does between a drop and the reconnect. End to end with Mosquitto:
tests/mqtt/test_daemon_link.py.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edged.config import MqttSettings
from edged.mqtt.link import MqttLink
from edged.mqtt.outbox import Outbox
from edged.mqtt.reconnect import WINDOW, Attempts, Backoff, SendWindow

DEVICE = "cam-1"
SUCCESS = ReasonCode(PacketTypes.CONNACK, "Success")
NOT_AUTHORIZED = ReasonCode(PacketTypes.CONNACK, "Not authorized")
UNAVAILABLE = ReasonCode(PacketTypes.CONNACK, "Server unavailable")
LOST = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
PUBACK = ReasonCode(PacketTypes.PUBACK, "Success")


# --- the wait before each attempt ------------------------------------------------------------
def test_the_wait_doubles_from_the_first_up_to_the_longest_and_starts_again_after_a_connect():
    highest = Backoff(0.2, 1.0, uniform=lambda low, high: high)
    assert [highest.next_wait() for _ in range(6)] == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    lowest = Backoff(0.2, 1.0, uniform=lambda low, high: low)
    assert [lowest.next_wait() for _ in range(4)] == [0.1, 0.2, 0.4, 0.5]  # never below half
    highest.reset()
    assert highest.next_wait() == 0.2


def test_the_wait_stays_capped_after_any_number_of_attempts():
    backoff = Backoff(1.0, 60.0, uniform=lambda low, high: high)
    backoff.attempt = 10_000  # a broker away for a long time: 2**10000 would overflow a float
    assert backoff.next_wait() == 60.0


def test_the_waits_are_jittered_so_a_fleet_does_not_reconnect_in_step():
    """Real randomness: each device draws its own wait between half the ceiling and the ceiling."""
    waits = [Backoff(4.0, 60.0).next_wait() for _ in range(1000)]
    assert all(2.0 <= w <= 4.0 for w in waits)
    assert len(set(waits)) > 990 and min(waits) < 2.2 and max(waits) > 3.8


# --- what the status says about the attempts -------------------------------------------------
def test_attempts_count_failures_and_say_a_problem_once():
    attempts = Attempts()
    assert attempts.failed("refused") and not attempts.failed("refused")  # logged once, counted twice
    assert attempts.failed("unreachable")  # a new problem is said again
    assert (attempts.failures, attempts.connections, attempts.reconnects) == (3, 0, 0)
    attempts.connected()
    assert attempts.last_error == "" and attempts.reconnects == 0 and attempts.failures == 3
    assert attempts.problem("lost") and not attempts.problem("lost")
    attempts.connected()
    assert attempts.reconnects == 1 and attempts.last_error == ""


# --- the window of messages in flight ---------------------------------------------------------
def test_acks_the_outbox_did_not_take_are_handed_to_it_again():
    window = SendWindow(size=4)
    for outbox_id, mid in [(11, 1), (12, 2), (13, 3)]:
        window.handed(outbox_id, mid)
    window.handed(14, None)  # QoS 0: acknowledged by sending, never in flight
    assert (window.room(), window.cursor) == (1, 14)
    window.acknowledged(2)
    window.acknowledged(99)  # not ours (a status message's mid): ignored
    assert window.acks() == [12]
    window.acknowledged(1)  # the outbox failed to take [12]: kept, with what came since
    assert window.acks() == [12, 11]
    window.recorded()
    assert window.acks() == [] and window.inflight == {3: 13} and window.room() == 3


# --- the link, driven through paho's callbacks ---------------------------------------------
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_link(tmp_path: Path, port: int, outbox: Outbox) -> MqttLink:
    settings = MqttSettings(enabled=True, host="127.0.0.1", port=port, device_id=DEVICE,
                            outbox_path=tmp_path / "outbox.db", reconnect_min_s=0.2, reconnect_max_s=1.0)
    return MqttLink(settings, outbox)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


@pytest.fixture
def link(tmp_path: Path, outbox: Outbox) -> MqttLink:
    return make_link(tmp_path, closed_port(), outbox)


def connect(link: MqttLink, reason: ReasonCode = SUCCESS) -> None:
    link._on_connect(link.client, None, mqtt.ConnectFlags(session_present=False), reason, None)


def drop(link: MqttLink) -> None:
    link._on_disconnect(link.client, None, mqtt.DisconnectFlags(is_disconnect_packet_from_server=False),
                        LOST, None)


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("reason", [NOT_AUTHORIZED, UNAVAILABLE, mqtt.convert_connack_rc_to_reason_code(5)],
                         ids=["v5-not-authorized", "v5-server-unavailable", "v3.1.1-not-authorised"])
def test_a_refused_connack_is_a_failed_attempt_not_a_connection(link, reason, caplog):
    for _ in range(3):
        connect(link, reason)
    status = link.status()
    assert not status["connected"] and not link.connected.is_set()
    assert (status["failed_attempts"], status["reconnects"], link.attempts.connections) == (3, 0, 0)
    assert status["last_error"] == f"MQTT broker {link.broker} refused the connection: {reason}; retrying"
    assert error_lines(caplog) == [status["last_error"]]  # one line, not one per retry


def test_an_attempt_that_cannot_reach_the_broker_says_why_and_waits_longer_each_time(link, caplog):
    for attempt in range(1, 4):
        link._on_connect_fail(link.client, None)
        assert link._backoff.attempt == attempt
    status = link.status()
    assert status["failed_attempts"] == 3 and not status["connected"]
    assert status["last_error"] == (f"cannot connect to MQTT broker {link.broker}: Connection refused; "
                                    "retrying")
    assert error_lines(caplog) == [status["last_error"]]


def test_a_broker_that_accepts_tcp_but_never_answers_is_told_apart(tmp_path, outbox):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        link = make_link(tmp_path, silent.getsockname()[1], outbox)
        link._on_connect_fail(link.client, None)
    assert link.status()["last_error"].endswith(": the connection was dropped before CONNACK; retrying")


def test_a_connect_clears_the_error_and_starts_the_waits_again_and_later_ones_count_as_reconnects(
        link, caplog):
    caplog.set_level(logging.INFO, logger="edged.mqtt.link")
    for _ in range(3):
        link._on_connect_fail(link.client, None)
    connect(link, NOT_AUTHORIZED)
    connect(link)
    status = link.status()
    assert status["connected"] and status["last_error"] == "" and status["reconnects"] == 0
    assert status["failed_attempts"] == 4  # kept: how often it failed since the start
    assert link._backoff.attempt == 1  # the next wait is the first one again: 0.1 to 0.2 s
    assert any(r.getMessage() == f"MQTT: connected to {link.broker}" for r in caplog.records)

    drop(link)
    status = link.status()
    assert not status["connected"] and status["failed_attempts"] == 4  # a drop is no failed attempt
    assert status["last_error"] == f"lost MQTT broker {link.broker} ({LOST}); reconnecting"
    assert link._backoff.attempt == 2
    drop(link)  # the next attempt's own disconnect: nothing new to say, but a longer wait
    assert status["last_error"] == link.status()["last_error"] and link._backoff.attempt == 3
    connect(link)
    assert link.status()["reconnects"] == 1 and link.status()["last_error"] == ""
    assert any(r.getMessage() == f"MQTT: connected to {link.broker} (reconnect 1)" for r in caplog.records)


def test_a_disconnect_while_stopping_is_no_problem(link):
    connect(link)
    link._stopping.set()
    drop(link)
    assert not link.connected.is_set() and link.status()["last_error"] == ""
    assert link._backoff.attempt == 1


def test_the_window_holds_what_paho_resends_after_a_reconnect_and_nothing_is_handed_twice(
        tmp_path, link, outbox):
    for n in range(100):
        assert link.put("event", f"edged/devices/{DEVICE}/events", {"n": n})
    ids = [m.id for m in outbox.pending(limit=1000)]
    link._send_some()
    assert link._window.inflight == {}  # not connected: nothing handed to paho
    connect(link)
    link._send_some()
    assert sorted(link._window.inflight.values()) == ids[:WINDOW]
    assert link.status()["outbox"]["in_flight"] == WINDOW and outbox.backlog() == 100

    mids = sorted(link._window.inflight, key=link._window.inflight.__getitem__)
    for mid in mids[:10]:  # PUBACKs for the first ten
        link._on_publish(link.client, None, mid, PUBACK, None)
    link._send_some()
    assert outbox.backlog() == 90
    assert sorted(link._window.inflight.values()) == ids[10:WINDOW + 10]  # the window full again

    drop(link)
    for mid in mids[10:15]:  # acknowledged just before the drop, seen after it
        link._on_publish(link.client, None, mid, PUBACK, None)
    link._send_some()
    assert outbox.backlog() == 85  # acks still reach the outbox while disconnected
    assert sorted(link._window.inflight.values()) == ids[15:WINDOW + 10]  # but nothing new is sent

    queued = dict(link._window.inflight)
    connect(link)
    link._send_some()
    # paho sends its queued messages again itself: the link hands over only the ones after
    # the cursor, up to a full window, each outbox message once (the queued ones keep their mids).
    assert queued.items() <= link._window.inflight.items()
    assert sorted(link._window.inflight.values()) == ids[15:WINDOW + 15]
    assert link._window.cursor == ids[WINDOW + 14]
    assert link.status()["outbox"]["in_flight"] == WINDOW

    restarted = make_link(tmp_path, closed_port(), outbox)  # a restart: from the outbox's start
    connect(restarted)
    restarted._send_some()
    assert sorted(restarted._window.inflight.values()) == ids[15:WINDOW + 15]


def test_qos_0_messages_leave_the_outbox_when_handed_to_paho(link, outbox):
    outbox.put("health", f"edged/devices/{DEVICE}/health", b"{}", qos=0)
    connect(link)
    link._send_some()
    assert outbox.backlog() == 0 and link._window.inflight == {} and link._window.cursor > 0


def test_a_status_message_acknowledged_by_the_broker_is_not_taken_for_an_outbox_message(link, outbox):
    link.put("event", f"edged/devices/{DEVICE}/events", {"n": 1})
    connect(link)  # publishes the retained `online` status outside the outbox
    link._send_some()
    (outbox_mid,) = link._window.inflight
    for mid in range(1, outbox_mid):  # every other mid paho gave out: the status messages
        link._on_publish(link.client, None, mid, PUBACK, None)
    link._send_some()
    assert outbox.backlog() == 1 and link._window.room() == WINDOW - 1
    link._on_publish(link.client, None, outbox_mid, PUBACK, None)
    link._send_some()
    assert outbox.backlog() == 0 and link._window.room() == WINDOW


def test_jitter_draws_real_random_waits_per_link(tmp_path, outbox):
    # Each link draws its own first wait, and paho is told it (its private field: no getter).
    waits = set()
    for _ in range(20):
        link = make_link(tmp_path, closed_port(), outbox)
        link._set_next_wait()
        waits.add(link.client._reconnect_min_delay)
    assert len(waits) > 15 and all(0.1 <= w <= 0.2 for w in waits)
