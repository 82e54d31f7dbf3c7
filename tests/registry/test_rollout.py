"""Rollouts without devices (issue 13): the plan, the state machine over what devices report,
the state file, and the driver recording signed per-device releases in a real store. The
reports come through FleetWatcher from real MQTT messages; test_rollout_e2e.py runs the
whole thing with real devices."""

from __future__ import annotations

import json
import logging
import math

import paho.mqtt.client as mqtt
import pytest

from edged.errors import InvalidInput
from edged.registry.announcer import Announcer
from edged.registry.config import RegistrySettings
from edged.registry.connection import Connection
from edged.registry.fleet import MAX_DOCUMENT_BYTES, FleetWatcher
from edged.registry.publisher import Publisher
from edged.registry.rollout import (
    RolloutFiles,
    abort,
    new_rollout,
    pause,
    resume,
    step,
)
from edged.registry.rollout_commands import change_rollout, start_rollout, status_dict
from edged.registry.rollout_driver import NOT_READY_TICKS, RolloutDriver
from edged.registry.rollout_files import DeviceRecord
from edged.registry.rollout_plan import parse_waves, plan_waves, wave_order
from edged.registry.store import RegistryStore, Target
from edged.signing import MAX_ENVELOPE_BYTES, Release, key_id, verify_envelope
from tests.conftest import build_tiny_ir, ir_files, wait_until
from tests.registry.conftest import retained_on


def message(topic: str, payload: bytes | dict) -> mqtt.MQTTMessage:
    """A message as paho hands it to on_message."""
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return msg


class Fleet:
    """Devices reporting through a real FleetWatcher: their retained state and events."""

    def __init__(self) -> None:
        self.watcher = FleetWatcher("edged")

    def state(self, device: str, active: str | None, *, group: str | None = None, desired: str | None = None,
              degraded: bool = False, failure: dict | None = None) -> None:
        self.watcher.on_message(message(f"edged/devices/{device}/status", {"state": "online"}))
        self.watcher.on_message(message(f"edged/devices/{device}/state", {
            "device": device, "group": group,
            "models": {"wide": {"desired": desired, "active": active, "degraded": degraded,
                                "failure": failure}}}))

    def event(self, device: str, kind: str, version: str, reason: str = "", **fields) -> None:
        self.watcher.on_message(message(f"edged/devices/{device}/events", {
            "seq": 1, "kind": kind, "model": "wide", "version": version, "reason": reason, **fields}))

    def reports(self):
        return self.watcher.reports()


def rollout_of(devices: int, waves: str = "25%,50%,100%", **options):
    fleet = Fleet()
    for i in range(devices):
        fleet.state(f"cam-{i}", "1", group="even" if i % 2 == 0 else "odd")
    values = {"group": None, "soak_s": 10.0, "max_failures": 0, "report_timeout_s": 100.0} | options
    return fleet, new_rollout("wide", "2", parse_waves(waves), now=1000.0, **values)


def test_wave_order_is_a_reproducible_hash_order_per_name_and_version():
    devices = [f"cam-{i}" for i in range(50)]
    order = wave_order("wide", "2", devices)
    assert sorted(order) == sorted(devices) and order == wave_order("wide", "2", reversed(devices))
    assert order != wave_order("wide", "3", devices) and order != devices


def test_percentage_waves_take_the_first_ceil_of_the_order_and_group_waves_take_their_group():
    eligible = {f"cam-{i}": ("a" if i < 3 else "b") for i in range(10)}
    waves = plan_waves(["1%", "10%", "50%", "100%"], "wide", "2", eligible)
    assert [len(w) for w in waves] == [1, 0, 4, 5]
    assert [d for wave in waves for d in wave] == wave_order("wide", "2", eligible)
    assert [len(w) for w in plan_waves(["33%", "100%"], "wide", "2", eligible)] == [math.ceil(3.3), 6]
    group_a, group_b = ["cam-0", "cam-1", "cam-2"], [f"cam-{i}" for i in range(3, 10)]
    assert plan_waves(["b", "a"], "wide", "2", eligible) == [wave_order("wide", "2", group_b),
                                                             wave_order("wide", "2", group_a)]


