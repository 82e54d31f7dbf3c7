"""Devices and delegates on the real runtimes. This machine has a CPU only, so an absent
GPU or NPU and a delegate that does not load are real faults here, not simulated ones."""

from __future__ import annotations

import ctypes.util
import logging

import numpy as np
import openvino as ov
import pytest

from edged.backends import get_backend
from edged.backends.base import LoadOptions
from edged.backends.selection import Candidate, candidates, select
from edged.config import load_settings
from edged.config.base import ConfigError
from edged.errors import BackendError

FACE_INPUT = np.random.default_rng(1).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
AVAILABLE = list(ov.Core().available_devices)
MISSING_DELEGATE = "/nonexistent/libedgetpu.so.1"
LIBM = ctypes.util.find_library("m")  # a real shared library that is no delegate

needs_no_gpu = pytest.mark.skipif(any(d.startswith("GPU") for d in AVAILABLE),
                                  reason="this machine has a GPU")
needs_no_npu = pytest.mark.skipif(any(d.startswith("NPU") for d in AVAILABLE),
                                  reason="this machine has an NPU")


def options(**openvino) -> dict[str, LoadOptions]:
    return {"openvino": LoadOptions(**openvino), "litert": LoadOptions()}


# --- the config --------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["CPU", "GPU", "GPU.1", "NPU", "AUTO", "AUTO:GPU,CPU", "HETERO:GPU,CPU",
                                    "HETERO:CPU"])
def test_every_device_form_is_accepted(device):
    assert load_settings(None, models={"face": {"device": device}}).models["face"].device == device


@pytest.mark.parametrize("device", ["gpu", "GPU1", "TPU", "AUTO:", "AUTO:GPU;CPU", "HETERO:GPU,GPU",
                                    "MULTI:CPU", "CPU "])
def test_a_bad_device_is_refused_at_load_with_the_forms(device):
    with pytest.raises(ConfigError) as info:
        load_settings(None, models={"face": {"device": device}})
    message = str(info.value)
    assert "models.face.device" in message and "AUTO:<devices>" in message and "\n" not in message


def test_device_belongs_to_openvino_and_delegate_to_litert():
    with pytest.raises(ConfigError, match="device is an OpenVINO setting"):
        load_settings(None, models={"face": {"backend": "litert", "device": "GPU"}})
    with pytest.raises(ConfigError, match="delegate is a LiteRT setting"):
        load_settings(None, models={"face": {"backend": "openvino",
                                             "delegate": {"library": "libedgetpu.so.1"}}})
    both = load_settings(None, models={"face": {"device": "AUTO", "delegate": {
        "library": "libedgetpu.so.1", "options": {"device": "usb"}}}}).models["face"]
    assert both.delegate is not None and both.delegate.options == {"device": "usb"}


# --- the candidates ----------------------------------------------------------------------

def test_auto_candidates_are_each_device_openvino_finds_then_litert():
    found = candidates("tflite", "auto", options())
    assert found == [*(Candidate("openvino", d) for d in AVAILABLE), Candidate("litert", "CPU")]
    assert found[0] == Candidate("openvino", "CPU")  # a tie goes to the CPU


def test_a_configured_device_or_delegate_narrows_or_adds_candidates():
    lite = {"openvino": LoadOptions(device="GPU"), "litert": LoadOptions(delegate="libedgetpu.so.1")}
    assert [c.label for c in candidates("tflite", "auto", lite)] == [
        "openvino/GPU", "litert/libedgetpu.so.1", "litert/CPU"]
    assert [c.label for c in candidates("tflite", "litert", lite)] == ["litert/libedgetpu.so.1"]
    assert [c.label for c in candidates("tflite", "openvino", options())] == ["openvino/CPU"]
    assert [c.label for c in candidates("openvino", "auto", lite)] == ["openvino/GPU"]


# --- absent OpenVINO devices -------------------------------------------------------------

@needs_no_gpu
@pytest.mark.parametrize("device", ["GPU", "GPU.1", "HETERO:GPU,CPU"])
def test_an_absent_gpu_is_one_clear_line(device, sample_models):
    with pytest.raises(BackendError) as info:
        get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions(), device)
    message = str(info.value)
    assert "\n" not in message and "libopenvino_intel_gpu_plugin" not in message  # not OpenVINO's C++ text
    assert "GPU" in message and "not present" in message
    assert f"OpenVINO finds {', '.join(AVAILABLE)}" in message


@needs_no_npu
def test_a_gpu_plugin_that_does_not_load_says_why(sample_models):
    """The pip wheel's GPU plugin needs an OpenCL runtime: without one, the line says so,
    which a machine with a GPU but no intel-opencl-icd needs to hear."""
    try:
        ov.Core().get_versions("GPU")
        pytest.skip("the GPU plugin loads here")
    except RuntimeError:
        pass
    why = r"; its GPU plugin does not load: lib\S+: cannot open shared object"
    with pytest.raises(BackendError, match=why):
        get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions(), "GPU")


def test_an_absent_npu_is_one_clear_line(sample_models):
    with pytest.raises(BackendError, match=r"^openvino: device NPU not present \(OpenVINO finds "):
        get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions(), "NPU")


@needs_no_gpu
def test_an_absent_gpu_falls_back_to_the_next_candidate_with_one_warning(sample_models, caplog):
    caplog.set_level(logging.INFO, logger="edged.backends")
    model, selection = select(sample_models["face"], "tflite", "auto", options(device="GPU"), probe_runs=2)
    try:
        assert selection.label == "litert/CPU" == f"{model.backend}/{model.device}"
        assert selection.probes["openvino/GPU"]["error"].startswith("openvino: device GPU not present")
        assert selection.probes["openvino/GPU"]["load_ms"] >= 0
        assert selection.reason.startswith(
            "only candidate able to run it (openvino/GPU failed: openvino: device")
        lines = [r for r in caplog.records if "openvino/GPU" in r.getMessage()]
        assert [r.levelno for r in lines] == [logging.WARNING], "one line, a warning: it was asked for"
    finally:
        model.close()


