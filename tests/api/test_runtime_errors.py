"""Issue 10, case 5, end to end: a real daemon serving models whose inference fails at
run time on some inputs (tests/backends/reshape_models.py), asked over its socket."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edged.client import ClientError
from edged.models.store import ModelStore
from tests.backends.reshape_models import (
    BAD_ROWS,
    build_reshape_onnx,
    build_reshape_tflite,
    expected,
    reshape_inputs,
)

MODELS = {"reshape": np.int64, "reshape_lite": np.int32}  # ONNX on OpenVINO, TFLite on LiteRT


@pytest.fixture(scope="module")
def daemon(start_module_daemon, tmp_path_factory):
    root = tmp_path_factory.mktemp("reshape")
    store = ModelStore(root / "store")
    store.add("reshape", [build_reshape_onnx(root / "onnx")], "1")
    store.add("reshape_lite", [build_reshape_tflite(root / "tflite")], "1")
    for name in MODELS:
        store.activate(name, "1")
    return start_module_daemon(store.root, config={
        "backends": {"fallback_after_errors": 2, "workers": 2},
        "models": {"reshape_lite": {"backend": "litert"}},
    })


@pytest.mark.parametrize("model", list(MODELS))
def test_bad_requests_are_400_in_one_line_and_never_stale(daemon, model):
    dtype = MODELS[model]
    with daemon.client() as client:
        np.testing.assert_array_equal(client.infer(model, reshape_inputs(3, dtype))["y"], expected(3))
        statuses, messages = [], set()
        for _ in range(6):  # before the fix: 500 with a C++ dump, then 200 with the (3, 4) output
            with pytest.raises(ClientError) as info:
                client.infer(model, reshape_inputs(BAD_ROWS, dtype))
            statuses.append(info.value.status)
            messages.add(info.value.message)
        assert statuses == [400] * 6
        assert len(messages) == 1
        message = messages.pop()
        assert message.startswith(f"{model} 1 on ") and ": the model rejected these inputs: " in message
        assert "\n" not in message and "Exception from" not in message
        for rows in (4, 6, 12):
            np.testing.assert_array_equal(client.infer(model, reshape_inputs(rows, dtype))["y"],
                                          expected(rows))
        status = client.status()["models"][model]
    assert status["state"] == "ready" and status["version"] == "1"
    assert "fallback" not in status["reason"]  # six bad inputs, fallback after 2 errors: no move
    assert status["errors"] == 0 and status["rejected"] >= 6


@pytest.mark.parametrize("model", list(MODELS))
def test_concurrent_clients_never_get_each_others_outputs(daemon, model):
    dtype = MODELS[model]
    wrong: list[str] = []
    answers = {"ok": 0, "400": 0}
    lock = threading.Lock()

    def call(rows: int, scale: float) -> None:
        x = np.arange(12, dtype=np.float32).reshape(2, 6) * scale
        with daemon.client() as client:
            for _ in range(40):
                try:
                    out = client.infer(model, reshape_inputs(rows, dtype, x))["y"]
                except ClientError as exc:
                    with lock:
                        answers[str(exc.status)] = answers.get(str(exc.status), 0) + 1
                    if rows != BAD_ROWS or exc.status != 400:
                        wrong.append(f"rows {rows}: {exc}")
                    continue
                with lock:
                    answers["ok"] += 1
                if rows == BAD_ROWS or not np.array_equal(out, expected(rows, x)):
                    wrong.append(f"rows {rows} answered {out.shape} starting {out.flat[0]}")

    threads = [threading.Thread(target=call, args=(rows, i + 1.0))
               for i, rows in enumerate((3, BAD_ROWS, 4, BAD_ROWS, 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert answers == {"ok": 120, "400": 80}
