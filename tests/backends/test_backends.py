"""Both backends on the real sample models and a tiny IR built in code."""

from __future__ import annotations

import numpy as np
import pytest

from edged.backends import BACKENDS, READS, candidates_for, get_backend
from edged.backends.base import LoadOptions
from edged.backends.selection import probe_input, select
from edged.errors import BackendError

FACE_INPUT = np.random.default_rng(1).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)


@pytest.mark.parametrize("backend", ["openvino", "litert"])
def test_face_model_specs_and_outputs(backend, sample_models):
    model = get_backend(backend).load(sample_models["face"], "tflite", LoadOptions(workers=2))
    try:
        assert model.backend == backend
        assert model.precision == "f32"
        assert [(s.name, s.shape, s.dtype) for s in model.inputs] == [
            ("input", (1, 128, 128, 3), np.dtype(np.float32))
        ]
        shapes = {s.name: s.shape for s in model.outputs}
        assert shapes == {"regressors": (1, 896, 16), "classificators": (1, 896, 1)}
        out = model.infer({"input": FACE_INPUT})
        assert out["regressors"].shape == (1, 896, 16)
        assert np.isfinite(out["classificators"]).all()
        again = model.infer({"input": FACE_INPUT})
        np.testing.assert_array_equal(out["regressors"], again["regressors"])
    finally:
        model.close()


def test_backends_agree_on_face_at_f32(sample_models):
    ov = get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions())
    lite = get_backend("litert").load(sample_models["face"], "tflite", LoadOptions())
    a, b = ov.infer({"input": FACE_INPUT}), lite.infer({"input": FACE_INPUT})
    np.testing.assert_allclose(a["classificators"], b["classificators"], atol=1e-3)
    np.testing.assert_allclose(a["regressors"], b["regressors"], atol=1e-2)
    ov.close()
    lite.close()


def test_openvino_precision_is_explicit_and_recorded(sample_models):
    exact = get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions(precision="f32"))
    fast = get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions(precision="bf16"))
    assert exact.precision == "f32"
    assert fast.precision in ("bf16", "f32")  # f32 where the CPU has no bf16 support
    exact.close()
    fast.close()


def test_tiny_ir_runs_exactly_on_openvino(tiny_ir):
    model = get_backend("openvino").load(tiny_ir, "openvino", LoadOptions())
    out = model.infer({"x": np.array([[1, 2, -3, 0.5]], np.float32)})
    np.testing.assert_array_equal(out["y"], np.array([[3, 5, 0, 2]], np.float32))
    model.close()


@pytest.mark.parametrize("backend", ["openvino", "litert"])
def test_outputs_go_into_the_callers_arrays_and_only_for_that_call(backend, sample_models):
    """`into`: OpenVINO writes a fitting output into the caller's array itself and returns
    that array; the next call without `into` must not write there again. An array that does
    not fit (wrong dtype), and every output on LiteRT, come back as the runtime's own."""
    model = get_backend(backend).load(sample_models["face"], "tflite", LoadOptions())
    try:
        expected = model.infer({"input": FACE_INPUT})
        place = np.full((1, 896, 16), -7.0, np.float32)
        misfit = np.zeros((1, 896, 1), np.float64)
        out = model.infer({"input": FACE_INPUT}, {"regressors": place, "classificators": misfit})
        np.testing.assert_array_equal(out["regressors"], expected["regressors"])
        np.testing.assert_array_equal(out["classificators"], expected["classificators"])
        assert (out["regressors"] is place) == (backend == "openvino")
        if backend == "litert":
            assert (place == -7.0).all()  # untouched
        assert out["classificators"] is not misfit and not misfit.any()
        written = place.copy()
        other = np.random.default_rng(2).uniform(-1, 1, FACE_INPUT.shape).astype(np.float32)
        fresh = model.infer({"input": other})
        np.testing.assert_array_equal(place, written)  # the last caller's array is left alone
        assert not np.array_equal(fresh["regressors"], expected["regressors"])
        again = model.infer({"input": FACE_INPUT})
        np.testing.assert_array_equal(again["regressors"], expected["regressors"])
    finally:
        model.close()


def test_litert_refuses_openvino_ir(tiny_ir):
    with pytest.raises(BackendError, match="litert cannot read 'openvino'"):
        get_backend("litert").load(tiny_ir, "openvino", LoadOptions())


