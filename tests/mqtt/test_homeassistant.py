"""Home Assistant MQTT discovery end to end: a real daemon, a real Mosquitto, real models.

Every config is checked against the keys Home Assistant documents for its component
(docs/homeassistant.md cites the pages), and every value template is rendered, with the
engine Home Assistant renders them with (Jinja2, sandboxed), on the messages edged really
published: the results of a detector, a segmenter and a classifier, the retained state,
the health document and the status (availability)."""

from __future__ import annotations

import json
import signal
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from jinja2.sandbox import SandboxedEnvironment

from edged.config import ConfigError, load_settings
from edged.models.store import ModelStore
from tests.broker import Broker, Message
from tests.daemon_process import to_toml, wait_until
from tests.pipelines.sensor_support import build_window_ir

DEVICE = "edge.7"  # a '.' is not allowed in a discovery topic level: the node id is edge_7
NODE = "edge_7"
EDGED = f"edged/devices/{DEVICE}"
PREFIX = "homeassistant"

# The keys Home Assistant documents (integrations/sensor.mqtt, binary_sensor.mqtt,
# image.mqtt, and mqtt#discovery for device and origin), as of its 2024 releases.
ENTITY_KEYS = {"availability", "availability_mode", "availability_template", "availability_topic",
               "device", "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon",
               "json_attributes_template", "json_attributes_topic", "name", "object_id", "origin",
               "payload_available", "payload_not_available", "qos", "unique_id"}
DOCUMENTED = {
    "sensor": ENTITY_KEYS | {"device_class", "expire_after", "force_update", "last_reset_value_template",
                             "options", "state_class", "state_topic", "suggested_display_precision",
                             "unit_of_measurement", "value_template"},
    "binary_sensor": ENTITY_KEYS | {"device_class", "expire_after", "force_update", "off_delay",
                                    "payload_off", "payload_on", "state_topic", "value_template"},
    "image": ENTITY_KEYS | {"content_type", "image_encoding", "image_topic", "url_template", "url_topic"},
}
REQUIRED = {"sensor": {"state_topic"}, "binary_sensor": {"state_topic"}, "image": {"image_topic"}}
DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
               "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}

JINJA = SandboxedEnvironment()


def render(template: str, payload: bytes) -> str:
    """What Home Assistant shows for `payload` through `template` ("None" is its unknown)."""
    return JINJA.from_string(template).render(value_json=json.loads(payload), value=payload.decode())


@pytest.fixture
def store(sample_store: ModelStore, tmp_path: Path) -> ModelStore:
    """face (a detector), selfie (segmentation), tiny (no decoder) and win (a classifier of
    sensor windows: labels low and high)."""
    ir = build_window_ir(tmp_path / "window-ir")
    sample_store.add("win", [ir, ir.with_suffix(".bin")], "1", labels=["low", "high"],
                     decoder={"type": "classification", "top_k": 1})
    sample_store.activate("win", "1")
    return sample_store


@pytest.fixture
def camera(tmp_path: Path) -> Path:
    """A folder of one picture with a face in it, looped over by image pipelines."""
    folder = tmp_path / "camera"
    folder.mkdir()
    portrait = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(folder / "0.png"), portrait)
    return folder


def config(broker: Broker, workdir: Path, camera: Path, **homeassistant: object) -> dict:
    images = {"kind": "images", "uri": str(camera), "loop": True}
    return {
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                 "outbox_path": str(workdir / "outbox.db"), "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0, "health_interval_s": 1},
        "homeassistant": {"enabled": True, **homeassistant},
        "pipelines": {
            "door": {"model": "face", "source": images, "sinks": [
                {"kind": "mqtt", "max_rate_hz": 5}, {"kind": "snapshot", "min_interval_s": 0.5}]},
            "mask": {"model": "selfie", "source": images, "sinks": [{"kind": "mqtt", "max_rate_hz": 5}]},
            "vib": {"model": "win", "sinks": [{"kind": "mqtt"}],
                    "source": {"kind": "mqtt", "uri": "sensors/+/vib", "channels": 2, "window": 4,
                               "stride": 4}},
            "quiet": {"model": "face", "source": images,
                      "sinks": [{"kind": "jsonl", "path": str(workdir / "quiet.jsonl")}]},
        },
    }


