"""`fleet`: what the devices report on the broker, as the operator sees it."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def test_fleet_lists_devices_with_status_versions_and_health_age(registry, broker, mqtt_subscriber):
    devices = mqtt_subscriber(broker, None)
    devices.publish("edged/devices/cam-a/status", {"state": "online", "version": "0.1.0",
                                                    "models": {"face": "3"}}, retain=True)
    failure = {"version": "4", "kind": "update_failed", "reason": "self-test: output y differs", "at": 1.5}
    devices.publish("edged/devices/cam-a/state", {"device": "cam-a", "group": "canary", "models": {
        "face": {"desired": "4", "active": "3", "degraded": False, "failure": failure},
        "tiny": {"desired": None, "active": "1", "degraded": True, "reason": "fallback"}}}, retain=True)
    devices.publish("edged/devices/cam-b/status", {"state": "offline", "reason": "connection lost"},
                    retain=True)
    devices.publish("edged/devices/cam-c/status", b"not json", retain=True)

    command = [sys.executable, "-m", "edged.registry", "fleet", "--wait", "1",
               "--config", str(registry.config)]
    runs = [subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=registry.env) for extra in (["--json"], [])]
    # Health reports are not retained: cam-a keeps sending them while fleet listens.
    while any(run.poll() is None for run in runs):
        devices.publish("edged/devices/cam-a/health", {"device": "cam-a", "uptime_s": 5})
        time.sleep(0.1)
    (as_json, json_err), (table, table_err) = (run.communicate() for run in runs)
    assert [run.returncode for run in runs] == [0, 0], json_err + table_err

    summary = json.loads(as_json)
    assert list(summary) == ["cam-a", "cam-b", "cam-c"]
    cam_a = summary["cam-a"]
    assert cam_a["status"] == "online" and 0 <= cam_a["health_age_s"] < 60 and cam_a["group"] == "canary"
    assert cam_a["models"] == {"face": {"desired": "4", "active": "3", "degraded": False, "failure": failure},
                               "tiny": {"desired": None, "active": "1", "degraded": True, "failure": None}}
    assert summary["cam-b"] == {"status": "offline", "reason": "connection lost", "group": None, "models": {},
                                "health_age_s": None, "problems": []}
    assert summary["cam-c"]["problems"] == ["status is not a JSON object of at most 65536 bytes"]

    lines = table.splitlines()
    assert lines[0].split() == ["DEVICE", "STATUS", "MODEL", "DESIRED", "ACTIVE", "HEALTH", "LAST", "FAILURE"]
    assert lines[1].split()[:5] == ["cam-a", "online", "face", "4", "3"]
    assert "s ago" in lines[1] and lines[1].endswith("  4 failed: self-test: output y differs")
    assert lines[2].split() == ["tiny", "-", "1", "(degraded)"]
    assert lines[3].split()[:5] == ["cam-b", "offline", "(connection", "lost)", "-"]
    assert lines[3].endswith("none in 1 s")


def test_fleet_says_when_the_broker_is_away(make_registry, start_broker):
    broker = start_broker()
    registry = make_registry(broker)
    broker.stop()
    done = registry.run("fleet", "--wait", "0", expect=1)
    assert "cannot reach the MQTT broker" in done.stderr and len(done.stderr.strip().splitlines()) == 1
