"""Pipelines over MQTT end to end: a real daemon subprocess, a real Mosquitto started by the
test. Sensor samples come in on a topic, results go out on edged/devices/{id}/results/{name}:
rate limited, on change only, and kept while the broker is away."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from tests.broker import Broker
from tests.daemon_process import wait_until
from tests.pipelines.test_sensor_sources import open_writer

DEVICE = "edge-7"
RESULTS = f"edged/devices/{DEVICE}/results"


def mqtt_config(broker: Broker, workdir: Path, **extra: object) -> dict:
    settings = {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                "outbox_path": str(workdir / "outbox.db"), "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0, "health_interval_s": 600}
    return {"mqtt": settings | extra}


def wait_subscribed(broker: Broker, topic_filter: str, times: int = 1) -> None:
    """Until the broker's log shows the daemon subscribed to `topic_filter` (`times` in all)."""
    line = f": {DEVICE} 1 {topic_filter}\n"
    wait_until(lambda: broker.log().count(line) >= times, what=lambda: broker.log(tail=20))


def payloads(watcher, pipeline: str) -> list[dict]:
    return [m.json() for m in watcher.messages(f"{RESULTS}/{pipeline}")]


def test_a_topic_feeds_windows_and_results_go_back_over_mqtt(start_daemon, broker, mqtt_subscriber,
                                                              window_store, tmp_path):
    watcher = mqtt_subscriber(broker, f"{RESULTS}/#")
    source = {"kind": "mqtt", "uri": "sensors/+/vib", "channels": 2, "window": 4, "stride": 4}
    daemon = start_daemon(window_store.root, config={**mqtt_config(broker, tmp_path), "pipelines": {
        "vib": {"model": "win", "source": source, "sinks": [{"kind": "mqtt"}]},
        # A second pipeline on the same topic filter: both are fed.
        "raw": {"model": "winraw", "source": source, "sinks": [{"kind": "mqtt"}]},
    }})
    sensor = mqtt_subscriber(broker, None)
    wait_subscribed(broker, "sensors/+/vib")
    with daemon.client() as client:  # both sources listen once their pipelines have started
        wait_until(lambda: {p["state"] for p in client.pipelines().values()} == {"running"},
                 what=client.pipelines)
    sensor.publish("sensors/a1/vib", "1,10\n2,20\nnot,a number\n3,30")
    sensor.publish("sensors/a1/vib", "4,40")  # a window may span messages
    sensor.publish("sensors/a1/other", "9,9\n9,9\n9,9\n9,9\n")  # not this filter
    watcher.wait_count(2, timeout=30)
    [vib] = payloads(watcher, "vib")
    [raw] = payloads(watcher, "raw")
    assert vib["classes"] == [{"index": 1, "label": "high", "score": 100.0}]
    assert vib["window"] == 1 and vib["pipeline"] == "vib" and vib["model"] == "win"
    assert raw["outputs"]["sums"]["data"] == [10.0, 100.0]
    with daemon.client() as client:
        status = client.pipelines()["vib"]
    assert status["state"] == "running" and status["source"] == "sensors/+/vib"
    assert status["messages"] == 2 and status["samples"] == 4 and status["frames"] == 1
    assert status["malformed"] == 1 and status["last_malformed"] == "not a number: 'not,a number'"
    assert status["sinks"] == [{"kind": "mqtt", "published": 1, "rate_limited": 0, "unchanged": 0,
                                "failed": 0, "last_error": ""}]
    assert "skipped a malformed sample, not a number" in daemon.output()
    sensor.publish("sensors/a1/vib", b"1,1\n" * 300_000)  # one message over 1 MiB: malformed as a whole
    with daemon.client() as client:
        wait_until(lambda: client.pipelines()["vib"]["malformed"] == 2, what=client.pipelines)
        status = client.pipelines()["vib"]
    assert status["last_malformed"] == "a message of 1200000 bytes, over 1048576"
    assert status["samples"] == 4 and status["messages"] == 3

    broker.stop()  # the source says so, and comes back with the broker
    with daemon.client() as client:
        wait_until(lambda: client.pipelines()["vib"]["state"] == "reconnecting", what=client.pipelines)
        assert client.pipelines()["vib"]["last_error"] == "MQTT broker not connected"
        broker.start()
        wait_until(lambda: client.pipelines()["vib"]["state"] == "running", what=client.pipelines)
        wait_subscribed(broker, "sensors/+/vib", times=2)  # the link subscribed again
        watcher.wait_connected(connects=2)
        sensor.wait_connected(connects=2)
        sensor.publish("sensors/b2/vib", "0,1\n0,1\n0,1\n0,1\n")
        watcher.wait_for(lambda m: m.json().get("window") == 2, topic=f"{RESULTS}/vib", timeout=30)
        status = client.pipelines()["vib"]
    assert status["reconnects"] == 1 and status["last_error"] == ""
    assert payloads(watcher, "vib")[-1]["classes"][0] == {"index": 1, "label": "high", "score": 4.0}


