"""Staged rollouts end to end (issue 13): a real Mosquitto, real `edged-registry serve`
processes driving the rollout, and real `edged run` devices that update a small OpenVINO
model through their per-device release topics, verify it, self-test it and report back.

Each test runs 3 or 4 devices and one or two `serve`s; what they wait for is what the
rollout's state file, the devices' stores and the broker's retained messages say."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edged.fsio import atomic_write
from edged.models.store import ModelStore
from edged.registry.publisher import DAY_S, RELEASE_FILE, new_release, sign
from edged.registry.rollout import Rollout, RolloutFiles
from edged.registry.selftest import EXPECTED_FILE, INPUT_FILE, write_self_test
from edged.registry.store import RegistryStore
from edged.signing import SelfTest
from tests.conftest import build_tiny_ir, ir_files, wait_until
from tests.registry.conftest import Registry, retained_on
from tests.registry.fleet_parts import device_config

MODEL = "tiny"
FAST = {"rollout_tick_s": 0.2}


class Fleet:
    """`count` devices cam-0 ... running tiny 1, each an `edged run` with its own store."""

    def __init__(self, start_daemon, registry: Registry, tmp_path: Path, count: int, v1: list[Path],
                 groups: list[str] | None = None) -> None:
        """`groups`: each device's updates.group, in order (default: none)."""
        self.registry = registry
        self.ids = [f"cam-{i}" for i in range(count)]
        self.stores: dict[str, ModelStore] = {}
        self.daemons = {}
        for index, device in enumerate(self.ids):
            work = tmp_path / device
            group = {"group": groups[index]} if groups else {}
            store = ModelStore(work / "store")
            store.add(MODEL, v1, "1")
            store.activate(MODEL, "1")
            self.stores[device] = store
            self.daemons[device] = start_daemon(
                store.root, device_config(registry, work, device_id=device, **group), ready=False)
        for daemon in self.daemons.values():
            daemon.wait_ready()

    def active(self, device: str) -> str | None:
        return self.stores[device].active(MODEL)

    def logs(self) -> str:
        return "\n".join(f"--- {d}:\n{self.daemons[d].output()[-2500:]}" for d in self.ids)


def wait_states(states, fleet: Fleet, version: str) -> None:
    """Every device's retained state says `version` is active."""
    def latest(device: str) -> dict | None:
        found = [m for m in states.messages(f"edged/devices/{device}/state") if m.payload]
        return found[-1].json() if found else None

    wait_until(lambda: all(((latest(d) or {}).get("models", {}).get(MODEL) or {}).get("active") == version
                           for d in fleet.ids), 60, f"every device to report {MODEL} {version}")


def setup(tmp_path: Path, registry: Registry) -> tuple[list[Path], list[Path], Path]:
    """tiny 1 published for every device; tiny 2 held (stored and signed, announced nowhere)."""
    v1 = ir_files(build_tiny_ir(tmp_path / "v1", scale=2.0))
    v2 = ir_files(build_tiny_ir(tmp_path / "v2", scale=3.0))
    probe = tmp_path / "x.npy"
    np.save(probe, np.array([[0.5, 1.0, 2.0, 3.0]], np.float32))
    registry.run("publish", MODEL, *v1, "--version", "1")
    return v1, v2, probe


def rollout(registry: Registry) -> Rollout | None:
    return RolloutFiles(registry.root).load(MODEL)


def wait_state(registry: Registry, fleet: Fleet, wanted: str, timeout: float = 120) -> Rollout:
    def described() -> str:
        status = registry.run("rollout", "status", expect=None).stdout
        logs = "\n".join(f"--- serve {i}:\n{registry.serve_log(i)[-3000:]}"
                         for i in range(len(registry.servers)))
        return f"the rollout to be {wanted}:\n{status}\n{logs}\n{fleet.logs()}"

    return wait_until(lambda: (r := rollout(registry)) is not None and r.state == wanted and r, timeout,
                      described)


def device_release(mqtt_subscriber, registry: Registry, device: str):
    return retained_on(mqtt_subscriber, registry.broker, f"edged/registry/devices/{device}/models/{MODEL}")