def configs(watcher, node: str = NODE) -> dict[str, dict]:
    """The latest config on each discovery topic of `node` (an empty one removes it)."""
    latest: dict[str, Message] = {}
    for message in watcher.messages(f"{PREFIX}/+/{node}/+/config"):
        latest[message.topic] = message
    return {topic: json.loads(m.payload) for topic, m in latest.items() if m.payload}


def last(watcher, topic: str) -> bytes:
    return watcher.messages(topic)[-1].payload


PIPELINE_ENTITIES = {
    f"{PREFIX}/binary_sensor/{NODE}/pipeline_door_detected/config",
    f"{PREFIX}/sensor/{NODE}/pipeline_door_count/config",
    f"{PREFIX}/sensor/{NODE}/pipeline_door_best_score/config",
    f"{PREFIX}/sensor/{NODE}/pipeline_mask_coverage/config",
    f"{PREFIX}/sensor/{NODE}/pipeline_vib_label/config",
    f"{PREFIX}/image/{NODE}/pipeline_door_snapshot/config",
}
MODEL_ENTITIES = {f"{PREFIX}/sensor/{NODE}/model_{model}_{what}/config"
                  for model in ("face", "selfie", "tiny", "win") for what in ("version", "latency_p95")}


def test_discovery_configs_follow_the_schema_and_read_what_edged_publishes(
        start_daemon, broker, mqtt_subscriber, store, camera, tmp_path):
    watcher = mqtt_subscriber(broker, [f"{PREFIX}/#", f"{EDGED}/#"])
    daemon = start_daemon(store.root, config=config(broker, tmp_path, camera))
    wait_until(lambda: configs(watcher).keys() == PIPELINE_ENTITIES | MODEL_ENTITIES,
               what=lambda: (sorted(configs(watcher)), daemon.output()[-3000:]))
    sensor = mqtt_subscriber(broker, None)
    sensor.publish("sensors/a1/vib", "1,10\n2,20\n3,30\n4,40")  # one window: "high" wins
    for topic in ("results/door", "results/mask", "results/vib", "snapshots/door", "state", "health",
                  "status"):
        watcher.wait_for(topic=f"{EDGED}/{topic}", timeout=60)

    found = configs(watcher)
    unique_ids = {c["unique_id"] for c in found.values()}
    assert len(unique_ids) == len(found)
    for topic, entity in found.items():
        component = topic.split("/")[1]
        assert entity.keys() <= DOCUMENTED[component], (topic, entity.keys() - DOCUMENTED[component])
        assert REQUIRED[component] <= entity.keys(), topic
        assert entity["device"].keys() <= DEVICE_KEYS and entity["origin"].keys() <= ORIGIN_KEYS
        assert entity["device"]["identifiers"] == [f"edged_{NODE}"] and entity["device"]["name"] == DEVICE
        assert entity["origin"]["name"] == "edged" and entity["device"]["sw_version"]
        assert entity.get("entity_category", "diagnostic") in ENTITY_CATEGORIES
        assert entity.get("state_class", "measurement") in STATE_CLASSES
        assert entity["availability_topic"] == f"{EDGED}/status"
        # Availability: edged's retained status, and the Last Will's payload, read by the template.
        assert render(entity["availability_template"], last(watcher, f"{EDGED}/status")) == \
            entity["payload_available"] == "online"
        will = json.dumps({"state": "offline", "device": DEVICE, "reason": "connection lost",
                           "connected_at": 1.0}).encode()
        assert render(entity["availability_template"], will) == entity["payload_not_available"]
        assert (entity.get("state_topic") or entity["image_topic"]).startswith(f"{EDGED}/")
    assert retained_now(broker, mqtt_subscriber) == found.keys()  # what Home Assistant finds at its start

    def value(object_id: str, component: str = "sensor") -> str:
        entity = found[f"{PREFIX}/{component}/{NODE}/{object_id}/config"]
        return render(entity["value_template"], last(watcher, entity["state_topic"]))

    door = json.loads(last(watcher, f"{EDGED}/results/door"))
    assert door["detections"], door  # the astronaut's face
    assert value("pipeline_door_detected", "binary_sensor") == "ON"
    assert int(value("pipeline_door_count")) == len(door["detections"])
    assert float(value("pipeline_door_best_score")) == max(d["score"] for d in door["detections"])
    mask = json.loads(last(watcher, f"{EDGED}/results/mask"))
    assert 0 < float(value("pipeline_mask_coverage")) == round(mask["coverage"] * 100, 2) <= 100
    assert value("pipeline_vib_label") == "high"
    for model in ("face", "selfie", "tiny", "win"):
        assert value(f"model_{model}_version") == "1"
    wait_until(lambda: value("model_face_latency_p95") != "None",
               what=lambda: last(watcher, f"{EDGED}/health"))
    health = json.loads(last(watcher, f"{EDGED}/health"))
    assert float(value("model_face_latency_p95")) == health["models"]["face"]["latency"]["p95_ms"] > 0

    # The snapshot's image entity reads the JPEG edged retains for the pipeline.
    image = found[f"{PREFIX}/image/{NODE}/pipeline_door_snapshot/config"]
    assert (image["image_topic"], image["content_type"]) == (f"{EDGED}/snapshots/door", "image/jpeg")
    jpeg = cv2.imdecode(np.frombuffer(last(watcher, image["image_topic"]), np.uint8), cv2.IMREAD_COLOR)
    assert jpeg is not None and jpeg.shape == (512, 512, 3)  # the astronaut, annotated

    # A detector that sees nothing: the same templates read an empty result.
    empty = json.dumps({**door, "detections": []}).encode()
    detected = found[f"{PREFIX}/binary_sensor/{NODE}/pipeline_door_detected/config"]
    assert render(detected["value_template"], empty) == detected["payload_off"]
    best = found[f"{PREFIX}/sensor/{NODE}/pipeline_door_best_score/config"]
    assert render(best["value_template"], empty) == "0"
    label = found[f"{PREFIX}/sensor/{NODE}/pipeline_vib_label/config"]
    assert render(label["value_template"], json.dumps({"classes": []}).encode()) == "None"

    log = daemon.output()
    assert "pipeline quiet has no sink of kind mqtt or snapshot, so no entities" in log
    assert "published 14 discovery configs under homeassistant/" in log
    with daemon.client() as client:
        section = client.status()["homeassistant"]
    assert section == {"enabled": True, "node_id": NODE, "entities": 14, "cleared": 0}


