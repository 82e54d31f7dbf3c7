"""Site brokers (issue 13): a device on a site broker, the registry on a central broker,
the documented bridge and ACLs between them (docs/fleet.md, "Site brokers"). Everything the
update protocol and the device's reporting use crosses the bridge: retained releases and the
registry's status in, chunk requests out and chunk replies in (MQTT 5 response topic,
correlation data and user properties intact), health, retained status and state, and
events out, commands in and their replies out; and a rollout's per-device release in, read
only by its own device."""

from __future__ import annotations

import numpy as np

from edged.models.store import ModelStore
from edged.registry.config import load_registry_settings
from edged.registry.publisher import Publisher
from edged.registry.store import RegistryStore, Target
from tests.broker import Subscriber
from tests.conftest import ir_files
from tests.mqtt.test_updates_e2e import build_matmul_ir
from tests.registry.conftest import retained_on, user_properties
from tests.registry.site_brokers import BRIDGE_TOPIC, start_site_brokers

DEVICE = "cam-1"
OTHER = "cam-2"  # another device of the site: an account of its own, no daemon
TOPICS = f"edged/devices/{DEVICE}"
WIDTH = 256  # a 256 x 256 float32 matrix: 256 KiB, 16 chunks of 16 KiB
CHUNK = 16 << 10


def retained_now(mqtt_subscriber, broker, topic: str):
    """What `broker` retains on `topic` (a topic known to hold a message): the first message a
    fresh subscriber gets, right after its SUBACK. Unlike retained_on, it publishes no marker,
    and a state the device publishes meanwhile arrives after it, live: it cannot take its place."""
    message = mqtt_subscriber(broker, topic).wait_for(timeout=10)
    assert message.retain and message.payload, message
    return message