def assert_completed(registry: Registry, fleet: Fleet, mqtt_subscriber) -> None:
    """Every device on 2; the broker retains 2 for every device and no device release (serve
    announces what the driver recorded within its reload_interval_s)."""
    assert all(fleet.active(d) == "2" for d in fleet.ids), {d: fleet.active(d) for d in fleet.ids}

    def base_is_2() -> bool:
        base = retained_on(mqtt_subscriber, registry.broker, f"edged/registry/models/{MODEL}")
        return base is not None and registry.verify(base.payload).manifest.version == "2"

    # The file says completed before the release is announced: a live publish is no retained one.
    def announced(log: str) -> bool:
        return f"announced {MODEL} (all devices)" in log.partition(f"rollout {MODEL} 2 completed")[2]

    wait_until(lambda: any(announced(s.output()) for s in registry.servers), 30, "the base release announced")
    wait_until(base_is_2, 30, "the broker to retain tiny 2 for every device")
    wait_until(lambda: all(device_release(mqtt_subscriber, registry, d) is None for d in fleet.ids), 30,
               "every device release withdrawn")


def test_waves_complete_with_a_pause_and_every_device_ends_on_the_base_release(
        broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    registry = make_registry(broker, FAST)
    v1, v2, probe = setup(tmp_path, registry)
    registry.run("publish", MODEL, *v2, "--version", "2", "--hold", "--selftest", probe)
    states = mqtt_subscriber(broker, "edged/devices/+/state")
    fleet = Fleet(start_daemon, registry, tmp_path, 4, v1)
    wait_states(states, fleet, "1")
    registry.run("rollout", MODEL, "2", "--waves", "25%,50%,100%", "--soak-s", "0.5",
                 "--report-timeout-s", "120")
    registry.run("rollout", "pause", MODEL)
    registry.serve(mqtt_subscriber(broker, "edged/registry/status"))

    paused = wait_until(lambda: (r := rollout(registry)) and r.paused_noted and r, 60,
                        "the pause to hold a wave")
    waiting = [d for wave in paused.waves[paused.current + 1:] for d in wave.devices]
    assert waiting and all(fleet.active(d) == "1" for d in waiting)
    assert all(device_release(mqtt_subscriber, registry, d) is None for d in waiting)
    assert f"{MODEL} 2 to all devices: paused" in registry.run("rollout", "status", MODEL).stdout

    registry.run("rollout", "resume", MODEL)
    done = wait_state(registry, fleet, "completed")
    starts = [w.started_at for w in done.waves]
    assert [len(w.devices) for w in done.waves] == [1, 1, 2] and starts == sorted(starts)
    assert all(r.outcome == "done" for r in done.devices.values()) and len(done.devices) == 4
    assert_completed(registry, fleet, mqtt_subscriber)
    status = registry.run("rollout", "status").stdout
    assert "completed" in status and "wave 3     100%:    2 devices, 2 targeted, 2 done" in status
    assert "rollout tiny 2 completed" in registry.serve_log()


def hold_with_a_self_test_it_cannot_pass(registry: Registry, tmp_path: Path, v1: list[Path], v2: list[Path],
                                         probe: Path) -> None:
    """tiny 2 stored with the self-test outputs of tiny 1 (y = 2x + 1 where 2 computes 3x + 1):
    every device that installs it fails the self-test, as a broken build would."""
    store = RegistryStore(registry.root)
    scratch = tmp_path / "wrong-selftest"
    scratch.mkdir()
    selftest_files = write_self_test(scratch, v1[0], "openvino", probe)
    key = store.signing_key()
    with store.lock():
        manifest = store.add_version(MODEL, [*v2, *selftest_files], "2")
        selftest = SelfTest(input=INPUT_FILE, expected=EXPECTED_FILE, atol=1e-3, rtol=1e-2)
        atomic_write(store.version_dir(MODEL, "2") / RELEASE_FILE,
                     sign(new_release(manifest, None, 30, selftest), key))
    assert DAY_S  # releases valid 30 days, as the registry's default


def test_a_wave_failing_the_self_test_halts_and_the_later_wave_is_untouched(
        broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    registry = make_registry(broker, FAST)
    v1, v2, probe = setup(tmp_path, registry)
    hold_with_a_self_test_it_cannot_pass(registry, tmp_path, v1, v2, probe)
    states = mqtt_subscriber(broker, "edged/devices/+/state")
    fleet = Fleet(start_daemon, registry, tmp_path, 4, v1)
    wait_states(states, fleet, "1")
    registry.serve(mqtt_subscriber(broker, "edged/registry/status"))
    registry.run("rollout", MODEL, "2", "--waves", "50%,100%", "--soak-s", "0", "--max-failures", "0",
                 "--report-timeout-s", "120")

    halted = wait_state(registry, fleet, "halted")
    first, second = halted.waves
    assert halted.current == 0 and "self-test" in halted.reason, halted.reason
    assert set(halted.devices) == set(first.devices) and len(second.devices) == 2
    assert all(fleet.active(d) == "1" for d in fleet.ids)
    for device in second.devices:  # never targeted: no device release, nothing asked of it
        assert device_release(mqtt_subscriber, registry, device) is None
        assert fleet.stores[device].versions(MODEL) == ["1"]
    assert retained_on(mqtt_subscriber, broker, f"edged/registry/models/{MODEL}") is not None  # still 1
    status = registry.run("rollout", "status", MODEL).stdout
    assert "halted" in status and "wave 2     100%:    2 devices, 0 targeted" in status


def test_the_driving_instance_killed_mid_rollout_another_finishes_it(
        broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    registry = make_registry(broker, FAST)
    v1, v2, probe = setup(tmp_path, registry)
    registry.run("publish", MODEL, *v2, "--version", "2", "--hold", "--selftest", probe)
    states = mqtt_subscriber(broker, "edged/devices/+/state")
    fleet = Fleet(start_daemon, registry, tmp_path, 3, v1)
    wait_states(states, fleet, "1")
    status = mqtt_subscriber(broker, "edged/registry/status")
    servers = [registry.serve(status), registry.serve(status)]
    registry.run("rollout", MODEL, "2", "--waves", "34%,100%", "--soak-s", "1", "--report-timeout-s", "120")

    wait_until(lambda: (r := rollout(registry)) is not None and r.current == 0, 60, "the first wave")
    driving = next(i for i in range(2) if "driving the rollouts" in registry.serve_log(i))
    servers[driving].kill()  # SIGKILL: its flock goes with it
    done = wait_state(registry, fleet, "completed")
    assert "driving the rollouts" in registry.serve_log(1 - driving)
    assert all(r.outcome == "done" for r in done.devices.values())
    assert_completed(registry, fleet, mqtt_subscriber)


def test_the_broker_restarted_mid_rollout_the_rollout_completes(
        start_broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    broker = start_broker(persistence=True)
    registry = make_registry(broker, FAST)
    v1, v2, probe = setup(tmp_path, registry)
    registry.run("publish", MODEL, *v2, "--version", "2", "--hold", "--selftest", probe)
    states = mqtt_subscriber(broker, "edged/devices/+/state")
    fleet = Fleet(start_daemon, registry, tmp_path, 3, v1)
    wait_states(states, fleet, "1")
    registry.serve(mqtt_subscriber(broker, "edged/registry/status"))
    registry.run("rollout", MODEL, "2", "--waves", "34%,100%", "--soak-s", "1", "--report-timeout-s", "120")

    wait_until(lambda: (r := rollout(registry)) is not None and r.current == 0, 60, "the first wave")
    broker.stop()
    broker.start()
    done = wait_state(registry, fleet, "completed")
    assert all(r.outcome == "done" for r in done.devices.values())
    assert_completed(registry, fleet, mqtt_subscriber)


def test_abort_sends_the_wave_back_to_the_previous_version(
        broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    """Waves by group (the devices' state names it): canary first, then main."""
    registry = make_registry(broker, FAST)
    v1, v2, probe = setup(tmp_path, registry)
    registry.run("publish", MODEL, *v2, "--version", "2", "--hold", "--selftest", probe)
    states = mqtt_subscriber(broker, "edged/devices/+/state")
    fleet = Fleet(start_daemon, registry, tmp_path, 4, v1, groups=["canary", "main", "canary", "main"])
    wait_states(states, fleet, "1")
    registry.serve(mqtt_subscriber(broker, "edged/registry/status"))
    registry.run("rollout", MODEL, "2", "--waves", "canary,main", "--soak-s", "3600",
                 "--report-timeout-s", "120")

    soaking = wait_until(lambda: (r := rollout(registry)) is not None and r.waves[0].settled_at and r, 120,
                         "the first wave to settle")
    first = soaking.waves[0].devices
    assert sorted(first) == ["cam-0", "cam-2"] and sorted(soaking.waves[1].devices) == ["cam-1", "cam-3"]
    assert all(fleet.active(d) == "2" for d in first)
    aborted = registry.run("rollout", "abort", MODEL).stdout
    assert "aborting" in aborted or "aborted" in aborted
    done = wait_state(registry, fleet, "aborted")
    assert all(fleet.active(d) == "1" for d in fleet.ids)
    assert all(done.devices[d].returned for d in first) and set(done.devices) == set(first)
    wait_until(lambda: all(device_release(mqtt_subscriber, registry, d) is None for d in fleet.ids), 30,
               "every rollback release withdrawn")
    refused = registry.run("rollout", "pause", MODEL, expect=1)
    assert "rollout tiny 2 is aborted, not running" in refused.stderr