@pytest.mark.parametrize("text", ["", "10%,5%,100%", "10%,50%", "0%,100%", "10%,canary", "a,a", "../x,b",
                                  "150%"])
def test_bad_waves_are_refused(text):
    with pytest.raises(InvalidInput):
        parse_waves(text)


def test_a_rollout_goes_wave_by_wave_soaks_and_completes():
    fleet, rollout = rollout_of(4)
    first = step(rollout, fleet.reports(), 1000.0)
    assert "planned over 4 eligible devices" in first.messages[0]
    assert len(first.target) == 1 and rollout.current == 0  # 25% of 4
    (device,) = first.target
    assert rollout.devices[device].previous == "1"
    assert not step(rollout, fleet.reports(), 1001.0).changed  # nothing reported yet

    fleet.state(device, "2", desired="2")
    fleet.event(device, "update_activated", "2")
    assert not step(rollout, fleet.reports(), 1001.5).changed  # on probation
    fleet.event(device, "update_kept", "2")
    settled = step(rollout, fleet.reports(), 1002.0)
    assert rollout.devices[device].outcome == "done" and "settled: 1 done" in settled.messages[-1]
    assert not step(rollout, fleet.reports(), 1011.0).target  # soaking 10 s from 1002
    second = step(rollout, fleet.reports(), 1012.5)
    assert len(second.target) == 1 and rollout.current == 1
    for now, done in ((1013.0, second.target), (1030.0, None)):
        for d in done or []:
            fleet.state(d, "2")
        changes = step(rollout, fleet.reports(), now)
    assert len(changes.target) == 2 and rollout.current == 2
    for d in changes.target:
        fleet.state(d, "2")
    step(rollout, fleet.reports(), 1031.0)
    final = step(rollout, fleet.reports(), 1042.0)
    assert final.finish and rollout.state == "completed"
    assert [status_dict(rollout)["waves"][i]["counts"]["done"] for i in range(3)] == [1, 1, 2]


def test_an_activation_seen_before_a_reconnect_is_forgotten_its_update_kept_may_be_lost():
    fleet, rollout = rollout_of(2, "100%")
    step(rollout, fleet.reports(), 1000.0)
    fleet.state("cam-0", "2")
    fleet.event("cam-0", "update_activated", "2")
    fleet.state("cam-1", "2")
    fleet.event("cam-1", "update_failed", "2", "chunk 3 timed out")
    fleet.watcher.mark_sync()
    step(rollout, fleet.reports(), 1001.0)
    assert rollout.devices["cam-0"].outcome == "done" and rollout.devices["cam-1"].outcome == "failed"


def test_an_activation_whose_device_restarted_is_judged_by_its_state_no_update_kept_comes():
    fleet, rollout = rollout_of(1, "100%")
    step(rollout, fleet.reports(), 1000.0)

    def online(started_at: float) -> None:
        fleet.watcher.on_message(message("edged/devices/cam-0/status",
                                         {"state": "online", "started_at": started_at}))

    fleet.state("cam-0", "2")
    online(900.0)
    fleet.event("cam-0", "update_activated", "2")
    step(rollout, fleet.reports(), 1001.0)
    assert rollout.devices["cam-0"].outcome == "pending"  # on probation
    online(900.0)  # the same run, reconnected: still on probation
    step(rollout, fleet.reports(), 1002.0)
    assert rollout.devices["cam-0"].outcome == "pending"
    online(1003.0)  # a new run: the stop cut the probation short (docs/updates.md)
    step(rollout, fleet.reports(), 1004.0)
    assert rollout.devices["cam-0"].outcome == "done"


