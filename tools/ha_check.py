"""Does a real Home Assistant show edged's entities? An integration check, not a test.

    python3.11 -m venv /tmp/ha-venv
    /tmp/ha-venv/bin/pip install homeassistant 'josepy<2'    # 2024.3.x is the last for Python 3.11
    .venv/bin/python tools/ha_check.py --hass /tmp/ha-venv/bin/hass

It starts a Mosquitto on a free loopback port (tests/broker.py), an edged daemon with
`[homeassistant] enabled` and two camera pipelines on the sample models (a face detector,
a selfie segmenter) looping over one picture, and Home Assistant in its own venv with its
MQTT integration pointed at that broker. Then, through Home Assistant's REST API only:

1. edged's entities appear, with the values edged's results, state and health give them;
2. a reload without one pipeline removes that pipeline's entity;
3. edged killed outright (its Last Will) turns the remaining entities `unavailable`.

Each step prints what it saw; the exit code is 0 when all three held. Home Assistant needs
its own dependency pins, hence its own venv (and the first start may pip-install the MQTT
integration's requirement).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import skimage.data

from edged.models.store import ModelStore
from tests.broker import Broker, Subscriber, free_port
from tests.daemon_process import ChildProcess, DaemonProcess, to_toml, wait_until

DEVICE = "edge-ha"  # Home Assistant's entity ids start with its slug: sensor.edge_ha_...
PASSWORD = "edged-check"  # noqa: S105 (Home Assistant's legacy API password, on 127.0.0.1 only)
# Run by Home Assistant's own Python: each config through its component's DISCOVERY_SCHEMA
# (which drops unknown keys silently, so what it dropped is printed).
SCHEMA_PROBE = """
import importlib, json, sys
for topic, payload in sorted(json.load(sys.stdin).items()):
    module = importlib.import_module("homeassistant.components.mqtt." + topic.split("/")[1])
    validated = module.DISCOVERY_SCHEMA(dict(payload))
    print(topic, "accepted; keys dropped:", sorted(set(payload) - set(validated)) or "none")
"""


class HomeAssistant:
    """Home Assistant with only `http`, `api` and MQTT (a config entry for the test broker)."""

    def __init__(self, hass: str, directory: Path, broker: Broker) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        (directory / ".storage").mkdir(parents=True)
        (directory / "configuration.yaml").write_text(
            "homeassistant:\n  name: edged check\n  auth_providers:\n"
            f"    - type: legacy_api_password\n      api_password: {PASSWORD}\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\napi:\n")
        entry = {"entry_id": "edgedcheckmqtt", "version": 1, "minor_version": 1, "domain": "mqtt",
                 "title": "test broker",
                 "data": {"broker": broker.host, "port": broker.port, "discovery": True},
                 "options": {}, "pref_disable_new_entities": False, "pref_disable_polling": False,
                 "source": "user", "unique_id": None, "disabled_by": None}
        (directory / ".storage" / "core.config_entries").write_text(json.dumps(
            {"version": 1, "minor_version": 1, "key": "core.config_entries", "data": {"entries": [entry]}}))
        self.process = ChildProcess([hass, "-c", str(directory)], directory / "hass.out",
                                    name="Home Assistant")
        self.log_file = directory / "home-assistant.log"
        self.token = ""

    def _call(self, path: str, data: dict | None = None, form: bool = False) -> object:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        body = None
        if data is not None:
            body = urllib.parse.urlencode(data).encode() if form else json.dumps(data).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded" if form else "application/json"
        request = urllib.request.Request(self.base + path, body, headers)  # noqa: S310 (our loopback URL)
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def log_in(self) -> None:
        """A token through the login flow (legacy API password), once the server answers."""
        client = f"{self.base}/"

        def flow() -> dict | None:
            try:
                return self._call("/auth/login_flow", {"client_id": client, "redirect_uri": client,
                                                       "handler": ["legacy_api_password", None]})
            except (urllib.error.URLError, ConnectionError):
                return None

        started = self.process.wait_for(flow, 600, "Home Assistant's HTTP API", interval=1.0)
        done = self._call(f"/auth/login_flow/{started['flow_id']}",
                          {"client_id": client, "password": PASSWORD})
        tokens = self._call("/auth/token", {"grant_type": "authorization_code", "code": done["result"],
                                            "client_id": client}, form=True)
        self.token = tokens["access_token"]

    def states(self, prefix: str) -> dict[str, str]:
        """{entity_id: state} of the entities whose object id starts with `prefix`."""
        return {s["entity_id"]: s["state"] for s in self._call("/api/states")
                if s["entity_id"].split(".", 1)[1].startswith(prefix)}

    def problems(self) -> list[str]:
        """Home Assistant's warnings and errors about MQTT or templates."""
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return [line for line in text.splitlines() if (" ERROR " in line or " WARNING " in line)
                and ("mqtt" in line or "template" in line) and "Connection refused" not in line]


def edged_config(workdir: Path, broker: Broker, camera: Path, store: Path) -> dict:
    images = {"kind": "images", "uri": str(camera), "loop": True}
    sink = [{"kind": "mqtt", "max_rate_hz": 2}]
    return {"store": {"path": str(store), "poll_interval_s": 0.5},
            "socket": {"path": str(workdir / "edged.sock")},
            "backends": {"openvino_cache_dir": str(workdir / "ov-cache")},
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                     "outbox_path": str(workdir / "outbox.db"), "health_interval_s": 2,
                     "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "homeassistant": {"enabled": True},
            "pipelines": {"door": {"model": "face", "source": images, "sinks": sink},
                          "mask": {"model": "selfie", "source": images, "sinks": sink}}}


