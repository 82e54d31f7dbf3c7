"""Releases for one device (issue 13): the per-device topic a staged rollout drives, the
pin it puts on the model, rollback releases and the failure the retained state keeps.
A real daemon subprocess, a real Mosquitto, real models, real signatures."""

from __future__ import annotations

import json
import time

import pytest

from edged.signing import generate_key, sign_release
from tests.broker import Broker, new_client
from tests.mqtt.registry_peer import ChunkPeer, sign_and_retain
from tests.mqtt.test_updates import DEVICE, EVENTS, ONES, device_config, tiny_release

STATE = f"edged/devices/{DEVICE}/state"
OWN_TOPIC = f"edged/registry/devices/{DEVICE}/models/tiny"


@pytest.fixture(scope="module")
def key():
    return generate_key()


@pytest.fixture
def peer(broker):
    chunk_peer = ChunkPeer(broker)
    yield chunk_peer
    chunk_peer.close()


def retain(broker: Broker, topic: str, payload: bytes) -> None:
    """Retain `payload` on `topic` (empty: withdraw what is retained there)."""
    publisher = new_client(broker, f"publisher-{time.monotonic_ns()}")
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    publisher.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    publisher.disconnect()
    publisher.loop_stop()


def retain_signed(broker: Broker, topic: str, release: dict, key) -> None:
    retain(broker, topic, json.dumps(sign_release(release, key)).encode())


def for_device(release: dict, device: str = DEVICE, **changes: object) -> dict:
    return {**release, "device": device, **changes}


def kind_of(wanted: str, version: str | None = None):
    return lambda m: m.json()["kind"] == wanted and (version is None or m.json().get("version") == version)