def test_a_failure_halts_after_its_wave_and_later_waves_are_untouched():
    fleet, rollout = rollout_of(4, "50%,100%")
    targets = step(rollout, fleet.reports(), 1000.0).target
    fleet.state(targets[0], "1", failure={"version": "2", "kind": "update_failed",
                                          "reason": "self-test: output y differs", "at": 1001})
    fleet.state(targets[1], "2")
    halted = step(rollout, fleet.reports(), 1002.0)
    assert rollout.state == "halted" and not halted.target and not halted.finish
    assert f"{targets[0]}: update_failed: self-test: output y differs" in rollout.reason
    assert set(rollout.devices) == set(targets)
    assert not step(rollout, fleet.reports(), 5000.0).changed  # halted stays halted


def test_failures_within_the_allowance_and_a_rollback_during_the_soak_count():
    fleet, rollout = rollout_of(4, "50%,100%", max_failures=1)
    first, second = step(rollout, fleet.reports(), 1000.0).target
    fleet.event(first, "update_refused", "2", "bad signature")
    fleet.state(second, "2")
    step(rollout, fleet.reports(), 1001.0)
    assert rollout.state == "running" and rollout.devices[first].outcome == "failed"
    fleet.event(second, "update_rolled_back", "2", "probation: self-test failed")  # while soaking
    step(rollout, fleet.reports(), 1005.0)
    assert rollout.state == "halted" and "2 devices failed" in rollout.reason


def test_a_device_that_reports_nothing_is_silent_after_the_timeout_and_counts_as_failed():
    fleet, rollout = rollout_of(2, "50%,100%", report_timeout_s=30.0)
    (device,) = step(rollout, fleet.reports(), 1000.0).target
    assert not step(rollout, fleet.reports(), 1030.0).changed
    step(rollout, fleet.reports(), 1030.5)
    assert rollout.devices[device].outcome == "silent" and rollout.state == "halted"


def test_pause_holds_the_next_wave_and_resume_releases_it():
    fleet, rollout = rollout_of(2, "50%,100%", soak_s=0.0)
    (device,) = step(rollout, fleet.reports(), 1000.0).target
    pause(rollout)
    fleet.state(device, "2")
    held = step(rollout, fleet.reports(), 1001.0)
    assert not held.target and "paused: wave 2 waits for resume" in held.messages[-1]
    assert not step(rollout, fleet.reports(), 1002.0).changed  # said once
    resume(rollout)
    assert len(step(rollout, fleet.reports(), 1003.0).target) == 1
    with pytest.raises(InvalidInput):
        resume(rollout)


def test_abort_sends_devices_back_and_withdraws_each_rollback_once_it_is_back():
    fleet, rollout = rollout_of(4, "50%,100%")
    first, second = step(rollout, fleet.reports(), 1000.0).target
    fleet.state(first, "2")
    assert abort(rollout, 1001.0) == {first: "1", second: "1"} and rollout.state == "aborting"
    fleet.state(second, "1", desired="2")  # still trying 2
    fleet.state(first, "1", desired="1")
    back = step(rollout, fleet.reports(), 1002.0)
    assert back.withdraw == [first]  # the second still wants 2
    fleet.state(second, "1", desired="1")
    assert step(rollout, fleet.reports(), 1003.0).withdraw == [second] and rollout.state == "aborted"


def test_only_devices_listing_the_model_in_the_group_are_eligible():
    fleet, rollout = rollout_of(6, "100%", group="even")
    fleet.watcher.on_message(message("edged/devices/other/state", {"device": "other", "models": {}}))
    targets = step(rollout, fleet.reports(), 1000.0).target
    assert sorted(targets) == ["cam-0", "cam-2", "cam-4"]
    _fleet, empty = rollout_of(2, "100%", group="nobody")
    step(empty, _fleet.reports(), 1000.0)
    assert empty.state == "halted" and "no eligible device" in empty.reason


