"""The device's update agent against releases a test signs and serves (tests/mqtt/registry_peer.py):
a real daemon subprocess, a real Mosquitto, real models, real signatures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edged.models.store import ModelStore
from edged.signing import generate_key, public_key_text, sign_release
from tests.conftest import build_tiny_ir, ir_files
from tests.mqtt.registry_peer import (
    ChunkPeer,
    npy_bytes,
    npz_bytes,
    release_for,
    retain_envelope,
    sign_and_retain,
)

DEVICE = "cam-1"
EVENTS = f"edged/devices/{DEVICE}/events"
ONES = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture
def peer(broker):
    chunk_peer = ChunkPeer(broker)
    yield chunk_peer
    chunk_peer.close()


def device_config(broker, workdir: Path, key, **updates: object) -> dict:
    return {
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                 "outbox_path": str(workdir / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "updates": {"enabled": True, "public_keys": [public_key_text(key)],
                    "download_dir": str(workdir / "downloads"), "probation_s": 0.5,
                    "chunk_timeout_s": 2.0, "chunk_retries": 2, **updates},
    }


def tiny_release(peer: ChunkPeer, tmp_path: Path, version: str, scale: float, *,
                 expected_scale: float | None = None, **options) -> dict:
    """A release of the tiny IR (y = relu(x * scale + 1)) with a self-test of ones."""
    ir = build_tiny_ir(tmp_path / f"ir-{version}", scale=scale)
    expected = np.maximum(ONES * (expected_scale or scale) + 1, 0).astype(np.float32)
    files = [peer.add_file(path) for path in ir_files(ir)]
    files += [peer.add("selftest-input.npy", npy_bytes(ONES)),
              peer.add("selftest-expected.npz", npz_bytes(y=expected))]
    selftest = {"input": "selftest-input.npy", "expected": "selftest-expected.npz",
                "atol": 1e-4, "rtol": 1e-4}
    return release_for("tiny", version, files, selftest=selftest, **options)


def test_a_signed_release_is_pulled_tested_and_activated_while_clients_predict(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    with daemon.predicting("tiny", {"x": ONES}, clients=2) as load:
        envelope = sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
        kept = events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=60).json()
    assert kept["version"] == "2" and load.failures == []
    assert load.answers[0] == 3.0 and load.answers[-1] == 4.0  # relu(1 * 2 + 1), then relu(1 * 3 + 1)
    kinds = [m.json()["kind"] for m in events.messages() if m.json()["kind"].startswith("update_")]
    assert kinds == ["update_started", "update_downloaded", "update_staged", "update_tested",
                     "update_activated", "update_kept"]
    assert tiny_store.active("tiny") == "2" and tiny_store.history("tiny") == ["1"]
    # The same release again (a QoS 1 repeat, a reconnect) changes nothing.
    sign_and_retain(broker, envelope["release"], key)
    with daemon.client() as client:
        tiny = client.status()["models"]["tiny"]
    assert tiny["version"] == "2"
    # The self-tests of probation ran through the served path, counted apart from the clients'.
    assert tiny["requests"] == len(load.answers) and tiny["internal"]["requests"] >= 1
    state = mqtt_subscriber(broker, f"edged/devices/{DEVICE}/state").wait_for(timeout=10).json()
    assert state["models"]["tiny"]["desired"] == "2" and state["models"]["tiny"]["active"] == "2"


def _refusal_cases(peer: ChunkPeer, tmp_path: Path, key, other_key) -> dict[str, tuple[dict, object, str]]:
    good = tiny_release(peer, tmp_path, "2", 3.0)
    traversal = release_for("tiny", "3", [peer.add("../evil.xml", b"<xml/>"), peer.add("evil.bin", b"x")])
    wrong_hash = tiny_release(peer, tmp_path, "4", 3.0)
    xml = wrong_hash["manifest"]["files"][0]
    peer.files[xml["sha256"]] = b"<!-- not the file the manifest hashed -->".ljust(xml["size"], b" ")
    oversize = tiny_release(peer, tmp_path, "5", 3.0)
    oversize["manifest"]["files"][1]["size"] = 2 << 20
    expired = tiny_release(peer, tmp_path, "6", 3.0)
    signed_at = expired["published_at"] - 100
    expired["published_at"], expired["expires_at"] = signed_at, signed_at + 50
    return {
        "another key": (good, other_key, "unknown key id"),
        "tampered": (good, "tamper", "bad signature"),
        "path traversal": (traversal, key, "invalid release: manifest.files.0.name"),
        "wrong sha256": (wrong_hash, key, "hash to"),
        "over the size limit": (oversize, key, "byte limit"),
        "older version": (tiny_release(peer, tmp_path, "0", 3.0), key, "older than the active 1"),
        "expired": (expired, key, "expired"),
        "failing self-test": (tiny_release(peer, tmp_path, "8", 3.0, expected_scale=5.0), key,
                              "self-test: output 'y' differs"),
    }


@pytest.mark.parametrize("case", ["another key", "tampered", "path traversal", "wrong sha256",
                                  "over the size limit", "older version", "expired", "failing self-test"])
def test_a_bad_release_is_refused_with_the_reason_and_the_old_model_serves(
        case, start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    release, signer, reason = _refusal_cases(peer, tmp_path, key, generate_key())[case]
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key, max_model_bytes=1 << 20))
    if signer == "tamper":  # signed as version 2, then changed to say version 7
        envelope = sign_release(release, key)
        envelope["release"]["manifest"]["version"] = "7"
        retain_envelope(broker, envelope)
    else:
        sign_and_retain(broker, release, signer)
    refusal = events.wait_for(lambda m: m.json()["kind"] in ("update_refused", "update_failed")
                              and reason in m.json()["reason"], timeout=60).json()
    assert refusal["model"] == "tiny"
    with daemon.client() as client:
        assert client.infer("tiny", {"x": ONES})["y"][0, 0] == 3.0  # version 1 still serves
        assert client.status()["models"]["tiny"]["version"] == "1"
    assert tiny_store.active("tiny") == "1"
    assert tiny_store.versions("tiny") == ["1"]  # nothing half-installed stays


def test_a_truncated_chunk_fails_the_update_and_nothing_changes(
        start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path, key):
    truncating = ChunkPeer(broker, truncate=True)
    try:
        events = mqtt_subscriber(broker, EVENTS)
        daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
        sign_and_retain(broker, tiny_release(truncating, tmp_path, "2", 3.0), key)
        failed = events.wait_for(lambda m: m.json()["kind"] == "update_failed", timeout=60).json()
        assert "truncated chunk" in failed["reason"] and failed["attempt"] == 1
        with daemon.client() as client:
            status = client.status()
        assert status["models"]["tiny"]["version"] == "1"
        # Waiting for its backoff: the late replies of that download do not retry it at once.
        assert status["updates"]["retrying"]["tiny"]["attempts"] == 1
        assert [m.json()["kind"] for m in events.messages()].count("update_failed") == 1
    finally:
        truncating.close()


def test_a_finished_download_found_damaged_at_start_is_fetched_again(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    """Finished downloads are not synced (the store syncs its copy): one a power cut left as
    zeros is hashed before use and fetched again, never staged."""
    release = tiny_release(peer, tmp_path, "2", 3.0)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for entry in release["manifest"]["files"]:
        (downloads / f"{entry['sha256']}.file").write_bytes(bytes(entry["size"]))
    events = mqtt_subscriber(broker, EVENTS)
    start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    requests_before = peer.requests
    sign_and_retain(broker, release, key)
    kept = events.wait_for(lambda m: m.json()["kind"] in ("update_kept", "update_failed"), timeout=60).json()
    assert kept["kind"] == "update_kept", kept
    assert peer.requests > requests_before  # fetched, not taken from the damaged files
    tiny_store.verify("tiny", "2")


def test_a_version_that_goes_bad_in_probation_is_rolled_back(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key, probation_s=30))
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
    events.wait_for(lambda m: m.json()["kind"] == "update_activated", timeout=60)
    bin_file = tiny_store.version_dir("tiny", "2") / "tiny.bin"
    bin_file.write_bytes(b"\0" * bin_file.stat().st_size)  # the disk goes bad under the new version
    rolled = events.wait_for(lambda m: m.json()["kind"] == "update_rolled_back", timeout=30).json()
    assert rolled["version"] == "2" and rolled["to"] == "1" and "tiny.bin" in rolled["reason"]
    with daemon.client() as client:
        assert client.status()["models"]["tiny"]["version"] == "1"


def test_a_file_changed_in_probation_with_its_size_and_mtime_put_back_is_still_rolled_back(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    """Probation checks files by stat each second (the full hash is at its end, an hour away
    here): a change that keeps size, inode and mtime still moves ctime, and is caught."""
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key, probation_s=3600))
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
    events.wait_for(lambda m: m.json()["kind"] == "update_activated", timeout=60)
    bin_file = tiny_store.version_dir("tiny", "2") / "tiny.bin"
    before = bin_file.stat()
    with bin_file.open("r+b") as f:  # one bit of the weights flipped, in place
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0x01]))
    os.utime(bin_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (bin_file.stat().st_size, bin_file.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    rolled = events.wait_for(lambda m: m.json()["kind"] == "update_rolled_back", timeout=60).json()
    assert rolled["to"] == "1" and "tiny.bin does not match its sha256" in rolled["reason"]
    with daemon.client() as client:
        assert client.status()["models"]["tiny"]["version"] == "1"


def test_a_group_rollout_reaches_only_that_group(start_daemon, broker, peer, mqtt_subscriber, tmp_path,
                                                 tiny_ir, key):
    daemons = {}
    for device, group in (("pilot-1", "pilot"), ("plain-1", None)):
        store = ModelStore(tmp_path / device / "store")
        store.add("tiny", ir_files(tiny_ir), "1")
        store.activate("tiny", "1")
        config = device_config(broker, tmp_path / device, key, **({"group": group} if group else {}))
        config["mqtt"]["device_id"] = device
        daemons[device] = (start_daemon(store.root, config), store)
    events = mqtt_subscriber(broker, "edged/devices/+/events")
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0, group="pilot"), key)
    events.wait_for(lambda m: m.topic.startswith("edged/devices/pilot-1/")
                    and m.json()["kind"] == "update_kept", timeout=60)
    # The plain device follows the all-devices topic only: a ping through it proves it is
    # connected and subscribed, and it never started an update.
    operator = mqtt_subscriber(broker, None)
    assert operator.request("edged/devices/plain-1/cmd", {"command": "ping"})["ok"]
    assert not [m for m in events.messages() if m.topic.startswith("edged/devices/plain-1/")
                and m.json()["kind"].startswith("update_")]
    assert daemons["plain-1"][1].active("tiny") == "1" and daemons["pilot-1"][1].active("tiny") == "2"


def test_a_newer_release_replaces_one_waiting_for_a_retry_and_its_downloads_go(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key, retry_min_s=3600))
    unserved = tiny_release(peer, tmp_path, "2", 3.0)
    for entry in unserved["manifest"]["files"]:  # the registry lost its files: empty chunks
        del peer.files[entry["sha256"]]
    sign_and_retain(broker, unserved, key)
    failed = events.wait_for(lambda m: m.json()["kind"] == "update_failed", timeout=60).json()
    assert failed["version"] == "2" and failed["attempt"] == 1
    with daemon.client() as client:
        assert client.status()["updates"]["retrying"]["tiny"]["version"] == "2"
    sign_and_retain(broker, tiny_release(peer, tmp_path, "3", 4.0), key)
    kept = events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=60).json()
    assert kept["version"] == "3" and tiny_store.active("tiny") == "3"
    with daemon.client() as client:
        assert client.status()["updates"]["retrying"] == {}
    assert list((tmp_path / "downloads").iterdir()) == []  # version 2's partial download too
