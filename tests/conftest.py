"""Shared fixtures: real sample models, a tiny OpenVINO IR, short socket paths,
and the daemon as a real subprocess on a real Unix socket."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.models.store import ModelStore
from tests.daemon_process import DaemonProcess, to_toml, wait_until

# Test modules import these from here too; they live in tests/daemon_process.py for tools/.
__all__ = ["DaemonProcess", "to_toml", "wait_until"]

ROOT = Path(__file__).resolve().parent.parent


def _load_fetch_tool():
    spec = importlib.util.spec_from_file_location("fetch_models", ROOT / "tools" / "fetch_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sample_models() -> dict[str, Path]:
    """{"face": ..., "selfie": ...}: the pinned MediaPipe .tflite files (fetched once, cached)."""
    return _load_fetch_tool().fetch()


def build_tiny_ir(directory: Path, scale: float = 2.0, name: str = "tiny") -> Path:
    """A real OpenVINO IR: y = relu(x * scale + 1) on a float32 [1, 4] input called "x"."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([1, 4], np.float32, name="x")
    y = ops.relu(ops.add(ops.multiply(x, np.float32(scale)), np.float32(1.0)))
    y.output(0).get_tensor().set_names({"y"})
    model = ov.Model([y], [x], name)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def build_slow_ir(directory: Path, layers: int = 128, width: int = 1024) -> Path:
    """A real OpenVINO IR whose time grows with its input: "x" [rows, 1] through `layers` MatMuls.

    One row (what the watchdog's check sends for a dynamic dimension) takes milliseconds;
    thousands take seconds, holding the model's only worker with `backends.workers = 1`.
    """
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([-1, 1], np.float32, name="x")
    h = ops.multiply(x, np.ones([1, width], np.float32))
    weights = ops.constant(np.full([width, width], 1.0 / width, np.float32))
    for _ in range(layers):
        h = ops.matmul(h, weights, False, False)
    y = ops.reduce_sum(h, np.array([1], np.int64), keep_dims=False)
    y.output(0).get_tensor().set_names({"y"})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "slow.xml"
    ov.save_model(ov.Model([y], [x], "slow"), str(path), compress_to_fp16=False)
    return path


