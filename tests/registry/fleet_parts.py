"""Parts of the scale-out tests (issue 13): a model to update to, a device's config, and
paho clients that count chunk requests and replies without keeping the chunks."""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from edged.models.store import ModelStore
from tests.broker import Broker, new_client, publish_properties
from tests.conftest import ir_files, wait_until
from tests.registry.conftest import Registry

NO_DELAY = "set_tcp_nodelay true"
DEVICE = "cam-1"
EVENTS = f"edged/devices/{DEVICE}/events"
REPLIES = f"edged/devices/{DEVICE}/fetch"
FETCH = "edged/registry/fetch"
WIDTH = 1024  # a 1024 x 1024 float32 matrix: a 4 MiB model


def build_matmul_ir(directory: Path, seed: int, width: int = WIDTH) -> Path:
    import openvino as ov
    from openvino import opset13 as ops

    weights = np.random.default_rng(seed).standard_normal((width, width), dtype=np.float32) / width
    x = ops.parameter([1, width], np.float32, name="x")
    y = ops.matmul(x, ops.constant(weights), False, False)
    y.output(0).get_tensor().set_names({"y"})
    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([y], [x], "wide"), str(directory / "wide.xml"), compress_to_fp16=False)
    return directory / "wide.xml"


def device_store(tmp_path: Path) -> ModelStore:
    """The device's store: wide 1 active."""
    store = ModelStore(tmp_path / "store")
    store.add("wide", ir_files(build_matmul_ir(tmp_path / "v1", seed=1)), "1")
    store.activate("wide", "1")
    return store


def device_config(registry: Registry, workdir: Path, *, device_id: str = DEVICE, **updates: object) -> dict:
    broker = registry.broker
    return {
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "device_id": device_id,
                 "outbox_path": str(workdir / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "updates": {"enabled": True, "public_keys": [registry.public_key_text], "probation_s": 0.5,
                    "download_dir": str(workdir / "downloads"), **updates},
    }


def publish_v2(registry: Registry, tmp_path: Path) -> list[Path]:
    files = ir_files(build_matmul_ir(tmp_path / "v2", seed=2))
    registry.run("publish", "wide", *files, "--version", "2")
    return files


def wait_online(status_watcher, instances: int) -> set[str]:
    """The ids of `instances` distinct serve instances that said online."""
    def online() -> set[str]:
        return {m.json().get("instance") for m in status_watcher.messages("edged/registry/status")
                if m.payload and m.json()["state"] == "online"}
    wait_until(lambda: len(online()) >= instances, 20, f"{instances} instances online")
    return online()


def served_chunks(log: str) -> int:
    """From serve's last line: `stopped: served N chunks ...`."""
    line = next(line for line in reversed(log.splitlines()) if "stopped: served" in line)
    return int(line.split("stopped: served ")[1].split()[0])


def busy_count(log: str) -> tuple[int, int]:
    """From serve's last line: requests refused busy, and how many of them were unanswered."""
    line = next(line for line in reversed(log.splitlines()) if "stopped: served" in line)
    found = re.search(r"\((\d+) busy, (\d+) of them unanswered\)", line)
    if found is None:
        raise AssertionError(f"no busy count in {line!r}")
    return int(found[1]), int(found[2])


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


class Counting:
    """A paho client counting what arrives per correlation data, and each reply's status
    (payloads are not kept: replies may be megabytes each)."""

    def __init__(self, broker: Broker, topics: list[str], qos: int = 1) -> None:
        self.requests: Counter[bytes] = Counter()  # on the fetch topic
        self.replies: Counter[bytes] = Counter()  # on the reply topics
        self.statuses: Counter[str] = Counter()  # "ok" or the error line
        self._lock = threading.Lock()
        self.client = new_client(broker, f"count-{secrets.token_hex(4)}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_connect = lambda client, *args: client.subscribe([(t, qos) for t in topics])
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise AssertionError("no SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        with self._lock:
            if message.topic == FETCH:
                self.requests[correlation] += 1
                return
            self.replies[correlation] += 1
            status = dict(getattr(props, "UserProperty", None) or []).get("status")
            error = json.loads(message.payload)["error"] if status == "error" else "ok"
            self.statuses[re.sub(r"[0-9a-f]{64}", "<sha256>", error)] += 1

    def snapshot(self) -> tuple[Counter[bytes], Counter[bytes], Counter[str]]:
        with self._lock:
            return Counter(self.requests), Counter(self.replies), Counter(self.statuses)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def flood_request(sha256: str, offset: int, length: int, pad_to: int = 4000) -> bytes:
    """A valid request, padded with JSON whitespace to near the 4 KiB limit."""
    body = json.dumps({"sha256": sha256, "offset": offset, "length": length})
    return (body[:-1] + " " * (pad_to - len(body)) + "}").encode()


def flood_properties(device: str) -> object:
    return publish_properties(response_topic=f"edged/devices/{device}/fetch",
                              correlation_data=secrets.token_bytes(256))
