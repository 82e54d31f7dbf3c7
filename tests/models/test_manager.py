"""The model manager on real models: loading, failures, hot swap, runtime fallback."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edged.config import load_settings
from edged.errors import BackendError, ModelNotFound, ModelUnavailable
from edged.models.lifecycle import ModelEvents
from edged.models.manager import ModelManager
from tests.conftest import build_tiny_ir, ir_files, wait_until

X = np.array([[1, 2, -3, 0.5]], np.float32)


def make_manager(store, tmp_path, events: ModelEvents | None = None, **backends) -> ModelManager:
    settings = load_settings(
        None, store={"path": str(store.root)},
        backends={"openvino_cache_dir": str(tmp_path / "cache"), "probe_runs": 3, **backends},
    )
    manager = ModelManager(store, settings, events)
    manager.load_all()
    return manager


def test_loads_every_active_model(sample_store, tmp_path):
    manager = make_manager(sample_store, tmp_path)
    try:
        status = manager.status()
        assert {n: s["state"] for n, s in status.items()} == {
            "face": "ready", "selfie": "ready", "tiny": "ready"
        }
        assert status["selfie"]["backend"] == "litert"
        assert status["tiny"]["backend"] == "openvino"
        assert manager.ready()
        result = manager.infer("tiny", {"x": X})
        np.testing.assert_array_equal(result.outputs["y"], [[3, 5, 0, 2]])
        assert result.model.version == "1"
    finally:
        manager.close()


def test_a_model_that_cannot_load_fails_alone(sample_store, tmp_path):
    version_dir = sample_store.version_dir("face", "1")
    (version_dir / "face_detection_short_range.tflite").write_bytes(b"not a model")
    manager = make_manager(sample_store, tmp_path)
    try:
        with pytest.raises(ModelUnavailable) as info:
            manager.infer("face", {"input": np.zeros((1, 128, 128, 3), np.float32)})
        assert "\n" not in str(info.value)
        assert "face 1:" in str(info.value) and "bytes, manifest says" in str(info.value)
        assert manager.status()["face"]["state"] == "failed"
        assert manager.infer("tiny", {"x": X}).outputs["y"].shape == (1, 4)
        with pytest.raises(ModelNotFound):
            manager.infer("nosuch", {"x": X})
    finally:
        manager.close()


def test_hot_swap_fails_no_request(sample_store, tmp_path):
    manager = make_manager(sample_store, tmp_path)
    v2 = build_tiny_ir(tmp_path / "v2", scale=3.0)
    sample_store.add("tiny", ir_files(v2), "2")
    failures: list[Exception] = []
    seen: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                result = manager.infer("tiny", {"x": X})
                expected = {"1": [[3, 5, 0, 2]], "2": [[4, 7, 0, 2.5]]}[result.model.version]
                np.testing.assert_array_equal(result.outputs["y"], expected)
                seen.add(result.model.version)
            except Exception as exc:
                failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    sample_store.activate("tiny", "2")
    manager.sync()
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    manager.close()
    assert failures == []
    assert seen == {"1", "2"}


def test_a_failing_backend_hands_the_model_to_the_next(sample_store, tmp_path):
    """A runtime that fails on every input, the probe's too, is the backend's fault. No real
    runtime can be made to do that on demand (a model that fails on some inputs is the
    inputs' fault: see the reshape tests below), so this one fault is injected."""
    manager = make_manager(sample_store, tmp_path, fallback_after_errors=2, fallback_retry_s=3600)
    try:
        served = manager.get("face")
        first = served.selection.label

        def broken_infer(inputs, into=None):  # a fault the real runtime cannot produce on demand
            raise RuntimeError("device lost")

        served.loaded.infer = broken_infer
        x = {"input": np.zeros((1, 128, 128, 3), np.float32)}
        for _ in range(2):
            with pytest.raises(BackendError, match=r"inference failed: device lost$"):
                manager.infer("face", x)
        wait_until(lambda: manager.get("face") is not served, timeout=30, what="the fallback")
        moved = manager.get("face")  # described before it is served: no reader sees less
        assert moved.selection.label != first
        assert moved.selection.reason == f"fallback from {first} after 2 errors (device lost)"
        assert manager.infer("face", x).outputs["regressors"].shape == (1, 896, 16)
        assert manager.stats["face"].errors == 2
        # When the retry time comes, the faster backend is probed again.
        manager.sync()
        assert manager.get("face") is moved
        moved.retry_at = time.monotonic()
        manager.sync()
        again = manager.get("face")
        assert again is not moved and again.retry_at is None
        assert "fastest in probe" in again.selection.reason
    finally:
        manager.close()


def test_unversioned_and_versioned_lookup(sample_store, tmp_path):
    manager = make_manager(sample_store, tmp_path)
    try:
        assert manager.get("tiny", "1").version == "1"
        with pytest.raises(ModelNotFound, match="the active version is 1"):
            manager.get("tiny", "7")
    finally:
        manager.close()


def test_a_new_version_that_fails_leaves_the_old_one_serving(sample_store, tmp_path):
    events: list[tuple[str, dict]] = []
    record = ModelEvents.each(lambda e: events.append((e.kind, e.as_dict())))
    manager = make_manager(sample_store, tmp_path, record)
    events.clear()  # what the first load said
    try:
        garbage = tmp_path / "garbage.tflite"
        garbage.write_bytes(b"TFL3" + bytes(range(256)) * 4)
        sample_store.add("face", [garbage], "2")
        sample_store.activate("face", "2")
        for _ in range(3):  # tried once, not on every poll
            manager.sync()
        assert [kind for kind, _ in events] == ["model_failed"]
        status = manager.status()["face"]
        assert status["state"] == "ready" and status["version"] == "1"
        assert status["error"].startswith("face 2: no backend can run garbage.tflite")
        x = {"input": np.zeros((1, 128, 128, 3), np.float32)}
        assert manager.infer("face", x).model.version == "1"
        sample_store.rollback("face")  # back to 1: the failure no longer applies
        manager.sync()
        assert "error" not in manager.status()["face"]
    finally:
        manager.close()


def test_an_unreadable_pointer_keeps_the_model_serving(sample_store, tmp_path):
    manager = make_manager(sample_store, tmp_path)
    try:
        (sample_store.root / "tiny" / ".active.json").write_text("{broken")
        manager.sync()
        assert manager.infer("tiny", {"x": X}).model.version == "1"
        assert "unreadable active pointer" in manager.status()["tiny"]["error"]
    finally:
        manager.close()