def test_a_device_release_installs_and_one_signed_for_another_device_is_refused(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    states = mqtt_subscriber(broker, STATE)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    release = tiny_release(peer, tmp_path, "2", 3.0)
    # Signed for cam-2, replayed on cam-1's topic: refused, and the state keeps why.
    retain_signed(broker, OWN_TOPIC, for_device(release, "cam-2"), key)
    refused = events.wait_for(kind_of("update_refused"), timeout=30).json()
    assert refused["version"] == "2"
    assert "signed for device 'cam-2', received for 'cam-1'" in refused["reason"]
    failure = states.wait_for(lambda m: m.json()["models"]["tiny"]["failure"], timeout=10).json()
    assert failure["models"]["tiny"]["failure"]["kind"] == "update_refused"
    assert failure["models"]["tiny"]["failure"]["version"] == "2"
    assert "signed for device 'cam-2'" in failure["models"]["tiny"]["failure"]["reason"]
    assert isinstance(failure["models"]["tiny"]["failure"]["at"], float)
    assert failure["group"] is None
    # Signed for cam-1 but sent to every device: refused too.
    sign_and_retain(broker, for_device(release), key)
    refused = events.wait_for(lambda m: kind_of("update_refused")(m)
                              and "received for None" in m.json()["reason"], timeout=30).json()
    assert "signed for device 'cam-1'" in refused["reason"]
    retain(broker, "edged/registry/models/tiny", b"")
    # Signed for cam-1 on its own topic: installed as any release.
    retain_signed(broker, OWN_TOPIC, for_device(release), key)
    kept = events.wait_for(kind_of("update_kept"), timeout=60).json()
    assert kept["version"] == "2" and tiny_store.active("tiny") == "2"
    with daemon.client() as client:
        assert client.infer("tiny", {"x": ONES})["y"][0, 0] == 4.0
    state = states.wait_for(lambda m: m.json()["models"]["tiny"]["active"] == "2", timeout=10).json()
    assert state["models"]["tiny"]["desired"] == "2" and state["models"]["tiny"]["failure"] is None


def test_a_device_release_pins_the_model_until_it_is_withdrawn(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    retain_signed(broker, OWN_TOPIC, for_device(tiny_release(peer, tmp_path, "2", 3.0)), key)
    events.wait_for(kind_of("update_kept", "2"), timeout=60)
    # A newer release for every device, then a message on the device's topic that the agent
    # handles after it (one queue, in order): by its refusal, version 3 was seen and left.
    sign_and_retain(broker, tiny_release(peer, tmp_path, "3", 4.0), key)
    retain_signed(broker, f"edged/registry/devices/{DEVICE}/models/other",
                  for_device(tiny_release(peer, tmp_path, "9", 3.0), "cam-2"), key)
    events.wait_for(lambda m: kind_of("update_refused")(m) and "'other'" in m.json()["reason"], timeout=30)
    assert not [m for m in events.messages() if m.json().get("version") == "3"]
    with daemon.client() as client:
        status = client.status()
    assert status["models"]["tiny"]["version"] == "2"
    assert status["updates"]["pinned"] == {"tiny": OWN_TOPIC}
    assert f"edged/registry/devices/{DEVICE}/models/+" in status["updates"]["following"]
    # Withdrawn: the device follows every device's release again, which it remembered.
    retain(broker, OWN_TOPIC, b"")
    kept = events.wait_for(kind_of("update_kept", "3"), timeout=60).json()
    assert kept["version"] == "3" and tiny_store.active("tiny") == "3"
    state = mqtt_subscriber(broker, STATE).wait_for(lambda m: m.json()["models"]["tiny"]["active"] == "3",
                                                    timeout=10).json()
    assert state["models"]["tiny"]["desired"] == "3"
    with daemon.client() as client:
        assert client.status()["updates"]["pinned"] == {}


def test_a_rollback_release_activates_the_stored_version_without_a_download(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    states = mqtt_subscriber(broker, STATE)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    stored = tiny_store.manifest("tiny", "1").model_dump(mode="json")
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
    events.wait_for(kind_of("update_kept", "2"), timeout=60)
    with daemon.client() as client:
        received = client.status()["updates"]["bytes_received"]
    back = {**tiny_release(peer, tmp_path, "1", 2.0), "manifest": stored, "selftest": None}
    # Older, without the signed flag: refused, and the state says so.
    retain_signed(broker, OWN_TOPIC, for_device(back), key)
    refused = events.wait_for(kind_of("update_refused", "1"), timeout=30).json()
    assert "older than the active 2" in refused["reason"]
    state = states.wait_for(lambda m: (m.json()["models"]["tiny"]["failure"] or {}).get("version") == "1",
                            timeout=10).json()
    assert state["models"]["tiny"]["failure"]["kind"] == "update_refused"
    assert state["models"]["tiny"]["active"] == "2"
    # With it: served again from the store.
    retain_signed(broker, OWN_TOPIC, for_device(back, rollback=True, rollback_from="2"), key)
    kept = events.wait_for(kind_of("update_kept", "1"), timeout=30).json()
    assert kept["rollback"] is True
    steps = [m.json() for m in events.messages() if m.json().get("version") == "1"
             and m.json()["kind"].startswith("update_") and m.json().get("rollback")]
    assert [s["kind"] for s in steps] == ["update_started", "update_activated", "update_kept"]
    assert steps[0]["previous"] == "2" and steps[0]["bytes"] == 0 and steps[1]["previous"] == "2"
    assert tiny_store.active("tiny") == "1" and tiny_store.history("tiny")[0] == "2"
    with daemon.client() as client:
        status = client.status()
        assert client.infer("tiny", {"x": ONES})["y"][0, 0] == 3.0
    assert status["updates"]["bytes_received"] == received  # nothing downloaded
    assert status["models"]["tiny"]["version"] == "1"
    state = states.wait_for(lambda m: m.json()["models"]["tiny"]["active"] == "1"
                            and m.json()["models"]["tiny"]["desired"] == "1", timeout=10).json()
    assert state["models"]["tiny"]["failure"] is None  # the refusal is forgotten: version 1 serves


def test_a_rollback_release_of_a_version_no_longer_stored_is_downloaded(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    sign_and_retain(broker, tiny_release(peer, tmp_path, "3", 4.0), key)
    events.wait_for(kind_of("update_kept", "3"), timeout=60)
    retain_signed(broker, OWN_TOPIC, for_device(tiny_release(peer, tmp_path, "2", 3.0), rollback=True,
                                                rollback_from="3"), key)
    kept = events.wait_for(kind_of("update_kept", "2"), timeout=60).json()
    assert "rollback" not in kept
    kinds = [m.json()["kind"] for m in events.messages()
             if m.json().get("version") == "2" and m.json()["kind"].startswith("update_")]
    assert kinds == ["update_started", "update_downloaded", "update_staged", "update_tested",
                     "update_activated", "update_kept"]
    assert tiny_store.active("tiny") == "2"


def test_the_state_document_names_the_group(start_daemon, broker, mqtt_subscriber, tiny_store, tmp_path, key):
    states = mqtt_subscriber(broker, STATE)
    start_daemon(tiny_store.root, device_config(broker, tmp_path, key, group="pilot"))
    assert states.wait_for(timeout=30).json()["group"] == "pilot"


def test_the_state_document_keeps_a_failed_update_until_the_active_version_changes(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    states = mqtt_subscriber(broker, STATE)
    start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0, expected_scale=5.0), key)
    failed = events.wait_for(kind_of("update_failed", "2"), timeout=60).json()
    state = states.wait_for(lambda m: m.json()["models"]["tiny"]["failure"], timeout=10).json()
    assert state["models"]["tiny"]["failure"] == {"version": "2", "kind": "update_failed",
                                                  "reason": failed["reason"],
                                                  "at": state["models"]["tiny"]["failure"]["at"]}
    assert state["group"] is None and state["models"]["tiny"]["active"] == "1"
    sign_and_retain(broker, tiny_release(peer, tmp_path, "3", 4.0), key)
    events.wait_for(kind_of("update_kept", "3"), timeout=60)
    state = states.wait_for(lambda m: m.json()["models"]["tiny"]["active"] == "3", timeout=10).json()
    assert state["models"]["tiny"]["failure"] is None


def test_pins_remember_the_latest_release_per_topic_and_hand_back_the_newest(tmp_path, key):
    from edged.mqtt.checks import trusted_release
    from edged.mqtt.pins import Pins, newest
    from edged.signing import key_id
    from edged.topics import Topics
    from tests.mqtt.registry_peer import release_for

    def signed(version: str, **options: object) -> bytes:
        files = [{"name": "tiny.xml", "sha256": "ab" * 32, "size": 1},
                 {"name": "tiny.bin", "sha256": "cd" * 32, "size": 1}]
        return json.dumps(sign_release(release_for("tiny", version, files, **options), key)).encode()

    def verify(topic: str, payload: bytes):
        trusted = {key_id(key): key.public_key()}
        return trusted_release(payload, trusted, 1 << 20, *Topics.release_parts(topic))

    pins = Pins(confirm_s=3600)
    group, every = "edged/registry/groups/pilot/models/tiny", "edged/registry/models/tiny"
    pins.remember("tiny", group, signed("5", group="pilot"))
    pins.remember("tiny", every, signed("3"))
    pins.remember("tiny", every, signed("4"))
    pins.remember("other", every.replace("tiny", "other"), b"o1")
    assert pins.unpin("tiny") == []  # not pinned: nothing to follow again
    assert pins.pin("tiny", OWN_TOPIC, b"d1", time.time() + 3600)
    assert not pins.pin("tiny", OWN_TOPIC, b"d2", time.time() + 3600)
    assert pins.pinned("tiny") and pins.get("tiny").payload == b"d2" and not pins.pinned("other")
    assert pins.describe() == {"tiny": OWN_TOPIC}
    # The group's version 5 is the newest: the only one to follow (4 would only be refused after it).
    topic, _, release = newest(pins.unpin("tiny"), verify)
    assert (topic, release.manifest.version) == (group, "5")
    assert not pins.pinned("tiny") and pins.describe() == {}
    pins.pin("tiny", OWN_TOPIC, b"d3", time.time() + 3600)
    pins.remember("tiny", group, b"")  # withdrawn meanwhile: not followed again
    pins.remember("tiny", every, signed("6"))
    assert newest(pins.unpin("tiny"), verify)[2].manifest.version == "6"
    # A reconnect makes a pin unconfirmed; its release retained again confirms it.
    pins.pin("tiny", OWN_TOPIC, b"d4", time.time() + 3600)
    assert pins.reconnected() == 1 and pins.wait_s() is not None
    pins.confirm("tiny", b"other bytes")
    assert pins.get("tiny").confirm_by is not None
    pins.confirm("tiny", b"d4")
    assert pins.get("tiny").confirm_by is None and pins.ended() == []
    unconfirmed = Pins(confirm_s=0)  # the window is over as soon as it starts
    unconfirmed.pin("tiny", OWN_TOPIC, b"d5", time.time() + 3600)
    unconfirmed.reconnected()
    assert [name for name, _ in unconfirmed.ended()] == ["tiny"]
    expired = Pins(confirm_s=3600)
    expired.pin("tiny", OWN_TOPIC, b"d6", time.time() - 1)
    assert "expired at" in expired.ended()[0][1]


def test_a_pin_holds_across_a_restart(start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    """The device topic is subscribed first, so its retained release (the broker sends them
    in the order of the subscriptions) pins the model before every device's newer one arrives."""
    events = mqtt_subscriber(broker, EVENTS)
    config = device_config(broker, tmp_path, key)
    daemon = start_daemon(tiny_store.root, config)
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
    events.wait_for(kind_of("update_kept", "2"), timeout=60)
    stored = tiny_store.manifest("tiny", "1").model_dump(mode="json")
    back = {**tiny_release(peer, tmp_path, "1", 2.0), "manifest": stored, "selftest": None}
    retain_signed(broker, OWN_TOPIC, for_device(back, rollback=True, rollback_from="2"), key)
    events.wait_for(kind_of("update_kept", "1"), timeout=30)
    daemon.stop()
    restarted = start_daemon(tiny_store.root, config)
    restarted.wait_for(lambda: "edged/registry/models/tiny not installed: pinned by its device release"
                       in restarted.output(), what="the release for every device left alone")
    assert [m.json()["kind"] for m in events.messages() if m.json().get("version") == "2"
            and m.json()["kind"] == "update_started"] == ["update_started"]  # only before the pin
    with restarted.client() as client:
        assert client.status()["models"]["tiny"]["version"] == "1"
    assert tiny_store.active("tiny") == "1"


# --- the reviewer's findings: retries, missed withdrawals, replays, probation, unpin noise ----

def stored_release(peer, tmp_path, tiny_store, version: str = "1") -> dict:
    """A release of the store's own copy of `version` (no self-test: its files are the store's)."""
    stored = tiny_store.manifest("tiny", version).model_dump(mode="json")
    return {**tiny_release(peer, tmp_path, version, 2.0), "manifest": stored, "selftest": None}


def handled_so_far(broker, events, peer, tmp_path, key, mark: str) -> None:
    """Wait until the agent handled everything sent before: one queue, in order, so the
    refusal of a release on another model's device topic comes after it."""
    retain_signed(broker, f"edged/registry/devices/{DEVICE}/models/{mark}",
                  for_device(tiny_release(peer, tmp_path, "9", 3.0), "cam-2"), key)
    events.wait_for(lambda m: kind_of("update_refused")(m) and f"'{mark}'" in m.json()["reason"], timeout=30)


def test_the_rollback_of_an_aborted_rollout_replaces_its_waiting_retry(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    """Version 2 fails to download and waits for a retry; the abort's rollback release of the
    active version 1 arrives on the same topic: nothing to install, and the retry of 2 is gone
    (it must never come due and install the aborted version)."""
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key, retry_min_s=3600))
    aborted = tiny_release(peer, tmp_path, "2", 3.0)
    for entry in aborted["manifest"]["files"]:  # the registry cannot serve it: empty chunks
        del peer.files[entry["sha256"]]
    retain_signed(broker, OWN_TOPIC, for_device(aborted), key)
    events.wait_for(kind_of("update_failed", "2"), timeout=60)
    with daemon.client() as client:
        assert client.status()["updates"]["retrying"]["tiny"]["version"] == "2"
    back = stored_release(peer, tmp_path, tiny_store)
    retain_signed(broker, OWN_TOPIC, for_device(back, rollback=True, rollback_from="2"), key)
    handled_so_far(broker, events, peer, tmp_path, key, "mark")
    with daemon.client() as client:
        status = client.status()
    assert status["updates"]["retrying"] == {} and status["updates"]["pinned"] == {"tiny": OWN_TOPIC}
    assert status["models"]["tiny"]["version"] == "1"


def test_a_refused_device_release_does_not_pin_and_a_rollback_binds_to_the_version_it_leaves(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    # Older without rollback: refused, and it does not pin: every device's version 2 installs.
    retain_signed(broker, OWN_TOPIC, for_device(tiny_release(peer, tmp_path, "0", 3.0)), key)
    events.wait_for(kind_of("update_refused", "0"), timeout=30)
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
    events.wait_for(kind_of("update_kept", "2"), timeout=60)
    # A rollback release that leaves version 3 (a captured one, replayed): 2 is active, refused.
    back = stored_release(peer, tmp_path, tiny_store)
    retain_signed(broker, OWN_TOPIC, for_device(back, rollback=True, rollback_from="3"), key)
    refused = events.wait_for(kind_of("update_refused", "1"), timeout=30).json()
    assert refused["reason"] == "rollback from 3, but 2 is active"
    with daemon.client() as client:
        status = client.status()
    assert status["models"]["tiny"]["version"] == "2" and status["updates"]["pinned"] == {}
    # The one that leaves version 2: served again from the store.
    retain_signed(broker, OWN_TOPIC, for_device(back, rollback=True, rollback_from="2"), key)
    assert events.wait_for(kind_of("update_kept", "1"), timeout=30).json()["rollback"] is True
    assert tiny_store.active("tiny") == "1"


def test_a_pin_whose_release_is_not_retained_after_a_reconnect_ends(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    """A withdrawal sent while the device was offline never reaches it: a broker restarted
    without persistence has lost every retained release, so after the reconnect the device
    release does not come back and the pin ends (the remembered version 3 installs)."""
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key, pin_confirm_s=1.0))
    retain_signed(broker, OWN_TOPIC, for_device(tiny_release(peer, tmp_path, "2", 3.0)), key)
    events.wait_for(kind_of("update_kept", "2"), timeout=60)
    sign_and_retain(broker, tiny_release(peer, tmp_path, "3", 4.0), key)
    daemon.wait_for(lambda: "edged/registry/models/tiny not installed: pinned by its device release"
                    in daemon.output(), what="every device's release left alone")
    peer.close()  # its subscription dies with the broker: a new peer serves the same files
    broker.restart()
    fresh = ChunkPeer(broker)
    fresh.files = peer.files
    try:
        kept = events.wait_for(kind_of("update_kept", "3"), timeout=120).json()
    finally:
        fresh.close()
    assert kept["version"] == "3" and tiny_store.active("tiny") == "3"
    assert "tiny no longer pinned: its device release was not retained after the reconnect" in daemon.output()
    with daemon.client() as client:
        assert client.status()["updates"]["pinned"] == {}


def test_a_pin_ends_when_its_device_release_expires(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    daemon = start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    # The active version 1 for this device, valid for a short while: it pins, nothing to install.
    pinning = {**stored_release(peer, tmp_path, tiny_store), "device": DEVICE}
    pinning["expires_at"] = pinning["published_at"] + 20
    retain_signed(broker, OWN_TOPIC, pinning, key)
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
    kept = events.wait_for(kind_of("update_kept", "2"), timeout=120).json()
    assert kept["version"] == "2"
    output = daemon.output()
    assert output.index("tiny pinned by its device release") < output.index("tiny no longer pinned: its "
                                                                              "device release expired at")


def test_a_stop_during_probation_reports_no_update_kept_and_the_next_start_serves_the_version(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    events = mqtt_subscriber(broker, EVENTS)
    config = device_config(broker, tmp_path, key, probation_s=3600)
    daemon = start_daemon(tiny_store.root, config)
    sign_and_retain(broker, tiny_release(peer, tmp_path, "2", 3.0), key)
    events.wait_for(kind_of("update_activated", "2"), timeout=60)
    daemon.stop()
    assert "tiny 2 stays active; its probation was cut short by the shutdown" in daemon.output()
    # The next start sends what the outbox kept first, then its own events, in order.
    restarted = start_daemon(tiny_store.root, config)
    handled_so_far(broker, events, peer, tmp_path, key, "mark")
    assert not [m for m in events.messages() if m.json()["kind"] == "update_kept"]
    assert [m.json()["kind"] for m in events.messages() if m.json().get("version") == "2"
            and m.json()["kind"] == "update_started"] == ["update_started"]  # not installed again
    with restarted.client() as client:
        assert client.status()["models"]["tiny"]["version"] == "2"
    assert tiny_store.active("tiny") == "2"


def test_a_withdrawal_does_not_refuse_every_devices_older_release(
        start_daemon, broker, peer, mqtt_subscriber, tiny_store, tmp_path, key):
    """The device release installed version 2; every device's release says 1: once the pin
    ends, there is nothing to install, and no refusal shows as the model's last failure."""
    events = mqtt_subscriber(broker, EVENTS)
    states = mqtt_subscriber(broker, STATE)
    start_daemon(tiny_store.root, device_config(broker, tmp_path, key))
    sign_and_retain(broker, stored_release(peer, tmp_path, tiny_store), key)
    retain_signed(broker, OWN_TOPIC, for_device(tiny_release(peer, tmp_path, "2", 3.0)), key)
    events.wait_for(kind_of("update_kept", "2"), timeout=60)
    retain(broker, OWN_TOPIC, b"")
    handled_so_far(broker, events, peer, tmp_path, key, "mark")
    assert [m.json()["reason"] for m in events.messages() if kind_of("update_refused")(m)] == [
        "release of 'tiny' on the topic of 'mark'"]
    state = states.wait_for(lambda m: m.json()["models"]["tiny"]["desired"] == "1"
                            and m.json()["models"]["tiny"]["active"] == "2", timeout=10).json()
    assert (state["models"]["tiny"]["failure"] or {}).get("version") != "1"
