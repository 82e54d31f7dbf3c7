"""A runtime that raised during inference is replaced, on real runtimes and real models
whose inference fails on some inputs (tests/backends/reshape_models.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edged.backends import get_backend
from edged.backends.base import LoadOptions, WarmPool
from edged.backends.faults import run_checked
from edged.errors import BackendError, InputRejected
from tests.backends.reshape_models import (
    BAD_ROWS,
    build_reshape_onnx,
    build_reshape_tflite,
    expected,
    reshape_inputs,
)

CASES = {  # id: (backend, builder, model format, dtype of `rows`)
    "openvino-onnx": ("openvino", build_reshape_onnx, "onnx", np.int64),
    "openvino-tflite": ("openvino", build_reshape_tflite, "tflite", np.int32),
    "litert-tflite": ("litert", build_reshape_tflite, "tflite", np.int32),
}


@pytest.fixture(params=list(CASES))
def reshape_model(request, tmp_path):
    """(loaded model with one runtime, so a reused one would show, dtype of rows)."""
    backend, build, model_format, dtype = CASES[request.param]
    path = build(tmp_path / "model")
    model = get_backend(backend).load(path, model_format, LoadOptions(workers=1))
    yield model, dtype
    model.close()


def test_the_models_run_and_fail_as_built(reshape_model):
    model, dtype = reshape_model
    assert [(s.name, s.shape) for s in model.inputs] == [("x", (2, 6)), ("rows", (1,))]
    np.testing.assert_array_equal(model.infer(reshape_inputs(3, dtype))["y"], expected(3))
    with pytest.raises(Exception):  # noqa: B017 - whatever the runtime raises
        model.infer(reshape_inputs(BAD_ROWS, dtype))


def test_a_runtime_that_raised_never_answers_again(reshape_model):
    """Before the fix, OpenVINO answered the second bad call with the first good call's
    (3, 4) shape, and later ones with the last good call's."""
    model, dtype = reshape_model
    answers = []
    for rows in (3, BAD_ROWS, BAD_ROWS, BAD_ROWS, 4, BAD_ROWS, 6, BAD_ROWS, BAD_ROWS, 12):
        try:
            answers.append((rows, model.infer(reshape_inputs(rows, dtype))["y"]))
        except Exception:
            answers.append((rows, None))
    assert [rows for rows, out in answers if out is None] == [BAD_ROWS] * 6
    for rows, out in answers:
        if out is not None:
            np.testing.assert_array_equal(out, expected(rows))


def test_a_rejected_input_gets_one_clear_line_every_time(reshape_model):
    model, dtype = reshape_model
    messages = []
    for _ in range(3):
        with pytest.raises(InputRejected) as info:
            run_checked(model, reshape_inputs(BAD_ROWS, dtype), "reshape 1")
        messages.append(str(info.value))
    assert len(set(messages)) == 1, messages  # LiteRT's old errors do not pile up
    message = messages[0]
    assert "\n" not in message and not message.startswith(("Exception from", "Check "))
    assert ("(5.-1)" in message) if model.backend == "openvino" else ("12 != 10" in message)
    np.testing.assert_array_equal(run_checked(model, reshape_inputs(2, dtype), "reshape 1")["y"],
                                  expected(2))


def test_a_runtime_that_cannot_be_rebuilt_is_the_backends_fault(tmp_path):
    """OpenVINO compiles afresh from the model's file after an error; with the file gone
    (a real fault), nothing runs, the probe neither: a BackendError, for every input, until
    the file is back. (A LiteRT interpreter is rebuilt from bytes in memory: it cannot fail so.)"""
    path = build_reshape_onnx(tmp_path / "model")
    model = get_backend("openvino").load(path, "onnx", LoadOptions(cache_dir=tmp_path / "cache"))
    away = path.rename(tmp_path / "away.onnx")
    try:
        for rows in (BAD_ROWS, 3):
            with pytest.raises(BackendError) as info:
                run_checked(model, reshape_inputs(rows), "reshape 1")
            assert "Could not open the file" in str(info.value) and "\n" not in str(info.value)
        away.rename(path)
        np.testing.assert_array_equal(run_checked(model, reshape_inputs(3), "reshape 1")["y"], expected(3))
        with pytest.raises(InputRejected):
            run_checked(model, reshape_inputs(BAD_ROWS), "reshape 1")
    finally:
        model.close()


def test_good_and_bad_callers_never_cross_outputs(tmp_path):
    options = LoadOptions(workers=2, cache_dir=tmp_path / "cache")  # each error compiles afresh
    model = get_backend("openvino").load(build_reshape_onnx(tmp_path), "onnx", options)
    wrong: list[str] = []

    def call(rows: int, scale: float) -> None:
        x = np.arange(12, dtype=np.float32).reshape(2, 6) * scale
        for _ in range(40):
            try:
                out = model.infer(reshape_inputs(rows, x=x))["y"]
            except Exception:
                if rows != BAD_ROWS:
                    wrong.append(f"rows {rows} failed")
                continue
            if rows == BAD_ROWS or not np.array_equal(out, expected(rows, x)):
                wrong.append(f"rows {rows} answered {out.shape}")

    threads = [threading.Thread(target=call, args=(rows, i + 1.0))
               for i, rows in enumerate((3, BAD_ROWS, 4, BAD_ROWS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model.close()
    assert wrong == []


def test_a_slot_whose_rebuild_fails_is_built_when_next_lent():
    built = iter(["fresh", RuntimeError("out of memory"), "second"])

    def build() -> str:
        item = next(built)
        if isinstance(item, Exception):
            raise item
        return item

    pool: WarmPool[str] = WarmPool(["first"], build)
    with pytest.raises(ValueError), pool.borrow():
        raise ValueError("runtime error")
    with pool.borrow() as item:  # "first" was dropped, "fresh" took its place
        assert item == "fresh"
    with pytest.raises(ValueError), pool.borrow():
        raise ValueError("again")  # and this rebuild fails: the slot stays, empty
    assert len(pool) == 1
    with pool.borrow() as item:
        assert item == "second"
    assert pool.drain() == ["second"]