def test_the_watcher_bounds_what_devices_send():
    watcher = FleetWatcher("edged")
    watcher.on_message(message("edged/devices/../state", {"models": {}}))
    watcher.on_message(message("edged/devices/big/state", b"{" + b" " * MAX_DOCUMENT_BYTES + b"}"))
    watcher.on_message(message("edged/devices/chatty/status", {"state": "online"}))
    for i in range(200):
        watcher.on_message(message("edged/devices/chatty/events",
                                   {"kind": "update_failed", "model": "wide", "version": str(i)}))
    assert set(watcher.devices) == {"big", "chatty"} and watcher.devices["big"].state is None
    assert watcher.devices["big"].problems and len(watcher.devices["chatty"].outcomes) == 64


@pytest.fixture
def publisher(tmp_path):
    settings = RegistrySettings(root=tmp_path / "root")
    store = RegistryStore(settings.root)
    store.create_key()
    publisher = Publisher(settings, store)
    for version, scale in (("1", 2.0), ("2", 3.0)):
        files = ir_files(build_tiny_ir(tmp_path / f"v{version}", scale=scale, name="wide"))
        publisher.publish("wide", files, version, hold=True)
    return publisher


def verified(store: RegistryStore, target: Target) -> Release:
    key = store.signing_key()
    return Release.parse(verify_envelope(store.retained_for(target), {key_id(key): key.public_key()},
                                         MAX_ENVELOPE_BYTES))


def test_the_driver_records_signed_device_releases_then_the_base_release_and_withdraws(publisher):
    store, fleet = publisher.store, Fleet()
    for i in range(3):
        fleet.state(f"cam-{i}", "1")
    assert store.retained() == {}  # held: announced nowhere
    start_rollout(publisher, "wide", "2", "33%,100%", group=None, soak_s=0, max_failures=0,
                  report_timeout_s=60)
    with pytest.raises(InvalidInput, match="running"):
        start_rollout(publisher, "wide", "2", "100%", group=None, soak_s=0, max_failures=0,
                      report_timeout_s=60)
    changed = []
    driver = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: True,
                           on_change=lambda: changed.append(1))
    try:
        driver.tick(now=2e9)
        assert driver.driving
        rollout = RolloutFiles(store.root).load("wide")
        (first,) = rollout.waves[0].devices
        release = verified(store, Target("wide", device=first))
        assert (release.device, release.rollback, release.group) == (first, False, None)
        assert release.manifest.version == "2"
        assert [t.device for t in store.retained()] == [first] and changed
        for i in range(3):
            fleet.state(f"cam-{i}", "2")
        for now in (2e9 + 1, 2e9 + 2, 2e9 + 3):
            driver.tick(now=now)
        assert RolloutFiles(store.root).load("wide").state == "completed"
        assert verified(store, Target("wide")).manifest.version == "2"
        withdrawn = {t.device: e for t, e in store.retained().items() if t.device}
        assert withdrawn == {f"cam-{i}": b"" for i in range(3)}
    finally:
        driver.stop()


def test_abort_records_rollback_releases_of_the_previous_versions(publisher, broker):
    settings = RegistrySettings(root=publisher.store.root, mqtt={"host": broker.host, "port": broker.port})
    publisher = Publisher(settings, publisher.store)  # abort announces: on a real broker
    store, fleet = publisher.store, Fleet()
    fleet.state("cam-0", "1")
    fleet.state("cam-1", None, desired="1")  # its model failed to load: nothing to go back to
    start_rollout(publisher, "wide", "2", "100%", group=None, soak_s=0, max_failures=5, report_timeout_s=60)
    driver = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: True, on_change=lambda: None)
    try:
        driver.tick(now=2e9)
    finally:
        driver.stop()
    rollout, notes = change_rollout(publisher, "wide", "abort")
    assert rollout.state == "aborting" and not notes
    back = verified(store, Target("wide", device="cam-0"))
    assert (back.manifest.version, back.rollback, back.device) == ("1", True, "cam-0")
    assert back.rollback_from == "2"  # the device takes it only while it runs 2
    assert store.retained_for(Target("wide", device="cam-1")) == b""
    with pytest.raises(InvalidInput):
        change_rollout(publisher, "wide", "pause")


