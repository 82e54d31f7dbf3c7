"""Commands as an attacker sends them: JSON nested to the hilt within the 64 KiB limit, and
response topics that would make the device publish where it must not. A real daemon
subprocess and a real Mosquitto; a watcher subscribed to `#` sees everything published."""

from __future__ import annotations

import uuid

import pytest

from edged.models.store import ModelStore
from tests.conftest import build_tiny_ir, ir_files, wait_until
from tests.mqtt.test_daemon_link import TOPICS, mqtt_config

CMD = f"{TOPICS}/cmd"
OWN_REPLIES = f"{TOPICS}/replies"
NESTED = [
    b"[" * 60_000,  # all brackets: past the limit long before the end
    b"[" * 30_000 + b"]" * 30_000,  # well-formed
    b'{"command": "ping", "id": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",  # inside a real command
]


def is_reply(message) -> bool:
    try:
        document = message.json()
    except ValueError:
        return False
    return isinstance(document, dict) and "ok" in document


@pytest.fixture(scope="module")
def device(start_module_daemon, start_module_broker, tmp_path_factory):
    """A daemon with MQTT, version 1 of tiny active and version 2 in the store."""
    broker = start_module_broker()
    workdir = tmp_path_factory.mktemp("limits")
    store = ModelStore(workdir / "store")
    for version in ("1", "2"):
        store.add("tiny", ir_files(build_tiny_ir(workdir / f"ir-{version}", scale=float(version))), version)
    store.activate("tiny", "1")
    daemon = start_module_daemon(store.root, mqtt_config(broker, workdir))
    with daemon.client() as client:
        wait_until(lambda: client.status()["mqtt"]["connected"], what="connected")
    return daemon, broker


def test_json_nested_too_deeply_gets_a_clean_error_reply_and_one_log_line(device, mqtt_subscriber):
    daemon, broker = device
    operator = mqtt_subscriber(broker, None)
    reply_topic = f"edged/replies/{operator.client_id}"
    operator.subscribe(reply_topic)
    for payload in NESTED:
        assert len(payload) < 64 << 10
        correlation = uuid.uuid4().bytes
        operator.publish(CMD, payload, response_topic=reply_topic, correlation_data=correlation)
        reply = operator.wait_for(lambda m, c=correlation: m.correlation_data == c, 10, topic=reply_topic)
        assert reply.json() == {"ok": False, "error": "command JSON is nested too deeply"}
    assert operator.request(CMD, {"command": "ping"})["result"] == "pong"  # the worker lives on
    log = daemon.output()
    assert "Traceback" not in log and "RecursionError" not in log, log
    lines = [line for line in log.splitlines() if "nested too deeply" in line]
    assert len(lines) == len(NESTED), lines
    assert all("WARNING" in line and "command refused" in line for line in lines), lines


@pytest.mark.parametrize("forbidden", ["evil/topic", "edged/devices/cam-2/cmd", "edged/replies/",
                                       f"{TOPICS}/state"])
def test_a_response_topic_outside_the_reply_prefix_is_refused_and_never_published(
        device, mqtt_subscriber, forbidden):
    daemon, broker = device
    watcher = mqtt_subscriber(broker, "#")
    operator = mqtt_subscriber(broker, OWN_REPLIES)
    log_before = daemon.output()
    # A command with effects, so "not run" shows: activating version 2 would change models.list.
    activate = {"command": "models.activate", "model": "tiny", "version": "2"}
    correlation = uuid.uuid4().bytes
    operator.publish(CMD, activate, response_topic=forbidden, correlation_data=correlation)
    refusal = operator.wait_for(lambda m: m.correlation_data == correlation, 10, topic=OWN_REPLIES)
    reply = refusal.json()
    assert reply["ok"] is False
    assert f"response topic {forbidden!r} refused" in reply["error"] and "not run" in reply["error"]
    # MQTT 3.1.1 style: the topic in the JSON, the id echoed.
    request_id = uuid.uuid4().hex  # a fresh id: a repeated one is answered from memory
    operator.publish(CMD, {**activate, "response_topic": forbidden, "id": request_id})
    by_json = operator.wait_for(lambda m: m.json().get("id") == request_id, 10, topic=OWN_REPLIES).json()
    assert by_json["ok"] is False and "refused" in by_json["error"]
    # The daemon's messages reach the watcher in order: once it has this reply, it has seen
    # everything the refused commands made the daemon publish.
    listed = operator.request_message(CMD, {"command": "models.list"})
    assert listed.json()["result"]["tiny"]["active"] == "1"  # neither activation ran
    watcher.wait_for(lambda m: m.correlation_data == listed.correlation_data, 10)
    published = [m.topic for m in watcher.messages()]
    assert published.count(CMD) == 3  # only the operator's own three commands reached the cmd topic
    if not forbidden.startswith(f"{TOPICS}/"):  # the device's own topics carry its state, health...
        assert forbidden not in published, published
    allowed = (OWN_REPLIES, f"edged/replies/{operator.client_id}")
    assert [str(m) for m in watcher.messages() if m.topic not in allowed and is_reply(m)] == []
    with daemon.client() as client:
        assert client.status()["commands"]["refused_topic"] >= 2
    new_log = daemon.output()[len(log_before):]
    refusals = [line for line in new_log.splitlines() if "refused" in line]
    assert len(refusals) == 2 and "Traceback" not in new_log, new_log


def test_a_command_with_no_response_topic_is_answered_on_the_devices_own_replies(device, mqtt_subscriber):
    _, broker = device
    operator = mqtt_subscriber(broker, OWN_REPLIES)
    request_id = uuid.uuid4().hex
    operator.publish(CMD, {"command": "ping", "id": request_id})
    reply = operator.wait_for(lambda m: m.json().get("id") == request_id, 10, topic=OWN_REPLIES).json()
    assert reply == {"ok": True, "command": "ping", "result": "pong", "id": request_id}
    named = operator.request(CMD, {"command": "ping"}, response_topic=OWN_REPLIES)  # named outright
    assert named["result"] == "pong"


def test_the_reply_prefix_is_a_setting(start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    start_daemon(tiny_store.root, mqtt_config(broker, tmp_path, reply_topic_prefix="ops/answers/"))
    mqtt_subscriber(broker, f"{TOPICS}/status").wait_for(lambda m: m.json()["state"] == "online", timeout=20)
    operator = mqtt_subscriber(broker, None)
    assert operator.request(CMD, {"command": "ping"}, response_topic="ops/answers/me")["result"] == "pong"
    watcher = mqtt_subscriber(broker, OWN_REPLIES)
    correlation = uuid.uuid4().bytes
    operator.publish(CMD, {"command": "ping"}, response_topic="edged/replies/me",
                     correlation_data=correlation)
    reply = watcher.wait_for(lambda m: m.correlation_data == correlation, 10, topic=OWN_REPLIES).json()
    assert reply["ok"] is False and "'ops/answers/'" in reply["error"]
