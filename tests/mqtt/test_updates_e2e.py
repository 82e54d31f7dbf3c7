"""Model updates end to end: `edged-registry` and `edged run` as real subprocesses, a real
Mosquitto that the tests stop and start, and the daemon killed with SIGKILL mid-update."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edged.models.store import ModelStore
from tests.conftest import ir_files, wait_until
from tests.daemon_process import ChildProcess

DEVICE = "cam-1"
EVENTS = f"edged/devices/{DEVICE}/events"
WIDTH = 2048  # a 2048 x 2048 float32 matrix: a 16 MB model, slow enough in 8 KiB chunks


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


class Registry:
    """`edged-registry` with its own store, on the test's broker."""

    def __init__(self, workdir: Path, broker) -> None:
        self.workdir = workdir
        self.broker = broker
        self.config = workdir / "registry.toml"
        self.config.write_text(f'root = "{workdir / "registry"}"\nreload_interval_s = 0.2\n'
                               f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n')
        out = self.run("keygen")
        self.public_key = next(line.split()[-1] for line in out.splitlines() if "public key" in line)
        self.servers: list[ChildProcess] = []  # every `serve` started, the last one running

    def run(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "edged.registry", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    @property
    def server(self) -> ChildProcess:
        return self.servers[-1]

    def serve(self) -> None:
        self.servers.append(ChildProcess(
            [sys.executable, "-m", "edged.registry", "serve", "--config", str(self.config)],
            self.workdir / f"registry-{len(self.servers)}.log", name="serve"))

    def output(self) -> str:
        """What every `serve` said, oldest first."""
        return "".join(server.output() for server in self.servers)

    def stop(self) -> None:
        """SIGTERM (after SIGCONT: a test may have stopped it); exiting within 20 s is part of the test."""
        for server in self.servers:
            server.stop(timeout=20, must_exit=True)

    def kill(self) -> None:
        """SIGKILL `serve`: the registry is gone at once (the broker sends its Last Will)."""
        self.server.kill()


@pytest.fixture
def registry(tmp_path, start_broker):
    broker = start_broker(persistence=True)
    registry = Registry(tmp_path, broker)
    registry.serve()
    yield registry
    registry.stop()


@pytest.fixture
def wide_store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    store.add("wide", ir_files(build_matmul_ir(tmp_path / "v1", seed=1)), "1")
    store.activate("wide", "1")
    return store


def device_config(registry: Registry, workdir: Path, **updates: object) -> dict:
    broker = registry.broker
    return {
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                 "outbox_path": str(workdir / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "updates": {"enabled": True, "public_keys": [registry.public_key], "probation_s": 0.5,
                    "download_dir": str(workdir / "downloads"), "chunk_timeout_s": 2.0, **updates},
    }


def publish_v2(registry: Registry, tmp_path: Path, width: int = WIDTH) -> int:
    """Publish version 2 with a self-test; returns its size in bytes."""
    xml = build_matmul_ir(tmp_path / "v2", seed=2, width=width)
    np.save(tmp_path / "input.npy", np.ones((1, width), np.float32))
    files = ir_files(xml)
    registry.run("publish", "wide", *map(str, files), "--version", "2",
                 "--selftest", str(tmp_path / "input.npy"))
    return sum(f.stat().st_size for f in files)


def progress(download_dir: Path) -> int:
    """Chunks on disk of the download in progress (0 when none)."""
    for record in download_dir.glob("*.progress"):
        try:
            return len(json.loads(record.read_text())["done"])
        except (OSError, ValueError, KeyError):
            return 0
    return 0



def wide_output(daemon) -> float:
    with daemon.client() as client:
        return float(client.infer("wide", {"x": np.ones((1, WIDTH), np.float32)})["y"][0, 0])


def test_the_broker_stops_mid_download_and_the_transfer_resumes(start_daemon, registry, mqtt_subscriber,
                                                                wide_store, tmp_path):
    events = mqtt_subscriber(registry.broker, EVENTS, keep_session=True)
    config = device_config(registry, tmp_path, chunk_bytes=8 << 10, window=1)
    daemon = start_daemon(wide_store.root, config)
    before = wide_output(daemon)
    size = publish_v2(registry, tmp_path)
    downloads = tmp_path / "downloads"
    chunks = -(-size // (8 << 10))
    wait_until(lambda: progress(downloads) > chunks // 10, 60, "a tenth of the download")
    registry.broker.stop()
    stopped_at = progress(downloads)
    time.sleep(1.0)
    registry.broker.start()
    try:
        kept = events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=60).json()
    except AssertionError as exc:
        logs = f"daemon:\n{daemon.output()[-3000:]}\nregistry:\n{registry.output()[-3000:]}"
        raise AssertionError(f"{exc}\n{logs}") from None
    assert kept["version"] == "2" and wide_output(daemon) != before
    with daemon.client() as client:
        received = client.status()["updates"]["bytes_received"]
    # Resumed, not restarted: the bytes fetched are the file once, plus at most the chunks
    # in flight when the broker went away.
    assert stopped_at < chunks and received <= size + 4 * (8 << 10), (received, size)


def test_kill_9_mid_download_resumes_after_the_restart(start_daemon, registry, mqtt_subscriber, wide_store,
                                                       tmp_path):
    events = mqtt_subscriber(registry.broker, EVENTS, keep_session=True)
    config = device_config(registry, tmp_path, chunk_bytes=8 << 10, window=1)
    daemon = start_daemon(wide_store.root, config)
    size = publish_v2(registry, tmp_path)
    chunks = -(-size // (8 << 10))
    wait_until(lambda: progress(tmp_path / "downloads") > chunks // 5, 60, "a fifth of the download")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    on_disk = progress(tmp_path / "downloads")
    assert 0 < on_disk < chunks
    restarted = start_daemon(wide_store.root, config)
    events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=120)
    with restarted.client() as client:
        status = client.status()
    assert status["models"]["wide"]["version"] == "2"
    assert status["updates"]["bytes_received"] <= size - on_disk * (8 << 10) + 4 * (8 << 10)
    wide_store.verify("wide", "2")  # complete, every hash as the manifest says


def test_kill_9_mid_activation_serves_a_complete_version_after_the_restart(
        start_daemon, registry, mqtt_subscriber, wide_store, tmp_path):
    events = mqtt_subscriber(registry.broker, EVENTS, keep_session=True)
    config = device_config(registry, tmp_path)
    daemon = start_daemon(wide_store.root, config)
    publish_v2(registry, tmp_path)
    events.wait_for(lambda m: m.json()["kind"] == "update_staged", timeout=120)
    daemon.proc.send_signal(signal.SIGKILL)  # staged, being loaded and self-tested, not active
    daemon.proc.wait()
    restarted = start_daemon(wide_store.root, config)
    with restarted.client() as client:  # whatever it serves now is complete
        version = client.status()["models"]["wide"]["version"]
    wide_store.verify("wide", version)
    events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=120)
    assert wide_store.active("wide") == "2"
    wide_store.verify("wide", "2")


def test_a_publish_reaches_the_device_while_a_client_predicts_without_a_failure(
        start_daemon, registry, mqtt_subscriber, wide_store, tmp_path):
    events = mqtt_subscriber(registry.broker, EVENTS, keep_session=True)
    daemon = start_daemon(wide_store.root, device_config(registry, tmp_path))
    with daemon.predicting("wide", {"x": np.ones((1, WIDTH), np.float32)}) as load:
        publish_v2(registry, tmp_path)
        kept = events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=120).json()
    assert kept["version"] == "2" and load.failures == []
    assert load.answers[0] != load.answers[-1]  # version 1's answer, then version 2's
    assert wide_store.active("wide") == "2"


def test_the_activated_backend_is_the_self_tested_one(
        start_daemon, registry, mqtt_subscriber, sample_models, tmp_path):
    """`face` runs on OpenVINO and LiteRT: with `backend = auto` two probes of close timings
    pick either (about half of the runs differed when the manager probed again). The manager
    adopts the staged check's selection, so the backend that serves is the tested one."""
    store = ModelStore(tmp_path / "store")
    store.add("face", [sample_models["face"]], "1")
    store.activate("face", "1")
    events = mqtt_subscriber(registry.broker, EVENTS, keep_session=True)
    daemon = start_daemon(store.root, device_config(registry, tmp_path))
    np.save(tmp_path / "face-input.npy", np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32))
    registry.run("publish", "face", str(sample_models["face"]), "--version", "2",
                 "--selftest", str(tmp_path / "face-input.npy"), "--atol", "0.01", "--rtol", "0.05")
    tested = events.wait_for(lambda m: m.json()["kind"] == "update_tested", timeout=120).json()
    activated = events.wait_for(lambda m: m.json()["kind"] == "update_activated", timeout=120).json()
    assert tested["selftest"]
    assert activated["backend"] == tested["backend"], (tested, activated)
    with daemon.client() as client:
        served = client.status()["models"]["face"]
    assert served["version"] == "2" and served["backend"] == tested["backend"], served
    assert served["reason"].endswith(", when its update was tested"), served
    events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=60)
    assert store.active("face") == "2"