def test_a_restarted_pipeline_is_fed_once(start_daemon, broker, mqtt_subscriber, window_store, tmp_path):
    watcher = mqtt_subscriber(broker, f"{RESULTS}/#")
    source = {"kind": "mqtt", "uri": "line/#", "format": "jsonl", "fields": ["x", "y"], "window": 4,
              "stride": 4}
    daemon = start_daemon(window_store.root, config={**mqtt_config(broker, tmp_path), "pipelines": {
        "a": {"model": "winraw", "source": source, "sinks": [{"kind": "mqtt"}]},
    }})
    sensor = mqtt_subscriber(broker, None)
    wait_subscribed(broker, "line/#")
    with daemon.client() as client:
        for action in ("restart", "stop", "start"):
            client.pipeline_control("a", action)
        wait_until(lambda: client.pipelines()["a"]["state"] == "running", what=client.pipelines)
        sensor.publish("line/1", "\n".join(json.dumps({"x": n, "y": 1, "extra": "ok"}) for n in range(4)))
        watcher.wait_count(1, timeout=30)
        sensor.publish("line/2", '{"x": 1, "y": 0}\n' * 4)
        watcher.wait_count(2, timeout=30)
        status = client.pipelines()["a"]
    # Each message reached the one running source once: the stopped ones stopped listening.
    assert status["messages"] == 2 and status["frames"] == 2 and status["malformed"] == 0
    assert [p["outputs"]["sums"]["data"] for p in payloads(watcher, "a")] == [[6.0, 4.0], [4.0, 0.0]]


def test_results_made_while_the_broker_is_away_arrive_after_it_returns(
        start_daemon, start_broker, mqtt_subscriber, window_store, tmp_path):
    broker = start_broker(persistence=True)
    watcher = mqtt_subscriber(broker, f"{RESULTS}/vib", keep_session=True)  # misses nothing meanwhile
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    daemon = start_daemon(window_store.root, config={**mqtt_config(broker, tmp_path), "pipelines": {"vib": {
        "model": "win", "source": {"kind": "fifo", "uri": str(fifo), "channels": 2, "window": 4, "stride": 4},
        "sinks": [{"kind": "mqtt"}, {"path": str(tmp_path / "vib.jsonl")}],
    }}})
    writer = open_writer(fifo)
    with daemon.client() as client:
        def processed() -> int:
            return client.pipelines()["vib"]["processed"]

        os.write(writer, b"1,0\n" * 4)
        watcher.wait_count(1, timeout=30)
        broker.stop()
        wait_until(lambda: not client.status()["mqtt"]["connected"], what=client.status)
        for window in range(2, 8):  # one at a time, so none is dropped for a busy model
            os.write(writer, b"%d,0\n" % window * 4)
            wait_until(lambda w=window: processed() == w, what=client.pipelines)
        mqtt = client.status()["mqtt"]
        assert mqtt["outbox"]["by_kind"].get("result") == 6, mqtt
        assert client.pipelines()["vib"]["sinks"][0]["published"] == 7  # put in the outbox
        broker.start()
        watcher.wait_for(lambda m: m.json()["window"] == 7, timeout=30)
        wait_until(lambda: client.status()["mqtt"]["outbox"]["by_kind"].get("result", 0) == 0,
                 what=client.status)
    os.close(writer)
    windows = [p["window"] for p in payloads(watcher, "vib")]
    assert sorted(set(windows)) == list(range(1, 8)), windows  # QoS 1: a repeat is possible, a loss not
    assert windows == sorted(windows), "in order"
    assert payloads(watcher, "vib")[-1]["classes"] == [{"index": 0, "label": "low", "score": 28.0}]