def sample_store(directory: Path) -> Path:
    tools = Path(__file__).resolve().parent
    sys.path.insert(0, str(tools))
    import fetch_models

    store = ModelStore(directory)
    for name, path in fetch_models.fetch().items():
        fetch_models.add_sample(store, name, path)
        store.activate(name, "1")
    return directory


def retained_configs(broker: Broker) -> dict[str, dict]:
    """The discovery configs the broker retains now (a marker sent after subscribing comes
    after them: one queue per client)."""
    probe = Subscriber(broker, ["homeassistant/+/+/+/config", "ha-check/marker"])
    try:
        probe.publish("ha-check/marker", b"end")
        probe.wait_for(topic="ha-check/marker")
    finally:
        probe.close()
    return {m.topic: json.loads(m.payload) for m in probe.messages("homeassistant/#")
            if m.retain and m.payload}


def schema_check(hass_binary: str, configs: dict[str, dict]) -> bool:
    """Home Assistant's own schemas accept every config and drop none of its keys."""
    python = str(Path(hass_binary).with_name("python"))
    result = subprocess.run([python, "-c", SCHEMA_PROBE], input=json.dumps(configs), capture_output=True,
                            text=True, timeout=120)
    print("\n0. edged's configs through Home Assistant's own discovery schemas:")
    print("  " + (result.stdout.strip() or result.stderr.strip()[-2000:]).replace("\n", "\n  "))
    return result.returncode == 0 and result.stdout.count("keys dropped: none") == len(configs)


def show(title: str, states: dict[str, str]) -> None:
    print(f"\n{title}")
    for entity_id, state in sorted(states.items()):
        print(f"  {entity_id:45} {state}")


def check(hass_binary: str, workdir: Path) -> bool:
    broker = Broker(workdir / "broker", "anonymous").start()
    camera = workdir / "camera"
    camera.mkdir()
    cv2.imwrite(str(camera / "0.png"), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    settings = edged_config(workdir, broker, camera, sample_store(workdir / "store"))
    (workdir / "edged").mkdir()
    daemon = DaemonProcess(workdir / "edged", settings).wait_ready()
    hass = HomeAssistant(hass_binary, workdir / "hass", broker)
    slug = DEVICE.replace("-", "_") + "_"
    try:
        schema_ok = schema_check(hass_binary, retained_configs(broker))
        started = time.monotonic()
        hass.log_in()
        print(f"Home Assistant answers on {hass.base} after {time.monotonic() - started:.0f} s")
        expected = {"binary_sensor.edge_ha_door_detected", "sensor.edge_ha_door_count",
                    "sensor.edge_ha_door_best_score", "sensor.edge_ha_mask_coverage",
                    *(f"sensor.edge_ha_{model}_{what}" for model in ("face", "selfie")
                      for what in ("version", "p95_latency"))}

        def seen() -> dict[str, str] | None:
            states = hass.states(slug)
            ready = expected <= states.keys() and all(states[e] not in ("unknown", "unavailable")
                                                      for e in expected)
            return states if ready else None

        states = wait_until(seen, 120, lambda: hass.states(slug), interval=1.0)
        show("1. edged's entities, as Home Assistant's REST API shows them:", states)
        ok = (states["binary_sensor.edge_ha_door_detected"] == "on"
              and int(states["sensor.edge_ha_door_count"]) >= 1
              and 0 < float(states["sensor.edge_ha_door_best_score"]) <= 1
              and 0 < float(states["sensor.edge_ha_mask_coverage"]) <= 100
              and states["sensor.edge_ha_face_version"] == "1"
              and float(states["sensor.edge_ha_face_p95_latency"]) > 0)
        print(f"   values as edged published them: {ok}")

        del settings["pipelines"]["mask"]
        daemon.config_path.write_text(to_toml(settings))
        daemon.proc.send_signal(signal.SIGHUP)
        gone = "sensor.edge_ha_mask_coverage"
        states = wait_until(lambda: (s := hass.states(slug)) and gone not in s and s,
                            60, lambda: hass.states(slug), interval=1.0)
        show("2. after a reload without pipeline 'mask' (its coverage sensor is gone):", states)

        daemon.kill()  # no goodbye: the broker publishes edged's Last Will
        states = wait_until(lambda: (s := hass.states(slug)) and set(s.values()) == {"unavailable"} and s,
                            60, lambda: hass.states(slug), interval=1.0)
        show("3. after edged was killed (its Last Will):", states)
        problems = hass.problems()
        print("\nHome Assistant's log about MQTT and templates:", *(problems or ["(nothing)"]), sep="\n  ")
        return schema_ok and ok and not problems
    finally:
        daemon.stop()
        hass.process.stop()
        broker.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hass", required=True, help="Home Assistant's `hass` executable (in its own venv)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edged-ha-", dir="/tmp"))
    try:
        ok = check(args.hass, workdir)
    finally:
        if args.keep:
            print(f"\nlogs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