def test_serve_announces_thousands_of_device_releases_on_connect(make_registry, start_broker, mqtt_subscriber,
                                                                 tmp_path):
    """More device releases than paho queues (4096): serve sends them in batches, waiting for
    each batch's PUBACKs, and the broker ends up retaining every one. The broker may queue all
    5000 for the test's one live subscriber (Mosquitto's default, 1000, dropped the rest once
    `serve` announced faster than the subscriber read)."""
    broker = start_broker(extra_config="max_queued_messages 10000")
    registry = make_registry(broker)
    registry.run("publish", "wide", *ir_files(build_tiny_ir(tmp_path / "v1", name="wide")), "--version", "1",
                 "--hold")
    publisher = Publisher(RegistrySettings(root=registry.root), RegistryStore(registry.root))
    envelope = publisher.envelope_for(Target("wide", device="cam-0"), "1")
    count = 5000
    for i in range(count):  # the store's layout, written plainly: this test is about announcing
        path = registry.root / "retained" / Target("wide", device=f"cam-{i}").suffix
        path.parent.mkdir(parents=True)
        path.with_suffix(".json").write_bytes(envelope)
    releases = mqtt_subscriber(broker, "edged/registry/devices/+/models/wide")
    registry.serve(mqtt_subscriber(broker, "edged/registry/status"))
    assert f"announced {count} releases and 0 withdrawals" in registry.serve_log()
    wait_until(lambda: len({m.topic for m in releases.messages() if m.payload == envelope}) == count, 60,
               lambda: f"{count} releases, not {len({m.topic for m in releases.messages()})}")
    for i in (0, count // 2, count - 1):  # retained (one subscriber cannot take 5000 at once: the
        # broker queues at most max_queued_messages for it)
        found = retained_on(mqtt_subscriber, broker, f"edged/registry/devices/cam-{i}/models/wide")
        assert found is not None and found.payload == envelope


# --- the reviewer's findings ----------------------------------------------------------------

def test_a_failure_the_device_retries_is_pending_and_then_done_or_failed_at_the_report_timeout():
    fleet, rollout = rollout_of(2, "100%")  # max_failures 0, report timeout 100 s
    first, second = step(rollout, fleet.reports(), 1000.0).target
    for device in (first, second):  # a chunk timeout under load: the device tries again
        fleet.event(device, "update_failed", "2", "chunk timed out", time=1000.5, attempt=1, retry_in_s=30)
        fleet.state(device, "1", desired="2", failure={"version": "2", "kind": "update_failed",
                                                       "reason": "chunk timed out", "at": 1000.5})
    step(rollout, fleet.reports(), 1001.0)
    assert rollout.state == "running" and rollout.devices[first].outcome == "pending"
    assert rollout.devices[first].reason == "retrying: update_failed: chunk timed out"
    fleet.event(first, "update_activated", "2", time=1031.0)
    fleet.event(first, "update_kept", "2", time=1032.0)
    fleet.state(first, "2", desired="2")  # its failure is forgotten once the active version changed
    step(rollout, fleet.reports(), 1033.0)
    assert rollout.devices[first].outcome == "done" and rollout.state == "running"
    step(rollout, fleet.reports(), 1101.0)  # the second still failing past the report timeout
    assert rollout.devices[second].outcome == "failed" and rollout.state == "halted"
    assert "still failing after 100 s: update_failed: chunk timed out" in rollout.reason


@pytest.mark.parametrize("kind, reason", [("update_refused", "signed for another device"),
                                          ("update_rolled_back", "probation: errors"),
                                          ("update_failed", "self-test: output 'y' differs by up to 1")])
def test_refused_rolled_back_and_a_failed_self_test_halt_at_once(kind, reason):
    fleet, rollout = rollout_of(2, "100%")
    first, _ = step(rollout, fleet.reports(), 1000.0).target
    failure = {"version": "2", "kind": kind, "reason": reason, "at": 1000.5}
    fleet.state(first, "1", desired="2", failure=failure)
    step(rollout, fleet.reports(), 1001.0)
    assert rollout.state == "halted" and f"{first}: {kind}: {reason}" in rollout.reason


def test_failures_and_events_older_than_the_targeting_are_another_attempts():
    fleet, rollout = rollout_of(2, "100%")
    old = {"version": "2", "kind": "update_rolled_back", "reason": "an earlier rollout", "at": 900.0}
    for i in range(2):  # an earlier, aborted rollout of the same version left these behind
        fleet.state(f"cam-{i}", "1", desired="1", failure=old)
        fleet.event(f"cam-{i}", "update_rolled_back", "2", "an earlier rollout", time=900.0)
    step(rollout, fleet.reports(), 1000.0)
    step(rollout, fleet.reports(), 1001.0)
    assert rollout.state == "running" and {r.outcome for r in rollout.devices.values()} == {"pending"}
    fleet.event("cam-0", "update_rolled_back", "2", "this one", time=1000.8)
    step(rollout, fleet.reports(), 1002.0)
    assert rollout.state == "halted" and "cam-0: update_rolled_back: this one" in rollout.reason


def test_eligible_devices_want_or_run_the_model_and_are_not_on_a_newer_version():
    fleet, rollout = rollout_of(3, "100%")
    fleet.state("ahead", "3", desired="3")
    fleet.state("idle", None)  # lists the model, wants no version of it
    targets = step(rollout, fleet.reports(), 1000.0).target
    assert sorted(targets) == ["cam-0", "cam-1", "cam-2"] and rollout.skipped == 1


def test_a_device_recorded_before_keeps_its_previous_version_when_its_wave_starts_again():
    fleet, rollout = rollout_of(1, "100%")
    rollout.devices["cam-0"] = DeviceRecord(wave=0, targeted_at=999.0, previous="1")
    fleet.state("cam-0", "2", desired="2")  # already took the new version before a crash
    step(rollout, fleet.reports(), 1000.0)
    assert rollout.devices["cam-0"].previous == "1"


def test_an_abort_ends_when_devices_do_not_return_within_the_report_timeout():
    fleet, rollout = rollout_of(2, "100%")
    first, second = step(rollout, fleet.reports(), 1000.0).target
    abort(rollout, 1010.0)
    fleet.state(second, "1", desired="2")
    fleet.state(first, "1", desired="1")
    step(rollout, fleet.reports(), 1011.0)
    assert rollout.state == "aborting"
    ended = step(rollout, fleet.reports(), 1111.0)  # 100 s after the abort; the second never came back
    assert rollout.state == "aborted" and not ended.withdraw  # its rollback release stays
    assert rollout.devices[second].not_returned and "1 devices not returned" in rollout.reason


def on_broker(publisher: Publisher, broker) -> Publisher:
    """The publisher announcing to a real broker (abort, promote)."""
    settings = RegistrySettings(root=publisher.store.root, mqtt={"host": broker.host, "port": broker.port})
    return Publisher(settings, publisher.store)


def test_abort_force_ends_an_aborting_rollout_and_leaves_the_rollback_releases(publisher, broker):
    publisher = on_broker(publisher, broker)
    store, fleet = publisher.store, Fleet()
    fleet.state("cam-0", "1")
    start_rollout(publisher, "wide", "2", "100%", group=None, soak_s=0, max_failures=5, report_timeout_s=60)
    driver = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: True, on_change=lambda: None)
    try:
        driver.tick(now=2e9)
    finally:
        driver.stop()
    change_rollout(publisher, "wide", "abort")
    rollback = store.retained_for(Target("wide", device="cam-0"))
    assert RolloutFiles(store.root).load("wide").state == "aborting"
    with pytest.raises(InvalidInput, match="--force"):
        change_rollout(publisher, "wide", "abort")
    rollout, _ = change_rollout(publisher, "wide", "abort", force=True)
    assert rollout.state == "aborted" and rollout.devices["cam-0"].not_returned
    assert "not returned (abort --force)" in rollout.reason
    assert store.retained_for(Target("wide", device="cam-0")) == rollback