def test_entities_of_removed_pipelines_are_removed_at_start_and_at_reload(
        start_daemon, start_broker, mqtt_subscriber, store, camera, tmp_path):
    broker = start_broker(persistence=True)  # retained configs outlive the broker's restart below
    earlier = mqtt_subscriber(broker, None)
    stale = f"{PREFIX}/sensor/{NODE}/pipeline_gone_count/config"  # from an earlier run
    others = [f"{PREFIX}/sensor/other_node/pipeline_gone_count/config",  # another device's
              f"{PREFIX}/switch/{NODE}/relay/config"]  # a component edged never publishes
    for topic in (stale, *others):
        earlier.publish(topic, {"name": "gone", "state_topic": "x"}, retain=True)

    watcher = mqtt_subscriber(broker, [f"{PREFIX}/#"])
    daemon = start_daemon(store.root, config=config(broker, tmp_path, camera))
    wait_until(lambda: configs(watcher).keys() - set(others) == PIPELINE_ENTITIES | MODEL_ENTITIES,
               what=lambda: (sorted(configs(watcher)), daemon.output()[-3000:]))
    watcher.wait_for(lambda m: m.payload == b"", topic=stale, timeout=30)
    for topic in others:
        assert all(m.payload for m in watcher.messages(topic))

    # A reload without "vib": its label goes, the rest stays.
    reload_without(daemon, "vib")
    label = f"{PREFIX}/sensor/{NODE}/pipeline_vib_label/config"
    watcher.wait_for(lambda m: m.payload == b"", topic=label, timeout=30)
    wait_until(lambda: "Home Assistant: removed " + label in daemon.output(), what=daemon.output)

    # A model removed from the store takes its diagnostics with it; one added brings its own.
    tiny = {f"{PREFIX}/sensor/{NODE}/model_tiny_{what}/config" for what in ("version", "latency_p95")}
    store.remove("tiny")
    for topic in tiny:
        watcher.wait_for(lambda m: m.payload == b"", topic=topic, timeout=30)
    store.add("later", [store.root / "face" / "1" / "face_detection_short_range.tflite"], "1")
    store.activate("later", "1")
    watcher.wait_for(lambda m: m.payload != b"",
                     topic=f"{PREFIX}/sensor/{NODE}/model_later_latency_p95/config", timeout=30)

    # The fault: the broker is away while "mask" is removed; its entity goes once it is back.
    broker.stop()
    reload_without(daemon, "mask")
    wait_until(lambda: daemon.output().count("config reloaded: applied pipelines;") == 2, what=daemon.output)
    broker.start()
    with daemon.client() as client:  # the stale one, vib's, tiny's two, and now mask's
        wait_until(lambda: client.status()["homeassistant"]["cleared"] == 5,
                   what=lambda: (client.status()["homeassistant"], daemon.output()[-3000:]))
    label_and_coverage = {label, f"{PREFIX}/sensor/{NODE}/pipeline_mask_coverage/config"}
    later = {f"{PREFIX}/sensor/{NODE}/model_later_{what}/config" for what in ("version", "latency_p95")}
    wanted = PIPELINE_ENTITIES - label_and_coverage | MODEL_ENTITIES - tiny | later
    assert retained_now(broker, mqtt_subscriber) == wanted | {others[1]}  # the switch is not edged's


