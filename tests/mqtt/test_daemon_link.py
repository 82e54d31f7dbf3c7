"""The daemon's MQTT link end to end: a real daemon subprocess, a real Mosquitto."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edged.models.store import ModelStore
from tests.broker import Broker
from tests.conftest import build_tiny_ir, ir_files, wait_until

DEVICE = "cam-1"
TOPICS = f"edged/devices/{DEVICE}"


def mqtt_config(broker: Broker, workdir: Path, **extra: object) -> dict:
    settings = {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                "outbox_path": str(workdir / "outbox.db"), "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0, "health_interval_s": 60}
    settings.update(extra)
    return {"mqtt": settings}


def add_version(store: ModelStore, tmp_path: Path, version: str) -> None:
    ir = build_tiny_ir(tmp_path / f"ir-{version}", scale=float(version))
    store.add("tiny", ir_files(ir), version)



def test_status_is_retained_online_and_the_last_will_says_offline(
        start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    watcher = mqtt_subscriber(broker, f"{TOPICS}/status")
    daemon = start_daemon(tiny_store.root, mqtt_config(broker, tmp_path))
    online = watcher.wait_for(lambda m: m.json()["state"] == "online", timeout=20)
    document = online.json()
    assert document["models"] == {"tiny": "1"} and document["version"] and document["started_at"] > 0

    late = mqtt_subscriber(broker, f"{TOPICS}/status")  # a newcomer gets the retained status
    assert late.wait_for(timeout=10).retain and late.messages()[-1].json()["state"] == "online"

    before_connect = document["time"]  # the online status: sent after the connection was made
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    will = watcher.wait_for(lambda m: m.json()["state"] == "offline", timeout=20).json()
    assert will["reason"] == "connection lost" and will["device"] == DEVICE
    # No `time`: the device cannot know when the broker will publish it. `connected_at` says
    # which connection was lost: the one made just before the online status above.
    assert "time" not in will and will["connected_at"] <= before_connect
    assert will["connected_at"] >= document["started_at"]


def test_a_clean_stop_says_offline_itself(start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    watcher = mqtt_subscriber(broker, f"{TOPICS}/status")
    daemon = start_daemon(tiny_store.root, mqtt_config(broker, tmp_path))
    watcher.wait_for(lambda m: m.json()["state"] == "online", timeout=20)
    assert daemon.stop() == 0
    assert watcher.wait_for(lambda m: m.json()["state"] == "offline").json()["reason"] == "shutdown"


def test_health_reports_carry_the_figures(start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    watcher = mqtt_subscriber(broker, f"{TOPICS}/health")
    daemon = start_daemon(tiny_store.root, mqtt_config(broker, tmp_path, health_interval_s=1))
    with daemon.client() as client:
        client.infer("tiny", {"x": np.ones((1, 4), np.float32)})
    report = watcher.wait_for(lambda m: m.json()["models"].get("tiny", {}).get("requests", 0) >= 1,
                              timeout=20).json()
    tiny = report["models"]["tiny"]
    assert tiny["version"] == "1" and tiny["backend"] == "openvino" and tiny["reason"]
    assert set(tiny["latency"]) == {"p50_ms", "p95_ms", "p99_ms"} and tiny["latency"]["p50_ms"] > 0
    assert report["device"] == DEVICE and report["uptime_s"] > 0
    system = report["system"]
    assert system["memory_rss_bytes"] > 10 << 20 and system["store_free_bytes"] > 0
    assert isinstance(system["temperatures_c"], dict) and system["cpu_percent"] >= 0
    assert report["mqtt"]["connected"] is True and report["mqtt"]["outbox"]["backlog"] >= 0
    assert "api" in report and "pipelines" in report
    with daemon.client() as client:  # the socket shows the same document
        status = client.status()
    assert status["models"]["tiny"]["requests"] >= 1 and status["mqtt"]["broker"].endswith(str(broker.port))


def test_state_is_retained_and_changes_only_with_the_state(
        start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    watcher = mqtt_subscriber(broker, f"{TOPICS}/state")
    start_daemon(tiny_store.root, mqtt_config(broker, tmp_path, health_interval_s=1))
    first = watcher.wait_for(timeout=20).json()
    assert first["models"]["tiny"]["active"] == "1" and first["models"]["tiny"]["degraded"] is False
    assert len(first["models"]["tiny"]["sha256"]) == 64
    time.sleep(2.5)  # health went out twice meanwhile; the state did not change
    assert len(watcher.messages()) == 1
    add_version(tiny_store, tmp_path, "2")
    tiny_store.activate("tiny", "2")
    second = watcher.wait_for(lambda m: m.json()["models"]["tiny"]["active"] == "2", timeout=20).json()
    assert second["models"]["tiny"]["sha256"] != first["models"]["tiny"]["sha256"]


def test_events_made_while_the_broker_is_down_arrive_in_order(
        start_daemon, start_broker, mqtt_subscriber, tiny_store, tmp_path):
    # The watcher's session outlives the broker restart (persistence on), so it misses
    # nothing even if the daemon reconnects first.
    broker = start_broker(persistence=True)
    watcher = mqtt_subscriber(broker, f"{TOPICS}/events", keep_session=True)
    daemon = start_daemon(tiny_store.root, mqtt_config(broker, tmp_path))
    watcher.wait_for(lambda m: m.json()["kind"] == "model_loaded", timeout=20)
    broker.stop()
    for version in ("2", "3", "4", "5"):  # each activation: model_loaded + model_activated
        add_version(tiny_store, tmp_path, version)
        tiny_store.activate("tiny", version)
        with daemon.client() as client:
            wait_until(lambda v=version: client.status()["models"]["tiny"]["version"] == v, what=version)
    tiny_store.rollback("tiny")
    with daemon.client() as client:
        wait_until(lambda: client.status()["models"]["tiny"]["version"] == "4", what="rollback")
        assert client.status()["mqtt"]["outbox"]["by_kind"]["event"] >= 10
    broker.start()
    watcher.wait_for(lambda m: m.json()["kind"] == "model_rolled_back", timeout=30)
    events = [m.json() for m in watcher.messages()]
    unique = {}
    for event in events:  # QoS 1 may repeat a message; a repeat carries the same sequence number
        assert unique.setdefault(event["seq"], event) == event
    sequences = [event["seq"] for event in events]
    assert sequences == sorted(sequences), "delivered in order"
    assert sorted(unique) == list(range(min(unique), max(unique) + 1)), "none missing"
    kinds = [unique[s]["kind"] for s in sorted(unique)]
    assert kinds.count("model_activated") == 4 and kinds[-1] == "model_rolled_back"


def test_kill_9_loses_nothing_in_the_outbox(start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    config = mqtt_config(broker, tmp_path)
    daemon = start_daemon(tiny_store.root, config)
    broker.stop()
    add_version(tiny_store, tmp_path, "2")
    tiny_store.activate("tiny", "2")
    with daemon.client() as client:
        wait_until(lambda: client.status()["mqtt"]["outbox"]["by_kind"].get("event", 0) >= 2, what="queued")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    broker.start()
    watcher = mqtt_subscriber(broker, f"{TOPICS}/events")
    start_daemon(tiny_store.root, config)
    activated = watcher.wait_for(lambda m: m.json()["kind"] == "model_activated", timeout=30).json()
    assert activated["version"] == "2" and activated["previous"] == "1"


def test_commands_answer_on_the_response_topic(start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    add_version(tiny_store, tmp_path, "2")
    start_daemon(tiny_store.root, mqtt_config(broker, tmp_path))
    online = mqtt_subscriber(broker, f"{TOPICS}/status")
    online.wait_for(lambda m: m.json()["state"] == "online", timeout=20)
    operator = mqtt_subscriber(broker, None)
    cmd = f"{TOPICS}/cmd"
    assert operator.request(cmd, {"command": "ping"}) == {"ok": True, "command": "ping", "result": "pong"}
    listed = operator.request(cmd, {"command": "models.list"})["result"]
    assert listed == {"tiny": {"versions": ["1", "2"], "active": "1"}}
    activated = operator.request(cmd, {"command": "models.activate", "model": "tiny", "version": "2"})
    assert activated["ok"] and activated["result"]["version"] == "2"
    status = operator.request(cmd, {"command": "status"})["result"]
    assert status["models"]["tiny"]["version"] == "2"
    rollback = {"command": "models.rollback", "model": "tiny"}
    first = operator.request_message(cmd, rollback)
    assert first.json()["ok"] and first.json()["result"]["version"] == "1"
    # QoS 1 may deliver a command twice: the repeat (same correlation data) is answered, not run
    # again; run again it would fail, as there is no version before 1.
    operator.clear()
    operator.publish(cmd, rollback, response_topic=f"edged/replies/{operator.client_id}",
                     correlation_data=first.correlation_data)
    again = operator.wait_for(lambda m: m.correlation_data == first.correlation_data)
    assert again.json() == first.json()
    assert operator.request(cmd, rollback)["ok"] is False  # a new request does run


@pytest.fixture(scope="module")
def commanded(start_module_daemon, start_module_broker, tmp_path_factory, tiny_ir):
    """One daemon and broker for the bad-command cases."""
    broker = start_module_broker()
    workdir = tmp_path_factory.mktemp("commands")
    store = ModelStore(workdir / "store")
    store.add("tiny", ir_files(tiny_ir), "1")
    store.activate("tiny", "1")
    daemon = start_module_daemon(store.root, mqtt_config(broker, workdir))
    with daemon.client() as client:
        wait_until(lambda: client.status()["mqtt"]["connected"], what="connected")
    return daemon, broker


@pytest.mark.parametrize(("payload", "error"), [
    (b"not json", "not JSON"),
    (b'{"command": "reboot"}', "invalid command"),
    (b'{"command": "models.activate", "model": "tiny"}', "version"),
    (b'{"command": "models.activate", "model": "../etc", "version": "1"}', "model"),
    (b'{"command": "models.activate", "model": "tiny", "version": "9"}', "no version '9'"),
    (b'{"command": "models.rollback", "model": "tiny"}', "no earlier version"),
    (b'{"command": "pipelines.restart", "pipeline": "nope"}', "no pipeline 'nope'"),
    (b"[1, 2]", "invalid command"),
    (b'{"command": "ping", "extra": 1}', "extra"),
    (b"x" * 70_000, "too large"),
])
def test_bad_commands_get_an_error_reply(commanded, mqtt_subscriber, payload, error):
    daemon, broker = commanded
    operator = mqtt_subscriber(broker, None)
    reply_topic = f"edged/replies/{operator.client_id}"
    operator.subscribe(reply_topic)
    operator.publish(f"{TOPICS}/cmd", payload, response_topic=reply_topic,
                     correlation_data=uuid.uuid4().bytes)
    reply = operator.wait_for(topic=reply_topic, timeout=10).json()
    assert reply["ok"] is False and error in reply["error"], reply
    assert operator.request(f"{TOPICS}/cmd", {"command": "ping"})["ok"] is True  # still answering
    assert daemon.proc.poll() is None


def test_wrong_credentials_give_one_clear_error_and_retries(start_daemon, start_broker, tiny_store, tmp_path):
    broker = start_broker("password", users={"cam-1": "right"})
    daemon = start_daemon(tiny_store.root, mqtt_config(
        broker, tmp_path, username="cam-1", password="wrong"))  # noqa: S106
    with daemon.client() as client:
        wait_until(lambda: client.status()["mqtt"]["failed_attempts"] >= 3, what="retries")
        mqtt_status = client.status()["mqtt"]
        assert mqtt_status["connected"] is False
        assert "refused the connection" in mqtt_status["last_error"]
        assert client.infer("tiny", {"x": np.ones((1, 4), np.float32)})  # serving meanwhile
    refusals = [line for line in daemon.output().splitlines() if "refused the connection" in line]
    assert len(refusals) == 1, daemon.output()
    assert "Not authorized" in refusals[0] or "Bad user name or password" in refusals[0]


def test_password_and_tls_connect(start_daemon, start_broker, mqtt_subscriber, tiny_store, tmp_path):
    broker = start_broker("tls", require_certificate=True)
    watcher = mqtt_subscriber(broker, f"{TOPICS}/status")
    password_file = tmp_path / "secret"
    password_file.write_text("unused-by-an-anonymous-broker\n")
    start_daemon(tiny_store.root, mqtt_config(
        broker, tmp_path, password_file=str(password_file), username="cam-1",
        tls={"enabled": True, "ca_file": str(broker.ca_file), "cert_file": str(broker.client_cert_file),
             "key_file": str(broker.client_key_file)}))
    assert watcher.wait_for(lambda m: m.json()["state"] == "online", timeout=20)


def test_a_password_file_and_an_acl_limited_to_the_device(start_daemon, start_broker, mqtt_subscriber,
                                                           tiny_store, tmp_path):
    """The documented ACL: the device writes its own topics and reads its commands, nothing else."""
    acl = {"cam-1": [f"write {TOPICS}/#", f"read {TOPICS}/cmd", "read edged/registry/#",
                     "write edged/replies/#"]}
    broker = start_broker("password", users={"cam-1": "right"}, acl=acl)
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("right\n")
    watcher = mqtt_subscriber(broker, f"{TOPICS}/#")
    start_daemon(tiny_store.root, mqtt_config(broker, tmp_path, username="cam-1",
                                              password_file=str(password_file)))
    assert watcher.wait_for(lambda m: m.topic.endswith("/status") and m.json()["state"] == "online",
                            timeout=20)
    operator = mqtt_subscriber(broker, None)
    assert operator.request(f"{TOPICS}/cmd", {"command": "ping"})["result"] == "pong"


def test_commands_can_be_limited_to_named_senders(start_daemon, broker, mqtt_subscriber, tiny_store,
                                                  tmp_path):
    start_daemon(tiny_store.root, mqtt_config(broker, tmp_path, command_senders=["fleet-ops"]))
    mqtt_subscriber(broker, f"{TOPICS}/status").wait_for(lambda m: m.json()["state"] == "online", timeout=20)
    operator = mqtt_subscriber(broker, None)
    refused = operator.request(f"{TOPICS}/cmd", {"command": "ping"})
    assert refused["ok"] is False and "may not send commands" in refused["error"]
    allowed = operator.request(f"{TOPICS}/cmd", {"command": "ping"},
                               user_properties=[("sender", "fleet-ops")])
    assert allowed["result"] == "pong"


def test_commands_can_be_turned_off(start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path):
    start_daemon(tiny_store.root, mqtt_config(broker, tmp_path, commands=False))
    mqtt_subscriber(broker, f"{TOPICS}/status").wait_for(lambda m: m.json()["state"] == "online", timeout=20)
    operator = mqtt_subscriber(broker, None)
    with pytest.raises(AssertionError, match="no message"):  # nobody answers
        operator.request(f"{TOPICS}/cmd", {"command": "ping"}, timeout=2)
