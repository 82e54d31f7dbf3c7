"""Accelerators as an operator meets them on a CPU-only machine: a configured GPU and an
Edge TPU delegate that are not there. The daemon serves on what is, says why in one line
each, and `edged status` shows every candidate with its figures or its reason."""

from __future__ import annotations

import openvino as ov
import pytest

from tests.test_cli import edged

MISSING_DELEGATE = "/nonexistent/libedgetpu.so.1"

pytestmark = pytest.mark.skipif(
    any(d.split(".")[0] in ("GPU", "NPU") for d in ov.Core().available_devices),
    reason="this machine has a GPU or NPU: nothing here is absent")


def test_absent_gpu_and_delegate_leave_face_on_what_is_present(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, {"models": {
        "face": {"device": "GPU", "delegate": {"library": MISSING_DELEGATE, "options": {"device": "usb"}}},
        "tiny": {"backend": "openvino", "device": "AUTO"}}})
    with daemon.client() as client:
        models = client.status()["models"]
    face = models["face"]
    assert face["state"] == "ready" and (face["backend"], face["device"]) == ("litert", "CPU")
    assert set(face["probes"]) == {"openvino/GPU", f"litert/{MISSING_DELEGATE}", "litert/CPU"}
    assert face["probes"]["openvino/GPU"]["error"].startswith("openvino: device GPU not present")
    assert "cannot open shared object file" in face["probes"][f"litert/{MISSING_DELEGATE}"]["error"]
    assert face["ranking"] == ["litert/CPU"] and face["probes"]["litert/CPU"]["p50_ms"] > 0
    tiny = models["tiny"]
    assert (tiny["backend"], tiny["device"], tiny["precision"]) == ("openvino", "AUTO", "f32")
    assert tiny["reason"] == "openvino/AUTO set in config"
    assert tiny["probes"]["openvino/AUTO"]["runs_on"] == "CPU"

    log = daemon.output()
    assert "face 1 (litert), selfie 1 (litert), tiny 1 (openvino/AUTO)" in log  # a device beside its runtime
    for failed in ("face_detection_short_range.tflite: openvino/GPU failed: openvino: device GPU not present",
                   f"face_detection_short_range.tflite: litert/{MISSING_DELEGATE} failed: litert: delegate"):
        assert len([line for line in log.splitlines() if failed in line]) == 1, log

    text = edged("status", "--socket", str(daemon.socket)).stdout
    [face_line] = [line for line in text.splitlines() if line.startswith("  face ")]
    assert " litert/CPU " in face_line
    candidates = text.splitlines()[text.splitlines().index(face_line) + 1].strip()
    assert candidates.startswith("candidates: openvino/GPU failed: openvino: device GPU not present")
    delegate = f"litert/{MISSING_DELEGATE} failed: litert: delegate {MISSING_DELEGATE} cannot be loaded"
    assert delegate in candidates
    assert "; litert/CPU " in candidates and " ms to load" in candidates


def test_a_configured_device_that_is_absent_fails_the_check_cleanly(tiny_store, tmp_path):
    config = tmp_path / "edged.toml"
    config.write_text('[models.tiny]\nbackend = "openvino"\ndevice = "NPU"\n')
    result = edged("run", "--check", "--config", str(config), "--store", str(tiny_store.root), check=False)
    assert result.returncode == 1, result.stderr
    [line] = result.stdout.splitlines()
    found = ", ".join(ov.Core().available_devices)
    assert line.startswith("tiny: failed: tiny 1: no backend can run tiny.xml (openvino/NPU: openvino: "
                           f"device NPU not present (OpenVINO finds {found} on this machine")


def test_a_bad_device_string_is_refused_before_anything_loads(tiny_store, tmp_path):
    config = tmp_path / "edged.toml"
    config.write_text('[models.tiny]\ndevice = "GPU0"\n')
    result = edged("run", "--check", "--config", str(config), "--store", str(tiny_store.root), check=False)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "models.tiny.device" in line and "not one of the OpenVINO device forms" in line
