"""Snapshots over MQTT end to end: a real daemon subprocess, a real Mosquitto started by the
test, the face detector on the astronaut. The JPEG is retained on
edged/devices/{id}/snapshots/{pipeline}, and only the newest waits while the broker is away."""

from __future__ import annotations

import cv2
import numpy as np

from tests.daemon_process import wait_until
from tests.pipelines.test_mqtt_pipelines import DEVICE, mqtt_config, scene

TOPIC = f"edged/devices/{DEVICE}/snapshots/door"


def test_snapshots_are_retained_jpegs_and_only_the_newest_waits_offline(
        start_daemon, broker, mqtt_subscriber, sample_store, tmp_path):
    snaps, camera = tmp_path / "snaps", scene(tmp_path / "camera", 0)
    daemon = start_daemon(sample_store.root, config={**mqtt_config(broker, tmp_path), "pipelines": {"door": {
        "model": "face", "source": {"kind": "images", "uri": str(camera), "loop": True},
        "sinks": [{"kind": "snapshot", "path": str(snaps), "min_interval_s": 0.2, "max_side": 320}],
    }}})
    watcher = mqtt_subscriber(broker, TOPIC)
    first = watcher.wait_for(timeout=30)
    picture = cv2.imdecode(np.frombuffer(first.payload, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape == (240, 320, 3)  # 640x480, bounded to 320

    broker.stop()  # snapshots go on being taken; the outbox keeps only the newest for the topic
    with daemon.client() as client:
        wait_until(lambda: not client.status()["mqtt"]["connected"], what=client.status)
        published = client.pipelines()["door"]["sinks"][0]["published"]
        wait_until(lambda: client.pipelines()["door"]["sinks"][0]["published"] >= published + 5,
                   what=client.pipelines)
        waiting = client.status()["mqtt"]["outbox"]["by_kind"]
    assert waiting["result"] == 1, waiting

    broker.start()
    with daemon.client() as client:
        wait_until(lambda: client.status()["mqtt"]["outbox"]["backlog"] == 0, what=client.status)
    daemon.stop()  # after a clean stop, what the broker retains is what the directory keeps as latest
    late = mqtt_subscriber(broker, TOPIC).wait_for(timeout=30)
    assert late.retain and late.payload == (snaps / "latest.jpg").read_bytes()
    assert "snapshot file failing" not in daemon.output() and "snapshot mqtt failing" not in daemon.output()
