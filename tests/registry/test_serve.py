"""`serve`: chunk requests answered exactly as docs/updates.md says, by a real subprocess."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import threading
import uuid

import pytest

from edged.models.manifest import sha256_of
from tests.broker import Subscriber
from tests.conftest import build_tiny_ir, ir_files, wait_until
from tests.registry.conftest import Registry, fetch, retained_on, user_properties

# Mosquitto delays small packets by default (Nagle); docs/registry.md recommends this.
NO_DELAY = "set_tcp_nodelay true"
CHUNK = 64 * 1024
MAX_CHUNK = 128 * 1024


@pytest.fixture(scope="module")
def served(start_module_broker, tmp_path_factory, sample_models):
    """A registry serving the face model (one version), shared by the tests of this module."""
    broker = start_module_broker(extra_config=NO_DELAY)
    registry = Registry(tmp_path_factory.mktemp("served"), broker, {"max_chunk_bytes": MAX_CHUNK})
    registry.run("keygen")
    registry.run("publish", "face", sample_models["face"], "--version", "1")
    watcher = Subscriber(broker, "edged/registry/status")
    try:
        registry.serve(watcher)
    finally:
        watcher.close()
    yield registry
    registry.stop()


def device(mqtt_subscriber, registry: Registry, name: str) -> Subscriber:
    """A device's fetch client; without Nagle's algorithm, as serve's own connection (each
    sequential request would otherwise wait for a delayed ACK)."""
    client = mqtt_subscriber(registry.broker, f"edged/devices/{name}/fetch")
    client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def fetch_file(client: Subscriber, name: str, sha256: str, size: int, window: int = 4) -> bytes:
    """What a device does: `window` chunk requests in flight, each reply put at its offset."""
    topic = f"edged/devices/{name}/fetch"
    offsets = list(range(0, size, CHUNK))
    pending: dict[bytes, int] = {}
    parts: dict[int, bytes] = {}
    while offsets or pending:
        while offsets and len(pending) < window:
            offset = offsets.pop(0)
            correlation = uuid.uuid4().bytes
            pending[correlation] = offset
            client.publish("edged/registry/fetch", {"sha256": sha256, "offset": offset, "length": CHUNK},
                           response_topic=topic, correlation_data=correlation)
        reply = client.wait_for(lambda m: m.correlation_data in pending, topic=topic)
        offset = pending.pop(reply.correlation_data)
        assert user_properties(reply) == {"status": "ok", "sha256": sha256, "offset": str(offset)}
        assert len(reply.payload) == min(CHUNK, size - offset)
        parts[offset] = reply.payload
    return b"".join(parts[offset] for offset in sorted(parts))


def test_a_device_reassembles_a_whole_file_from_chunks(served, mqtt_subscriber, sample_models):
    path = sample_models["face"]
    client = device(mqtt_subscriber, served, "cam-1")
    data = fetch_file(client, "cam-1", sha256_of(path), path.stat().st_size)
    assert hashlib.sha256(data).hexdigest() == sha256_of(path) and data == path.read_bytes()
    assert all(m.qos == 1 for m in client.messages())


def test_bad_requests_get_a_one_line_error(served, mqtt_subscriber, sample_models):
    sha = sha256_of(sample_models["face"])
    size = sample_models["face"].stat().st_size
    client = device(mqtt_subscriber, served, "cam-2")
    cases = [
        ({"sha256": "0" * 64, "offset": 0, "length": 10}, "unknown or retired"),
        ({"sha256": sha, "offset": size, "length": 10}, "past the end"),
        ({"sha256": sha, "offset": size + 5, "length": 10}, "past the end"),
        ({"sha256": sha, "offset": -1, "length": 10}, "must not be negative"),
        ({"sha256": sha, "offset": 0, "length": MAX_CHUNK + 1}, f"between 1 and {MAX_CHUNK}"),
        ({"sha256": sha, "offset": 0, "length": 0}, "between 1"),
        ({"sha256": sha, "offset": True, "length": 10}, "offset must be an integer"),
        ({"sha256": sha, "offset": 0, "length": 1.5}, "length must be an integer"),
        ({"sha256": sha.upper(), "offset": 0, "length": 10}, "64 lower-case hex"),
        ({"sha256": sha, "offset": 0}, "sha256, offset and length"),
        ({"sha256": sha, "offset": 0, "length": 10, "more": 1}, "sha256, offset and length"),
        ([sha, 0, 10], "sha256, offset and length"),
        (b"{not json", "not JSON"),
        (json.dumps({"sha256": sha, "offset": 0, "length": 10, "pad": "x" * 5000}).encode(),
         "over 4096 bytes"),
    ]
    for payload, reason in cases:
        reply = fetch(client, payload, "cam-2")
        assert user_properties(reply) == {"status": "error"}, payload
        error = reply.json()["error"]
        assert reason in error and "\n" not in error, (payload, error)

    # A response topic that is not a device's fetch topic is not answered at all.
    watcher = mqtt_subscriber(served.broker, "edged/devices/cam-2/#")
    watcher.publish("edged/registry/fetch", {"sha256": sha, "offset": 0, "length": 10},
                    response_topic="edged/devices/cam-2/cmd", correlation_data=b"c")
    wait_until(lambda: "'edged/devices/cam-2/cmd' is not" in served.serve_log())

    # Still serving, and the last chunk is the short one.
    reply = fetch(client, {"sha256": sha, "offset": size - 10, "length": 100}, "cam-2")
    assert user_properties(reply)["status"] == "ok"
    assert reply.payload == sample_models["face"].read_bytes()[-10:]
    assert watcher.messages("edged/devices/cam-2/cmd") == []


def test_several_devices_are_served_at_once(served, mqtt_subscriber, sample_models):
    path = sample_models["face"]
    sha, size = sha256_of(path), path.stat().st_size
    names = [f"cam-{i}" for i in range(10, 15)]
    clients = {name: device(mqtt_subscriber, served, name) for name in names}
    results: dict[str, bytes | Exception] = {}

    def pull(name: str) -> None:
        try:
            results[name] = fetch_file(clients[name], name, sha, size)
        except Exception as exc:  # reported below, with the others
            results[name] = exc

    threads = [threading.Thread(target=pull, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert {name: hashlib.sha256(r).hexdigest() if isinstance(r, bytes) else repr(r)
            for name, r in results.items()} == dict.fromkeys(names, sha)


def test_a_version_published_while_serving_is_served_after_the_store_is_checked(
        served, mqtt_subscriber, tmp_path):
    files = ir_files(build_tiny_ir(tmp_path / "ir", scale=5.0))
    served.run("publish", "fresh", *files, "--version", "1")
    client = device(mqtt_subscriber, served, "cam-3")
    bin_file = files[1]
    reply = wait_for_status(client, "cam-3", sha256_of(bin_file), "ok")
    assert reply.payload == bin_file.read_bytes()



def wait_for_status(client: Subscriber, name: str, sha256: str, status: str, attempts: int = 200):
    """Ask again until the registry's answer for `sha256` has `status` (it checks the store
    every reload_interval_s)."""
    for _ in range(attempts):
        reply = fetch(client, {"sha256": sha256, "offset": 0, "length": CHUNK}, name)
        if user_properties(reply)["status"] == status:
            return reply
    raise AssertionError(f"{sha256} never answered {status}: last {reply.payload[:200]!r}")


def test_retire_stops_serving_sighup_reloads_restart_reannounces_sigterm_says_offline(
        make_registry, start_broker, mqtt_subscriber, tmp_path):
    broker = start_broker(extra_config=NO_DELAY)
    # The store is checked only on SIGHUP here: reload_interval_s is an hour.
    registry = make_registry(broker, {"reload_interval_s": 3600})
    files = ir_files(build_tiny_ir(tmp_path / "ir", scale=7.0))
    registry.run("publish", "tiny", *files, "--version", "1")
    status = mqtt_subscriber(broker, "edged/registry/status")
    proc = registry.serve(status).proc
    client = device(mqtt_subscriber, registry, "cam-4")
    bin_sha = sha256_of(files[1])
    first = fetch(client, {"sha256": bin_sha, "offset": 0, "length": 8}, "cam-4")
    assert user_properties(first)["status"] == "ok" and first.payload == files[1].read_bytes()[:8]

    registry.run("retire", "tiny", "1")
    proc.send_signal(signal.SIGHUP)
    error = wait_for_status(client, "cam-4", bin_sha, "error")
    assert "unknown or retired" in error.json()["error"]

    # A restarted broker (no persistence) has lost every retained message: serve retains them again.
    registry.run("publish", "tiny", *ir_files(build_tiny_ir(tmp_path / "ir2", scale=8.0)), "--version", "2")
    status.clear()
    broker.restart()
    status.wait_for(lambda m: m.payload and m.json()["state"] == "online", timeout=20)
    release = registry.verify(retained_on(mqtt_subscriber, broker, "edged/registry/models/tiny").payload)
    assert release.manifest.version == "2"

    status.clear()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    offline = status.wait_for(lambda m: m.payload and m.json()["state"] == "offline")
    assert offline.json()["reason"] == "shutdown" and offline.retain is False  # live, not the retained copy
    log = registry.serve_log()
    assert "Traceback" not in log and "refused a chunk request" in log


def test_serve_needs_the_signing_key(make_registry, broker):
    registry = make_registry(broker, keygen=False)
    done = registry.run("serve", expect=1)
    assert "edged-registry keygen" in done.stderr
