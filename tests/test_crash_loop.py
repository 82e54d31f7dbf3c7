"""No crash loop: a runtime that kills the daemon while loading a model is skipped at the
next start. The crash is real: EDGED_TEST_CRASH_BACKEND (a test-only switch in
edged/backends/selection.py) aborts the daemon right before that backend loads a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edged.backends.selection import TEST_CRASH_VARIABLE
from edged.models.attempts import DIRECTORY
from edged.models.store import ModelStore
from tests.broker import Broker
from tests.conftest import _load_fetch_tool

CRASH = {TEST_CRASH_VARIABLE: "openvino"}
SKIPPED = "openvino on CPU crashed the daemon while loading {} (runtime openvino "
FACE_INPUT = {"input": np.zeros((1, 128, 128, 3), np.float32)}


@pytest.fixture
def face_store(tmp_path: Path, sample_models: dict[str, Path]) -> ModelStore:
    """face 1 active: a model both OpenVINO and LiteRT read."""
    store = ModelStore(tmp_path / "store")
    _load_fetch_tool().add_sample(store, "face", sample_models["face"])
    store.activate("face", "1")
    return store


def config_for(tmp_path: Path, **more: dict) -> dict:
    # One compiled-model cache for every start: the cache directory is part of the
    # configuration a crash is remembered with, and the fixture would give each its own.
    return {"backends": {"openvino_cache_dir": str(tmp_path / "ov-cache")}, **more}


def crashes(daemon) -> None:
    assert daemon.proc.wait(timeout=120) == -signal.SIGABRT, daemon.output()
    assert "test-only switch" in daemon.output()


def model_status(daemon, name: str) -> dict:
    with daemon.client() as client:
        return client.status()["models"][name]


def test_a_backend_that_crashed_the_daemon_is_skipped_until_a_new_version(
        start_daemon, face_store, sample_models, tmp_path):
    config = config_for(tmp_path)
    crashes(start_daemon(face_store.root, config, CRASH, ready=False))
    assert list((face_store.root / DIRECTORY).glob("*.json")), "the attempt is on record"

    second = start_daemon(face_store.root, config, CRASH)  # the switch still set: no crash now
    face = model_status(second, "face")
    assert face["state"] == "ready" and face["backend"] == "litert"
    assert face["skipped"].startswith(SKIPPED.format("face 1"))
    assert face["skipped"].endswith("not tried again until the model version, the runtime version "
                                    "or the config changes")
    with second.client() as client:
        assert client.infer("face", FACE_INPUT)

    # A new version is a new combination: OpenVINO is tried on it, and (switch set) crashes.
    _load_fetch_tool().add_sample(face_store, "face", sample_models["face"], version="2")
    face_store.activate("face", "2")
    crashes(second)

    third = start_daemon(face_store.root, config)  # no switch: the record alone keeps it off
    face = model_status(third, "face")
    assert face["version"] == "2" and face["backend"] == "litert"
    assert face["skipped"].startswith(SKIPPED.format("face 2"))


def test_a_runtime_that_crashed_while_listing_its_devices_is_skipped(start_daemon, face_store, tmp_path):
    """A runtime that dies on import, or a driver that dies while devices are listed, happens
    before any candidate loads: that step is on record too, or systemd would restart into it."""
    config = config_for(tmp_path)
    crashes(start_daemon(face_store.root, config, {TEST_CRASH_VARIABLE: "openvino@devices"}, ready=False))
    assert list((face_store.root / DIRECTORY).glob("*.json")), "the listing is on record"

    second = start_daemon(face_store.root, config, {TEST_CRASH_VARIABLE: "openvino@devices"})
    face = model_status(second, "face")
    assert face["state"] == "ready" and face["backend"] == "litert"
    assert face["skipped"].startswith("openvino crashed the daemon while listing its devices for face 1 "
                                      "(runtime openvino ")
    assert face["probes"]["openvino"]["skipped"] is True
    with second.client() as client:
        assert client.infer("face", FACE_INPUT)


def test_a_model_only_the_crashing_backend_reads_fails_until_the_config_changes(
        start_daemon, tiny_store, tmp_path):
    config = config_for(tmp_path)
    crashes(start_daemon(tiny_store.root, config, CRASH, ready=False))

    second = start_daemon(tiny_store.root, config, CRASH)
    tiny = model_status(second, "tiny")
    assert tiny["state"] == "failed"
    assert tiny["skipped"].startswith(SKIPPED.format("tiny 1"))
    assert tiny["skipped"] in tiny["error"]

    # `edged run --check` honours the record: it says so rather than crashing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")} | CRASH
    check = subprocess.run([sys.executable, "-m", "edged", "run", "--check", "--config",
                            str(second.config_path)], capture_output=True, text=True, env=env,
                           timeout=120)
    assert check.returncode == 1, check.stderr
    assert "tiny: failed: " in check.stdout and SKIPPED.format("tiny 1") in check.stdout
    second.stop()

    # A changed [models.tiny] table is a new combination: tried again, and crashes again.
    changed = config_for(tmp_path, models={"tiny": {"reject_non_finite": False}})
    crashes(start_daemon(tiny_store.root, changed, CRASH, ready=False))

    # `edged models retry` forgets the records: tried again (no switch now), and served.
    retry = subprocess.run([sys.executable, "-m", "edged", "models", "retry", "tiny", "--store",
                            str(tiny_store.root)], capture_output=True, text=True, env=env, timeout=60)
    assert retry.returncode == 0, retry.stderr
    assert retry.stdout.startswith("tiny: 2 crash records deleted"), retry.stdout
    assert not list((tiny_store.root / DIRECTORY).glob("*.json"))
    fourth = start_daemon(tiny_store.root, changed)
    tiny = model_status(fourth, "tiny")
    assert tiny["state"] == "ready" and tiny["backend"] == "openvino" and "skipped" not in tiny


def test_the_skip_is_published_as_an_event(start_daemon, broker: Broker, mqtt_subscriber, face_store,
                                           tmp_path):
    device = "cam-1"
    events = mqtt_subscriber(broker, f"edged/devices/{device}/events")
    config = config_for(tmp_path, mqtt={
        "enabled": True, "host": broker.host, "port": broker.port, "device_id": device,
        "outbox_path": str(tmp_path / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0})
    crashes(start_daemon(face_store.root, config, CRASH, ready=False))
    start_daemon(face_store.root, config, CRASH)
    skipped = events.wait_for(lambda m: m.json()["kind"] == "model_skipped", timeout=30).json()
    assert skipped["model"] == "face" and skipped["version"] == "1" and skipped["backend"] == "openvino"
    assert skipped["device"] == "CPU"
    assert skipped["reason"].startswith(SKIPPED.format("face 1"))
    assert skipped["runtime"].startswith("openvino ")
    loaded = events.wait_for(lambda m: m.json()["kind"] == "model_loaded", timeout=30).json()
    assert (loaded["backend"], loaded["device"]) == ("litert", "CPU") and loaded["seq"] > skipped["seq"]
