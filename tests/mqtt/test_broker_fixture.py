"""The broker fixtures do what the MQTT tests rely on, checked against real mosquitto."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Broker, ConnectFailed, make_certificates, new_client

NOT_AUTHORIZED = 135  # what mosquitto 2.0 answers a v5 CONNECT with bad credentials, and a denied publish


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs process `pid` listens on, from /proc (TCP over IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                shown = socket.inet_ntoa(raw[::-1]) if table == "tcp" else f"[{address}]"
                found.add((shown, int(port, 16)))
    return found


def test_anonymous_broker_listens_on_loopback_only_and_round_trips(broker: Broker, mqtt_subscriber) -> None:
    assert broker.running
    assert listening_addresses(broker.proc.pid) == {("127.0.0.1", broker.port)}

    publisher = mqtt_subscriber(broker, None)
    assert not publisher.publish("edged/devices/d1/status", "online", retain=True).is_failure
    watcher = mqtt_subscriber(broker, "edged/#")
    retained = watcher.wait_for(topic="edged/devices/d1/status")
    assert (retained.payload, retained.retain, retained.qos) == (b"online", True, 1)

    publisher.publish("edged/devices/d1/events", {"kind": "hello"}, user_properties=[("sender", "me")],
                      correlation_data=b"\x01\x02", content_type="application/json")
    live = watcher.wait_for(topic="edged/devices/d1/events")
    assert live.json() == {"kind": "hello"}
    assert not live.retain
    assert live.user_properties == [("sender", "me")]
    assert live.correlation_data == b"\x01\x02"
    assert live.content_type == "application/json"
    assert [m.topic for m in watcher.messages("edged/+/+/events")] == ["edged/devices/d1/events"]


def test_request_returns_the_reply_with_its_correlation_data(broker: Broker, mqtt_subscriber) -> None:
    """A real responder answers on the v5 response topic: first a stale reply, then the real one."""
    subscribed = threading.Event()
    seen: list[tuple[str, bytes]] = []

    def answer(client: mqtt.Client, _userdata, msg: mqtt.MQTTMessage) -> None:
        seen.append((msg.properties.ResponseTopic, msg.properties.CorrelationData))
        for correlation in (b"stale", msg.properties.CorrelationData):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
            reply = {"ok": correlation != b"stale", "echo": json.loads(msg.payload)}
            client.publish(msg.properties.ResponseTopic, json.dumps(reply), qos=1, properties=props)

    responder = new_client(broker, "responder")
    responder.on_message = answer
    responder.on_subscribe = lambda *_args: subscribed.set()
    responder.on_connect = lambda client, *_args: client.subscribe("edged/devices/d1/cmd", qos=1)
    responder.connect(broker.host, broker.port)
    responder.loop_start()
    try:
        assert subscribed.wait(5)
        client = mqtt_subscriber(broker, None)
        assert client.request("edged/devices/d1/cmd", {"op": "ping"}) == {"ok": True, "echo": {"op": "ping"}}
    finally:
        responder.disconnect()
        responder.loop_stop()
    [(response_topic, correlation)] = seen
    assert response_topic == f"edged/replies/{client.client_id}"
    assert len(correlation) == 16


def test_password_broker_refuses_wrong_credentials_with_the_connack_reason(start_broker,
                                                                           mqtt_subscriber) -> None:
    broker = start_broker("password")
    assert set(broker.users) == {"edged", "tester", "guest"}
    assert mqtt_subscriber(broker, "#", username="edged").connected
    for wrong in ({"password": "wrong"}, {"username": "nobody", "password": "x"}, {"anonymous": True}):
        with pytest.raises(ConnectFailed) as refused:
            mqtt_subscriber(broker, "#", **wrong)
        assert refused.value.reason_code == NOT_AUTHORIZED, wrong
    assert "not authorised" in broker.log().lower()


def test_password_broker_with_its_own_users_keeps_the_test_user(start_broker, mqtt_subscriber) -> None:
    broker = start_broker("password", users={"cam-1": "right"})
    assert broker.credentials("cam-1") == ("cam-1", "right")
    assert set(broker.users) == {"cam-1", "tester"}
    camera = mqtt_subscriber(broker, None, username="cam-1")
    watcher = mqtt_subscriber(broker, "edged/#")  # the test user
    camera.publish("edged/devices/cam-1/status", "online")  # users without an ACL may do anything
    assert watcher.wait_for().payload == b"online"


def test_acl_keeps_a_topic_from_a_user_who_may_not_read_it(start_broker, mqtt_subscriber) -> None:
    broker = start_broker("password")
    guest = mqtt_subscriber(broker, "edged/#", username="guest")
    tester = mqtt_subscriber(broker, "edged/#")

    assert guest.publish("edged/devices/d1/cmd", "run") == NOT_AUTHORIZED
    tester.publish("edged/devices/d1/events", "secret")
    tester.publish("edged/devices/d1/status", "online")
    # The broker delivers in order: once the guest has the status, the event would have come first.
    guest.wait_for(topic="edged/devices/d1/status")
    assert [m.topic for m in guest.messages()] == ["edged/devices/d1/status"]
    assert [m.topic for m in tester.wait_count(2)] == ["edged/devices/d1/events", "edged/devices/d1/status"]


def test_tls_broker_accepts_its_ca_and_refuses_plain_tcp_or_another_ca(start_broker, mqtt_subscriber,
                                                                       tmp_path: Path) -> None:
    broker = start_broker("tls")
    assert broker.ca_file.exists() and broker.client_cert_file.exists() and broker.client_key_file.exists()
    client = mqtt_subscriber(broker, "t/#", client_cert=False)
    client.publish("t/x", "over tls")
    assert client.wait_for(topic="t/x").payload == b"over tls"

    with pytest.raises(ConnectFailed):
        mqtt_subscriber(broker, "#", tls=False)
    other = make_certificates(tmp_path / "other")
    with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
        mqtt_subscriber(broker, "#", ca_file=other["ca"])


def test_tls_broker_can_require_a_client_certificate(start_broker, mqtt_subscriber) -> None:
    broker = start_broker("tls", require_certificate=True)
    assert mqtt_subscriber(broker, "#").connected
    with pytest.raises(ConnectFailed):
        mqtt_subscriber(broker, "#", client_cert=False)
    assert "peer did not return a certificate" in broker.log()


def test_restart_keeps_the_port_and_subscribers_come_back(broker: Broker, mqtt_subscriber) -> None:
    port = broker.port
    watcher = mqtt_subscriber(broker, "t/#")
    broker.restart()
    assert broker.port == port and broker.running
    watcher.wait_connected(connects=2)
    watcher.publish("t/after", "back")
    assert watcher.wait_for(topic="t/after").payload == b"back"

    broker.kill()
    assert not broker.running
    watcher.wait_disconnected()
    broker.start()
    watcher.wait_connected(connects=3)


@pytest.mark.parametrize("persistence", [False, True])
def test_retained_message_survives_a_restart_only_with_persistence(start_broker, mqtt_subscriber,
                                                                   persistence: bool) -> None:
    broker = start_broker(persistence=persistence)
    mqtt_subscriber(broker, None).publish("keep/status", "online", retain=True)
    broker.stop()
    assert broker.persistence_file.exists() == persistence
    broker.start()

    watcher = mqtt_subscriber(broker, "keep/#")
    watcher.publish("keep/marker", "after")  # a retained message would be delivered before this
    watcher.wait_for(topic="keep/marker")
    assert [m.topic for m in watcher.messages()] == (["keep/status", "keep/marker"] if persistence
                                                     else ["keep/marker"])


def test_max_packet_size_disconnects_a_client_that_sends_more(start_broker, mqtt_subscriber) -> None:
    broker = start_broker(max_packet_size=1024)
    client = mqtt_subscriber(broker, None)
    client.publish("t/small", b"x" * 512)
    with pytest.raises(AssertionError, match="Packet too large"):
        client.publish("t/big", b"x" * 2048)


def test_start_fails_with_the_broker_log_when_the_port_is_taken(start_broker) -> None:
    broker = start_broker(start=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.port))
        squatter.listen()
        with pytest.raises(RuntimeError, match="Address already in use"):
            broker.start()
    assert not broker.running