def test_publish_and_promote_to_an_open_rollouts_base_are_refused(publisher, broker, tmp_path):
    publisher = on_broker(publisher, broker)
    start_rollout(publisher, "wide", "2", "100%", group=None, soak_s=0, max_failures=0, report_timeout_s=60)
    with pytest.raises(InvalidInput, match="abort it"):
        publisher.promote("wide", "1")
    files = ir_files(build_tiny_ir(tmp_path / "v3", scale=4.0, name="wide"))
    with pytest.raises(InvalidInput, match="abort it"):
        publisher.publish("wide", files, "3")
    assert "3" not in publisher.store.versions("wide")
    assert publisher.promote("wide", "1", "lab").target == Target("wide", "lab")  # not the rollout's


def test_completion_leaves_a_newer_base_release_alone(publisher, tmp_path, caplog):
    store, fleet = publisher.store, Fleet()
    v3 = ir_files(build_tiny_ir(tmp_path / "v3", scale=4.0, name="wide"))
    publisher.publish("wide", v3, "3", hold=True)
    fleet.state("cam-0", "1")
    start_rollout(publisher, "wide", "2", "100%", group=None, soak_s=0, max_failures=0, report_timeout_s=60)
    driver = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: True, on_change=lambda: None)
    caplog.set_level(logging.INFO, logger="edged.registry.rollout_driver")
    try:
        driver.tick(now=2e9)
        newer = publisher.envelope_for(Target("wide"), "3")
        with store.lock():  # as an older registry let a promote race the rollout
            store.set_retained(Target("wide"), newer)
        fleet.state("cam-0", "2")
        for now in (2e9 + 1, 2e9 + 2):
            driver.tick(now=now)
    finally:
        driver.stop()
    assert RolloutFiles(store.root).load("wide").state == "completed"
    assert store.retained_for(Target("wide")) == newer
    assert store.retained_for(Target("wide", device="cam-0")) == b""
    assert "already holds 3, newer; left as it is" in caplog.text


