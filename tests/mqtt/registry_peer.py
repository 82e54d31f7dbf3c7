"""The registry's side of the update protocol, as a test drives it.

`ChunkPeer` answers chunk requests on `edged/registry/fetch` from files it holds, per
docs/updates.md, and can misbehave on purpose (truncate chunks); `sign_and_retain`
publishes a release envelope signed with a key the test made. Together they let a test
offer a device releases the real registry would never sign (a wrong hash, a failing
self-test) and check the device refuses them. The real registry is tested on its own in
tests/registry/ and end to end in test_updates.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.signing import sign_release
from tests.broker import Broker, new_client


class ChunkPeer:
    def __init__(self, broker: Broker, *, truncate: bool = False) -> None:
        self.files: dict[str, bytes] = {}  # sha256 -> bytes
        self.truncate = truncate
        self.requests = 0
        self._lock = threading.Lock()
        self.client = new_client(broker, "chunk-peer")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("edged/registry/fetch", qos=1)
        self.client.loop_start()

    def add(self, name: str, data: bytes) -> dict:
        """Serve `data`; its manifest entry (unchecked: a test may want a bad name)."""
        digest = hashlib.sha256(data).hexdigest()
        self.files[digest] = data
        return {"name": name, "sha256": digest, "size": len(data)}

    def add_file(self, path: Path) -> dict:
        return self.add(path.name, path.read_bytes())

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.requests += 1
        request = json.loads(message.payload)
        data = self.files.get(request["sha256"], b"")
        chunk = data[request["offset"]:request["offset"] + request["length"]]
        if self.truncate and len(chunk) > 1:
            chunk = chunk[: len(chunk) // 2]
        properties = Properties(PacketTypes.PUBLISH)
        properties.CorrelationData = message.properties.CorrelationData
        properties.UserProperty = [("status", "ok"), ("sha256", request["sha256"]),
                                   ("offset", str(request["offset"]))]
        client.publish(message.properties.ResponseTopic, chunk, qos=1, properties=properties)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def release_for(name: str, version: str, files: list[dict], *, model_format: str = "openvino",
                group: str | None = None, selftest: dict | None = None, valid_s: float = 3600) -> dict:
    now = time.time()
    return {"manifest": {"name": name, "version": version, "format": model_format,
                         "files": files},
            "group": group, "published_at": now, "expires_at": now + valid_s, "selftest": selftest}


def sign_and_retain(broker: Broker, release: dict, key) -> dict:
    """Sign `release` with `key` and retain it on its model's topic; return the envelope."""
    envelope = sign_release(release, key)
    retain_envelope(broker, envelope)
    return envelope


def retain_envelope(broker: Broker, envelope: dict) -> None:
    """Retain an envelope as it is (signed or tampered with) on its release's topic."""
    release = envelope["release"]
    name, group = release["manifest"]["name"], release.get("group")
    topic = f"edged/registry/groups/{group}/models/{name}" if group else f"edged/registry/models/{name}"
    publisher = new_client(broker, f"publisher-{time.monotonic_ns()}")
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    publisher.publish(topic, json.dumps(envelope).encode(), qos=1, retain=True).wait_for_publish(10)
    publisher.disconnect()
    publisher.loop_stop()