def test_candidates_follow_the_format():
    assert candidates_for("tflite") == ["openvino", "litert"]
    assert candidates_for("openvino") == ["openvino"]
    assert candidates_for("onnx") == ["openvino"]


def test_unknown_backend_is_named():
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        get_backend("tpu")


def test_selfie_ends_on_litert_with_the_reason(sample_models):
    options = {"openvino": LoadOptions(), "litert": LoadOptions()}
    model, selection = select(sample_models["selfie"], "tflite", "auto", options, probe_runs=3)
    try:
        assert selection.backend == "litert" == model.backend
        assert "Convolution2DTransposeBias" in selection.probes["openvino/CPU"]["error"]
        assert selection.reason.startswith("only candidate able to run it")
        assert selection.ranking == ["litert/CPU"]
    finally:
        model.close()


def test_auto_probes_every_candidate_and_keeps_the_fastest(sample_models):
    options = {"openvino": LoadOptions(), "litert": LoadOptions()}
    model, selection = select(sample_models["face"], "tflite", "auto", options, probe_runs=5)
    try:
        assert set(selection.probes) == {"openvino/CPU", "litert/CPU"}
        times = {name: probe["p50_ms"] for name, probe in selection.probes.items()}
        assert selection.label == min(times, key=times.get)
        assert selection.ranking == sorted(times, key=times.get)
        assert "fastest in probe" in selection.reason
    finally:
        model.close()


def test_explicit_backend_is_honoured(sample_models):
    options = {"openvino": LoadOptions(), "litert": LoadOptions()}
    model, selection = select(sample_models["face"], "tflite", "litert", options, probe_runs=5)
    assert selection.backend == "litert"
    assert selection.reason == "litert/CPU set in config"
    model.close()


def test_model_no_backend_can_run_gives_one_clear_error(tmp_path):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"TFL3" + bytes(range(256)) * 8)
    options = {"openvino": LoadOptions(), "litert": LoadOptions()}
    with pytest.raises(BackendError) as info:
        select(broken, "tflite", "auto", options, probe_runs=1)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("no backend can run broken.tflite")
    assert "openvino/CPU:" in message and "litert/CPU:" in message


def test_missing_backend_package_is_skipped_with_reason(sample_models, monkeypatch):
    monkeypatch.setitem(BACKENDS, "ghost", "edged.backends.ghost_runtime:GhostBackend")
    monkeypatch.setitem(READS, "ghost", frozenset({"tflite"}))
    options = {"openvino": LoadOptions(), "litert": LoadOptions(), "ghost": LoadOptions()}
    model, selection = select(sample_models["face"], "tflite", "auto", options, probe_runs=2)
    assert "ghost backend unavailable" in selection.probes["ghost"]["error"]
    assert selection.backend in ("openvino", "litert")
    model.close()


def test_probe_input_fits_the_specs(tiny_ir):
    model = get_backend("openvino").load(tiny_ir, "openvino", LoadOptions())
    inputs = probe_input(model.inputs)
    assert inputs["x"].shape == (1, 4) and inputs["x"].dtype == np.float32
    model.close()


def test_openvino_takes_read_only_and_strided_inputs(tiny_ir):
    model = get_backend("openvino").load(tiny_ir, "openvino", LoadOptions())
    read_only = np.frombuffer(np.array([[1, 2, -3, 0.5]], np.float32).tobytes(), np.float32).reshape(1, 4)
    np.testing.assert_array_equal(model.infer({"x": read_only})["y"], [[3, 5, 0, 2]])
    model.close()


def test_onnx_model_runs_on_openvino_through_the_store(tmp_path):
    """An ONNX model written in code, added to a store and picked by auto selection."""
    import onnx
    from onnx import TensorProto, helper

    from edged.config import load_settings
    from edged.models.manager import ModelManager
    from edged.models.store import ModelStore

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "double", [x], [y], [two])
    path = tmp_path / "double.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    store = ModelStore(tmp_path / "store")
    assert store.add("double", [path], "1").format == "onnx"
    store.activate("double", "1")
    settings = load_settings(None, store={"path": str(store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "cache")})
    manager = ModelManager(store, settings)
    manager.load_all()
    result = manager.infer("double", {"x": np.array([[1, 2, 3, 4]], np.float32)})
    np.testing.assert_array_equal(result.outputs["y"], [[2, 4, 6, 8]])
    assert result.model.selection.backend == "openvino"
    manager.close()