def test_a_release_that_cannot_be_written_halts_the_rollout_which_still_records_its_devices(publisher):
    store, fleet = publisher.store, Fleet()
    fleet.state("cam-0", "1")
    start_rollout(publisher, "wide", "2", "100%", group=None, soak_s=0, max_failures=0, report_timeout_s=60)
    (store.root / "retained").mkdir(exist_ok=True)
    (store.root / "retained" / "devices").write_bytes(b"")  # mkdir under it: an OSError
    driver = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: True, on_change=lambda: None)
    try:
        driver.tick(now=2e9)
    finally:
        driver.stop()
    rollout = RolloutFiles(store.root).load("wide")
    assert rollout.state == "halted" and "cannot record its releases" in rollout.reason
    assert rollout.devices["cam-0"].previous == "1"


def test_a_driver_taking_over_records_missing_releases_and_withdraws_unknown_ones(publisher):
    store, fleet = publisher.store, Fleet()
    fleet.state("cam-0", "1")
    start_rollout(publisher, "wide", "2", "100%", group=None, soak_s=0, max_failures=0, report_timeout_s=60)
    with store.lock():  # a crash: a release the file does not know, and the file's device without one
        ghost = Target("wide", device="ghost")
        store.set_retained(ghost, publisher.envelope_for(ghost, "2"))
        rollout = RolloutFiles(store.root).load("wide")
        rollout.planned_at, rollout.current, rollout.waves[0].devices = 1.0, 0, ["cam-0"]
        rollout.devices["cam-0"] = DeviceRecord(wave=0, targeted_at=2e9, previous="1")
        RolloutFiles(store.root).save(rollout)
    driver = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: True, on_change=lambda: None)
    try:
        driver.tick(now=2e9 + 1)
    finally:
        driver.stop()
    assert store.retained_for(Target("wide", device="ghost")) == b""
    assert verified(store, Target("wide", device="cam-0")).manifest.version == "2"