@needs_no_gpu
def test_an_absent_device_and_nothing_else_fails_cleanly(sample_models):
    with pytest.raises(BackendError) as info:
        select(sample_models["face"], "tflite", "openvino", options(device="GPU"), probe_runs=1)
    message = str(info.value)
    assert message.startswith("no backend can run face_detection_short_range.tflite (openvino/GPU: openvino: "
                              "device GPU not present") and "\n" not in message


# --- AUTO and HETERO ---------------------------------------------------------------------

@pytest.mark.parametrize("device", ["AUTO", "AUTO:CPU", "HETERO:CPU"])
def test_virtual_devices_run_at_the_precision_asked(device, sample_models):
    """The precision hint reaches the CPU under AUTO and HETERO (given per device): the
    outputs equal plain CPU f32 bit for bit, where this CPU would otherwise run bf16. The
    compiled AUTO model does not answer INFERENCE_PRECISION_HINT; the precision is read
    from its devices."""
    openvino, exact = get_backend("openvino"), LoadOptions(precision="f32")
    reference = openvino.load(sample_models["face"], "tflite", exact)
    model = openvino.load(sample_models["face"], "tflite", exact, device)
    try:
        assert (model.device, model.runs_on, model.precision) == (device, "CPU", "f32")
        np.testing.assert_array_equal(model.infer({"input": FACE_INPUT})["regressors"],
                                      reference.infer({"input": FACE_INPUT})["regressors"])
    finally:
        model.close()
        reference.close()


def test_auto_precision_follows_the_config(sample_models):
    openvino, fast = get_backend("openvino"), LoadOptions(precision="bf16")
    plain = openvino.load(sample_models["face"], "tflite", fast)
    auto = openvino.load(sample_models["face"], "tflite", fast, "AUTO")
    try:
        assert auto.precision == plain.precision  # bf16 where the CPU has it, else f32
    finally:
        plain.close()
        auto.close()


@needs_no_gpu
def test_auto_keeps_the_devices_of_its_list_that_are_present(sample_models, caplog):
    caplog.set_level(logging.INFO, logger="edged.backends")
    model = get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions(), "AUTO:GPU,CPU")
    try:
        assert model.device == "AUTO:GPU,CPU" and model.runs_on == "CPU"
        assert model.infer({"input": FACE_INPUT})["regressors"].shape == (1, 896, 16)
    finally:
        model.close()
    [line] = [r.getMessage() for r in caplog.records if "AUTO:GPU,CPU" in r.getMessage()]
    assert line.startswith(f"AUTO:GPU,CPU: GPU not present, AUTO chooses among CPU (OpenVINO finds "
                           f"{', '.join(AVAILABLE)} on this machine")


def test_auto_is_a_candidate_with_its_figures(sample_models):
    model, selection = select(sample_models["face"], "tflite", "auto", options(device="AUTO"), probe_runs=2)
    try:
        assert set(selection.probes) == {"openvino/AUTO", "litert/CPU"}
        auto = selection.probes["openvino/AUTO"]
        assert auto["runs_on"] == "CPU" and auto["p50_ms"] > 0 and auto["load_ms"] > 0
        assert selection.reason.startswith("fastest in probe (")
    finally:
        model.close()


# --- LiteRT delegates --------------------------------------------------------------------

def test_a_missing_delegate_library_is_one_clear_line(sample_models):
    with pytest.raises(BackendError) as info:
        get_backend("litert").load(sample_models["face"], "tflite", LoadOptions(delegate=MISSING_DELEGATE),
                                   MISSING_DELEGATE)
    assert str(info.value) == (f"litert: delegate {MISSING_DELEGATE} cannot be loaded: {MISSING_DELEGATE}: "
                               "cannot open shared object file: No such file or directory")


@pytest.mark.skipif(LIBM is None, reason="no libm found to stand for a library that is no delegate")
def test_a_library_that_is_no_delegate_is_one_clear_line(sample_models):
    with pytest.raises(BackendError) as info:
        get_backend("litert").load(sample_models["face"], "tflite", LoadOptions(delegate=LIBM), LIBM)
    assert str(info.value) == (f"litert: {LIBM} is not a LiteRT delegate (no tflite_plugin_create_delegate, "
                               "tflite_plugin_destroy_delegate)")


@pytest.mark.skipif(LIBM is None, reason="no libm found to stand for a library that is no delegate")
@pytest.mark.parametrize("library", [MISSING_DELEGATE, LIBM])
def test_a_delegate_that_does_not_load_falls_back_to_litert_on_the_cpu(library, sample_models):
    """Under auto: the delegate is one more candidate; it fails with its reason and LiteRT on
    the CPU (or OpenVINO) serves."""
    lite = {"openvino": LoadOptions(), "litert": LoadOptions(delegate=library)}
    model, selection = select(sample_models["selfie"], "tflite", "auto", lite, probe_runs=2)
    try:
        assert selection.label == "litert/CPU"
        assert f"litert/{library}" in selection.probes and "error" in selection.probes[f"litert/{library}"]
        assert f"litert/{library} failed: litert:" in selection.reason
    finally:
        model.close()
    explicit = rf"^no backend can run selfie_segmentation.tflite \(litert/{library}: "
    with pytest.raises(BackendError, match=explicit):
        select(sample_models["selfie"], "tflite", "litert", lite, probe_runs=1)