def test_a_device_behind_a_site_broker_updates_reports_and_answers_commands(
        start_broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    brokers = start_site_brokers(start_broker, [DEVICE, OTHER])
    central, site = brokers.central, brokers.site
    # The test user (readwrite #) watches both levels; the others use the documented accounts.
    at_central = mqtt_subscriber(central, "edged/#")
    at_central.wait_for(lambda m: m.payload == b"1", 30, topic=BRIDGE_TOPIC)  # the bridge is up
    at_site = mqtt_subscriber(site, [f"{TOPICS}/fetch", "edged/registry/#"])

    registry = make_registry(central, {"mqtt": {
        "username": "edged-registry",
        "password_file": str(brokers.password_file(central, "edged-registry", tmp_path))}})
    registry.serve(at_central)
    at_site.wait_for(lambda m: m.json()["state"] == "online", 30, topic="edged/registry/status")

    store = ModelStore(tmp_path / "store")
    store.add("wide", ir_files(build_matmul_ir(tmp_path / "v1", seed=1, width=WIDTH)), "1")
    store.activate("wide", "1")
    downloads = tmp_path / "downloads"
    daemon = start_daemon(store.root, {
        "mqtt": {"enabled": True, "host": site.host, "port": site.port, "device_id": DEVICE,
                 "username": DEVICE, "password_file": str(brokers.password_file(site, DEVICE, tmp_path)),
                 "outbox_path": str(tmp_path / "outbox.db"), "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0, "health_interval_s": 1,
                 "command_senders": ["fleet-ops"]},  # the user property `sender` must cross too
        "updates": {"enabled": True, "public_keys": [registry.public_key_text], "probation_s": 0.5,
                    "download_dir": str(downloads), "chunk_bytes": CHUNK, "window": 4,
                    "chunk_timeout_s": 5.0}})
    at_central.wait_for(lambda m: m.json()["state"] == "online", 60, topic=f"{TOPICS}/status")

    # A signed release published centrally, pulled through the bridge.
    xml = build_matmul_ir(tmp_path / "v2", seed=2, width=WIDTH)
    np.save(tmp_path / "input.npy", np.ones((1, WIDTH), np.float32))
    files = ir_files(xml)
    registry.run("publish", "wide", *files, "--version", "2", "--selftest", tmp_path / "input.npy")
    try:
        kept = at_central.wait_for(lambda m: m.json().get("kind") == "update_kept", 180,
                                   topic=f"{TOPICS}/events").json()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ndaemon:\n{daemon.output()[-4000:]}\n"
                             f"serve:\n{registry.serve_log()[-3000:]}\n"
                             f"site broker:\n{site.log(tail=30)}") from None
    assert kept["model"] == "wide" and kept["version"] == "2", kept
    assert store.active("wide") == "2"
    store.verify("wide", "2")

    # The release reached the site broker retained, as the registry signed it.
    release = retained_on(mqtt_subscriber, site, "edged/registry/models/wide")
    assert release is not None and registry.verify(release.payload).manifest.version == "2"

    # Chunks: every request crossed out with its response topic and correlation data, and
    # every reply crossed in with the same correlation data and its user properties.
    requests = at_central.messages("edged/registry/fetch")
    replies = at_site.messages(f"{TOPICS}/fetch")
    size = sum(f.stat().st_size for f in files)
    assert len(requests) >= -(-size // CHUNK), (len(requests), size)
    assert all(r.response_topic == f"{TOPICS}/fetch" and r.correlation_data for r in requests)
    ok = [r for r in replies if user_properties(r).get("status") == "ok"]
    asked = {r.correlation_data for r in requests}
    assert ok and {r.correlation_data for r in ok} <= asked
    assert sum(len(r.payload) for r in ok) >= size
    assert all(user_properties(r)["sha256"] and "offset" in user_properties(r) for r in ok)

    # Health, the retained status and state, and events reach the central broker.
    health = at_central.wait_for(lambda m: m.json()["models"].get("wide", {}).get("version") == "2", 60,
                                 topic=f"{TOPICS}/health").json()
    assert health["device"] == DEVICE
    at_central.wait_for(lambda m: m.json()["models"]["wide"]["active"] == "2", 60, topic=f"{TOPICS}/state")
    state = retained_now(mqtt_subscriber, central, f"{TOPICS}/state")
    assert state.json()["models"]["wide"]["active"] == "2", state
    status = retained_on(mqtt_subscriber, central, f"{TOPICS}/status")
    assert status is not None and status.json()["state"] == "online", status
    kinds = [m.json()["kind"] for m in at_central.messages(f"{TOPICS}/events")]
    assert "update_activated" in kinds and "model_loaded" in kinds, kinds

    # A command sent centrally (by the documented operator account) reaches the device with
    # its user property `sender`, and its reply comes back to the response topic with the
    # correlation data.
    operator = mqtt_subscriber(central, None, username="fleet-ops")
    listed = operator.request(f"{TOPICS}/cmd", {"command": "models.list"}, 30,
                              response_topic="edged/replies/fleet-ops",
                              user_properties=[("sender", "fleet-ops")])
    assert listed["ok"] and listed["result"]["wide"]["active"] == "2", listed

    # The site's ACL: the device may not withdraw a release nor read another's commands
    # (Mosquitto 2.0 grants the subscription and delivers nothing the ACL refuses: a command
    # to cam-2, then one to cam-1, sent by one client through one bridge, arrive in order).
    device = Subscriber(site, "edged/devices/+/cmd", username=DEVICE, client_id=f"{DEVICE}-probe")
    try:
        refused = device.publish("edged/registry/models/wide", b"", retain=True)
        assert refused is not None and refused.is_failure, refused
        operator.publish("edged/devices/cam-2/cmd", {"command": "ping"})
        operator.publish(f"{TOPICS}/cmd", {"command": "ping"})
        device.wait_for(timeout=30, topic=f"{TOPICS}/cmd")
        assert [m.topic for m in device.messages()] == [f"{TOPICS}/cmd"]
    finally:
        device.close()
    release = retained_on(mqtt_subscriber, site, "edged/registry/models/wide")
    assert release is not None and registry.verify(release.payload).manifest.version == "2"

    # A device release, as a rollout's wave gets (docs/rollouts.md): version 3 stored and
    # signed but retained for no one (`--hold`), then signed anew with the registry's key for
    # cam-1 and recorded in the store, which `serve` announces on the device's own topic. It
    # crosses the bridge, stays retained at the site, and the device installs it and is pinned
    # to it. The site's ACL: cam-2, subscribed to cam-1's device topic and to its own, receives
    # only its own (announced once cam-1's reached the site, so cam-1's would have reached cam-2
    # first). The central ACL: the registry's account reads the device's events.
    own_topic = f"edged/registry/devices/{DEVICE}/models/wide"
    other_topic = f"edged/registry/devices/{OTHER}/models/wide"
    v3 = ir_files(build_matmul_ir(tmp_path / "v3", seed=3, width=WIDTH))
    registry.run("publish", "wide", *v3, "--version", "3", "--selftest", tmp_path / "input.npy", "--hold")
    publisher = Publisher(load_registry_settings(registry.config), RegistryStore(registry.root))
    mine = Subscriber(site, f"edged/registry/devices/{DEVICE}/models/#", username=DEVICE,
                      client_id=f"{DEVICE}-releases")
    theirs = Subscriber(site, [f"edged/registry/devices/{DEVICE}/models/#",
                               f"edged/registry/devices/{OTHER}/models/#"], username=OTHER, client_id=OTHER)
    events = Subscriber(central, "edged/devices/+/events", username="edged-registry",
                        client_id="edged-registry-events")
    try:
        for device, watcher in ((DEVICE, mine), (OTHER, theirs)):
            target = Target("wide", device=device)
            with publisher.store.lock():
                publisher.store.set_retained(target, publisher.envelope_for(target, "3"))
            watcher.wait_for(timeout=30, topic=publisher.topic(target))
        assert {m.topic for m in mine.messages()} == {own_topic}
        assert {m.topic for m in theirs.messages()} == {other_topic}
        try:
            kept = events.wait_for(lambda m: m.json().get("kind") == "update_kept"
                                   and m.json().get("version") == "3", 180, topic=f"{TOPICS}/events").json()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndaemon:\n{daemon.output()[-4000:]}\n"
                                 f"serve:\n{registry.serve_log()[-3000:]}") from None
        assert kept["model"] == "wide", kept
    finally:
        for client in (mine, theirs, events):
            client.close()
    assert store.active("wide") == "3"
    for broker in (central, site):  # (no marker published there: the device would get it)
        signed = registry.verify(retained_now(mqtt_subscriber, broker, own_topic).payload)
        assert (signed.device, signed.manifest.version) == (DEVICE, "3"), signed
    at_central.wait_for(lambda m: m.json()["models"]["wide"]["active"] == "3", 60, topic=f"{TOPICS}/state")
    state = retained_now(mqtt_subscriber, central, f"{TOPICS}/state")
    assert (state.json()["models"]["wide"]["active"], state.json()["models"]["wide"]["desired"]) == ("3", "3")
    at_central.wait_for(lambda m: m.json()["updates"]["pinned"] == {"wide": own_topic}, 30,
                        topic=f"{TOPICS}/health")

    # The site's uplink is lost: the bridge's Last Will says so at the central broker, where
    # the device's retained status still reads what it last said (docs/fleet.md).
    site.kill()
    at_central.wait_for(lambda m: m.payload == b"0", 60, topic=BRIDGE_TOPIC)
    status = retained_on(mqtt_subscriber, central, f"{TOPICS}/status")
    assert status is not None and status.json()["state"] == "online", status