def test_configs_come_back_after_a_broker_restart_and_when_home_assistant_starts(
        start_daemon, broker, mqtt_subscriber, store, camera, tmp_path):
    daemon = start_daemon(store.root, config=config(broker, tmp_path, camera))
    wanted = PIPELINE_ENTITIES | MODEL_ENTITIES
    wait_until(lambda: retained_now(broker, mqtt_subscriber) == wanted, what=daemon.output)
    broker.restart()  # the fault: a broker without persistence forgets every retained message
    wait_until(lambda: retained_now(broker, mqtt_subscriber) == wanted, what=daemon.output)

    # Someone deleted one; Home Assistant's birth message brings it back.
    count = f"{PREFIX}/sensor/{NODE}/pipeline_door_count/config"
    home_assistant = mqtt_subscriber(broker, None)
    home_assistant.publish(count, b"", retain=True)
    assert count not in retained_now(broker, mqtt_subscriber)
    home_assistant.publish(f"{PREFIX}/status", b"online")
    wait_until(lambda: retained_now(broker, mqtt_subscriber) == wanted, what=daemon.output)


def reload_without(daemon, pipeline: str) -> None:
    """The daemon's config file without `pipeline`, then SIGHUP."""
    settings = tomllib.loads(daemon.config_path.read_text())
    del settings["pipelines"][pipeline]
    daemon.config_path.write_text(to_toml(settings))
    daemon.proc.send_signal(signal.SIGHUP)


def retained_now(broker: Broker, mqtt_subscriber) -> set[str]:
    """The discovery topics of this node the broker retains now. A marker the probe sends
    itself after subscribing comes after the retained messages (one queue per client)."""
    probe = mqtt_subscriber(broker, [f"{PREFIX}/+/{NODE}/+/config", "probe/marker"])
    probe.publish("probe/marker", b"end")
    probe.wait_for(topic="probe/marker")
    probe.close()
    return {m.topic for m in probe.messages(f"{PREFIX}/#") if m.retain and m.payload}


def test_discovery_needs_mqtt_and_checks_its_prefix():
    with pytest.raises(ConfigError, match=r"homeassistant\.enabled needs mqtt\.enabled"):
        load_settings(None, homeassistant={"enabled": True})
    with pytest.raises(ConfigError, match="discovery_prefix"):
        load_settings(None, mqtt={"enabled": True}, homeassistant={"enabled": True,
                                                                    "discovery_prefix": "home/#"})
    settings = load_settings(None, mqtt={"enabled": True}, homeassistant={"enabled": True})
    assert settings.homeassistant.discovery_prefix == "homeassistant"