def portrait(shift: int = 0, noise: int = 0) -> np.ndarray:
    """The astronaut's head on a grey 480x640 frame, `shift` pixels to the right."""
    face = cv2.resize(cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)[0:300, 100:400], (256, 256))
    frame = np.full((480, 640, 3), 90, np.uint8)
    frame[100:356, 100 + shift: 356 + shift] = face
    if noise:
        grain = np.random.default_rng(noise).integers(-2, 3, frame.shape)
        frame = np.clip(frame.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    return frame


def write_image(path: Path, image: np.ndarray) -> None:
    """Write aside and rename over, so the looping source never reads half an image."""
    partial = path.with_name(".partial.png")
    cv2.imwrite(str(partial), image)
    os.replace(partial, path)


def scene(directory: Path, shift: int) -> Path:
    """A folder of two shots of one scene, the second with sensor noise."""
    directory.mkdir()
    write_image(directory / "a.png", portrait(shift))
    write_image(directory / "b.png", portrait(shift, noise=1))
    return directory


def test_on_change_publishes_a_steady_scene_once_and_again_when_it_changes(
        start_daemon, broker, mqtt_subscriber, sample_store, tmp_path):
    watcher = mqtt_subscriber(broker, f"{RESULTS}/door")
    camera = tmp_path / "camera"  # a link to the scene the looping source sees
    camera.symlink_to(scene(tmp_path / "before", shift=0))
    daemon = start_daemon(sample_store.root, config={**mqtt_config(broker, tmp_path), "pipelines": {"door": {
        "model": "face", "source": {"kind": "images", "uri": str(camera), "loop": True},
        # Noise of 2 grey levels moves the face's score by ~0.015 (its box by ~0.001): 1 digit.
        "sinks": [{"kind": "mqtt", "on_change": True, "change_digits": 1}],
    }}})
    with daemon.client() as client:
        wait_until(lambda: client.pipelines()["door"]["processed"] >= 40, what=client.pipelines)
        steady = client.pipelines()["door"]
        first = watcher.wait_for(timeout=30).json()
        (tmp_path / "swap").symlink_to(scene(tmp_path / "after", shift=120))  # the visitor steps aside
        os.replace(tmp_path / "swap", camera)
        second = watcher.wait_for(lambda m: m.json()["frame"] != first["frame"], timeout=30).json()
        later = client.pipelines()["door"]["processed"] + 40
        wait_until(lambda: client.pipelines()["door"]["processed"] >= later, what=client.pipelines)
        moved = client.pipelines()["door"]
    assert len(first["detections"]) == 1 and len(second["detections"]) == 1
    assert second["detections"][0]["box"][0] - first["detections"][0]["box"][0] > 0.1
    sink = steady["sinks"][0]
    assert sink["published"] == 1 and sink["unchanged"] >= 39, steady  # noise is no change
    assert moved["sinks"][0]["published"] == 2 and len(watcher.messages()) == 2, moved
    assert moved["errors"] == 0 and moved["last_error"] == ""


def test_the_rate_limit_bounds_what_is_published(start_daemon, broker, mqtt_subscriber, sample_store,
                                                 tmp_path):
    watcher = mqtt_subscriber(broker, f"{RESULTS}/door")
    folder = scene(tmp_path / "door", shift=0)
    write_image(folder / "c.png", portrait(shift=100))
    daemon = start_daemon(sample_store.root, config={**mqtt_config(broker, tmp_path), "pipelines": {"door": {
        "model": "face", "source": {"kind": "images", "uri": str(folder), "loop": True},
        "sinks": [{"kind": "mqtt", "max_rate_hz": 4}, {"path": str(tmp_path / "all.jsonl")}],
    }}})
    with daemon.client() as client:
        wait_until(lambda: client.pipelines()["door"]["processed"] >= 100, what=client.pipelines)
        door = client.pipelines()["door"]
    lifetime = time.monotonic() - daemon.started  # the daemon started first: the pipeline ran less
    mqtt, jsonl = door["sinks"]
    assert jsonl["written"] >= 100  # the file has every result; MQTT at most 4 a second of them
    assert 1 <= mqtt["published"] <= 4 * lifetime + 1, (door, lifetime)
    assert abs(mqtt["published"] + mqtt["rate_limited"] - jsonl["written"]) <= 2, door
    assert mqtt["rate_limited"] > mqtt["published"], door  # the model is much faster than 4 a second
    frames = [m.json()["frame"] for m in watcher.wait_count(mqtt["published"], timeout=30)]
    assert frames == sorted(set(frames))


def test_the_daemon_refuses_an_mqtt_pipeline_without_mqtt(start_daemon, window_store):
    daemon = start_daemon(window_store.root, ready=False, config={"pipelines": {"vib": {
        "model": "win", "source": {"kind": "mqtt", "uri": "sensors/#"}, "enabled": False}}})
    assert daemon.proc.wait(timeout=30) == 2
    assert daemon.output().strip().splitlines() == [
        "edged: invalid configuration: pipeline 'vib' reads its source over MQTT: it needs mqtt.enabled"]