@pytest.fixture(scope="session")
def tiny_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ir(tmp_path_factory.mktemp("tiny-ir"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="edged-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class SmallDisk:
    """A real tmpfs of a few MiB mounted at `path`: `fill()` takes every free byte (writes
    then fail with ENOSPC, as on a full SD card), `free()` gives them back."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self._filler = path / ".filler"
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
                       check=True, capture_output=True)

    def fill(self, leave: int = 0) -> None:
        """Write until the disk is full, or has only `leave` bytes free."""
        with self._filler.open("ab") as out:
            while True:
                room = shutil.disk_usage(self.path).free - leave
                if room <= 0:
                    break
                try:
                    out.write(b"\0" * min(room, 1 << 20))
                    out.flush()
                except OSError:
                    break

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def read_only(self, yes: bool = True) -> None:
        """Remount it read-only (writes fail with EROFS, for root too), or writable again."""
        subprocess.run(["mount", "-o", f"remount,{'ro' if yes else 'rw'}", str(self.path)], check=True,
                       capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk() -> Iterator[Callable[..., SmallDisk]]:
    """small_disk(path, size_mb=8) -> a SmallDisk mounted there, unmounted after the test.
    Skipped where tmpfs cannot be mounted (not root, no CAP_SYS_ADMIN)."""
    mounted: list[SmallDisk] = []

    def mount(path: Path, size_mb: int = 8) -> SmallDisk:
        try:
            disk = SmallDisk(path, size_mb)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            reason = exc.stderr.decode(errors="replace").strip() if getattr(exc, "stderr", None) else exc
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {reason}")
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        disk.unmount()


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This tree's .deb, built once per session by tools/build_deb.sh (gzip: the same
    package in a fraction of xz's time), for the package and boot tests."""
    out = tmp_path_factory.mktemp("deb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")} | {"DEB_COMPRESSION": "gzip"}
    result = subprocess.run([str(ROOT / "tools" / "build_deb.sh"), str(out)], capture_output=True,
                            text=True, timeout=1200, env=env)
    assert result.returncode == 0, f"build_deb.sh exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


def ir_files(xml: Path) -> list[Path]:
    return [xml, xml.with_suffix(".bin")]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def daemon_settings(workdir: Path, store_dir: Path, config: dict | None) -> dict:
    """A test daemon's settings: its socket and OpenVINO cache in `workdir`, the store polled
    often and few probe runs (fast tests), then `config` merged in by section."""
    settings = {"store": {"path": str(store_dir), "poll_interval_s": 0.2},
                "socket": {"path": str(workdir / "edged.sock")},
                "backends": {"openvino_cache_dir": str(workdir / "ov-cache"), "probe_runs": 5}}
    for section, values in (config or {}).items():
        settings.setdefault(section, {}).update(values)
    return settings


def _daemon_factory() -> Iterator:
    base = Path(tempfile.mkdtemp(prefix="edged-", dir="/tmp"))
    started: list[DaemonProcess] = []

    def start(store_dir: Path, config: dict | None = None, env: dict | None = None,
              ready: bool = True, **spawn) -> DaemonProcess:
        workdir = base / f"d{len(started)}"
        workdir.mkdir()
        daemon = DaemonProcess(workdir, daemon_settings(workdir, store_dir, config), env, **spawn)
        started.append(daemon)
        return daemon.wait_ready() if ready else daemon

    yield start
    for daemon in started:
        daemon.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def start_daemon() -> Iterator:
    """start_daemon(store_dir, config=None, env=None, ready=True, launcher=None, pass_fds=())
    -> DaemonProcess, stopped after the test."""
    yield from _daemon_factory()


@pytest.fixture(scope="module")
def start_module_daemon() -> Iterator:
    """Like start_daemon, for a daemon shared by the tests of one module."""
    yield from _daemon_factory()


def fill_sample_store(store: ModelStore, sample_models: dict[str, Path], tiny_ir: Path) -> ModelStore:
    fetch_tool = _load_fetch_tool()
    for name, path in sample_models.items():
        fetch_tool.add_sample(store, name, path)
        store.activate(name, "1")
    store.add("tiny", ir_files(tiny_ir), "1")
    store.activate("tiny", "1")
    return store


@pytest.fixture
def tiny_store(tmp_path: Path, tiny_ir: Path) -> ModelStore:
    """A store with one fast model: tiny 1 active."""
    store = ModelStore(tmp_path / "store")
    store.add("tiny", ir_files(tiny_ir), "1")
    store.activate("tiny", "1")
    return store


@pytest.fixture
def sample_store(tmp_path: Path, sample_models: dict[str, Path], tiny_ir: Path) -> ModelStore:
    """A store with face, selfie and tiny (the IR), version 1 active."""
    return fill_sample_store(ModelStore(tmp_path / "store"), sample_models, tiny_ir)


# --- MQTT: real Mosquitto brokers on free loopback ports (tests/broker.py) ---

from tests.broker import Broker, MosquittoMissing, Subscriber  # noqa: E402


def _broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started: list[Broker] = []

    def launch(mode: str = "anonymous", start: bool = True, **options) -> Broker:
        try:
            broker = Broker(tmp_path_factory.mktemp(f"broker-{mode}"), mode, **options)
        except MosquittoMissing as exc:
            pytest.fail(str(exc), pytrace=False)
        started.append(broker)
        return broker.start() if start else broker

    yield launch
    for broker in started:
        broker.kill()  # nothing of a test broker outlives its test, so no need for a clean stop


@pytest.fixture
def start_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """start_broker(mode="anonymous", start=True, **Broker options) -> Broker, gone after the test."""
    yield from _broker_factory(tmp_path_factory)


@pytest.fixture(scope="module")
def start_module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Like start_broker, for a broker shared by the tests of one module."""
    yield from _broker_factory(tmp_path_factory)


@pytest.fixture
def broker(start_broker) -> Broker:
    """A running anonymous broker of this test's own (starting one takes ~20 ms)."""
    return start_broker()


@pytest.fixture
def mqtt_subscriber(start_broker) -> Iterator:
    """mqtt_subscriber(broker, topics="#", **Subscriber options) -> a connected Subscriber,
    closed after the test. (It asks for start_broker only so that its clients close before
    the test's brokers go away.)"""
    clients: list[Subscriber] = []

    def connect(broker: Broker, topics: str | list[str] | None = "#", **options) -> Subscriber:
        client = Subscriber(broker, topics, **options)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