def test_the_driver_lock_is_taken_only_when_ready_and_given_up_when_not(publisher):
    store, fleet = publisher.store, Fleet()
    ready = {"a": False}
    cut_off = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: ready["a"],
                            on_change=lambda: None)
    other = RolloutDriver(store, publisher, fleet.watcher, 1.0, ready=lambda: True, on_change=lambda: None)
    try:
        cut_off.tick(now=2e9)
        assert not cut_off.driving
        ready["a"] = True
        cut_off.tick(now=2e9)
        assert cut_off.driving
        ready["a"] = False
        for _ in range(NOT_READY_TICKS):
            other.tick(now=2e9)
            assert not other.driving
            cut_off.tick(now=2e9)
        assert not cut_off.driving
        other.tick(now=2e9)
        assert other.driving
    finally:
        cut_off.stop()
        other.stop()


def test_the_watcher_keeps_at_most_max_devices_made_only_from_retained_status_or_state():
    watcher = FleetWatcher("edged", max_devices=2)
    watcher.on_message(message("edged/devices/stranger/events", {"kind": "update_failed", "model": "wide",
                                                                  "version": "2"}))
    watcher.on_message(message("edged/devices/stranger/health", {"ok": True}))
    assert watcher.devices == {}
    for device in ("a", "b", "c"):
        watcher.on_message(message(f"edged/devices/{device}/status", {"state": "online"}))
    assert set(watcher.devices) == {"a", "b"} and watcher.refused == 1
    watcher.on_message(message("edged/devices/a/status", b""))  # status and state cleared: gone
    assert set(watcher.devices) == {"b"}
    watcher.on_message(message("edged/devices/c/state", {"models": {}}))
    assert set(watcher.devices) == {"b", "c"}


def test_serve_deletes_a_withdrawn_device_release_once_the_broker_has_the_withdrawal(
        make_registry, broker, mqtt_subscriber, tmp_path):
    registry = make_registry(broker)
    store = RegistryStore(registry.root)
    withdrawn, group = Target("wide", device="cam-0"), Target("wide", "lab")
    with store.lock():
        store.set_retained(withdrawn, b"")
        store.set_retained(group, b"")
    registry.serve(mqtt_subscriber(broker, "edged/registry/status"))
    wait_until(lambda: store.retained_for(withdrawn) is None, 30, lambda: registry.serve_log())
    assert store.retained_for(group) == b""  # group and all-device files stay


def test_serve_verifies_an_envelope_once_and_again_only_when_it_changes(publisher, broker):
    publisher = on_broker(publisher, broker)
    store = publisher.store
    targets = [Target("wide", device=f"cam-{i}") for i in range(3)]
    with store.lock():
        for target in targets:
            store.set_retained(target, publisher.envelope_for(target, "2"), touch=False)
        store.touch()
    connection = Connection(publisher.settings.mqtt, "announcer-test").open(10)
    try:
        announcer = Announcer(publisher.settings, store, connection, store.signing_key(), lambda: None)
        announcer.announce(force=True)
        first = {t: announcer._verified[t][1] for t in targets}
        with store.lock():
            store.set_retained(targets[0], publisher.envelope_for(targets[0], "1"))
        announcer.announce(force=False)
    finally:
        connection.close()
    assert announcer._verified[targets[0]][1].manifest.version == "1"
    assert all(announcer._verified[t][1] is first[t] for t in targets[1:])  # not parsed nor verified again
