"""The manager on models whose inference fails on some inputs (issue 10, case 5): every
bad request is an error, a client's, in one line; every good one gets its own outputs;
bad inputs never move a model off its backend."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edged.config import load_settings
from edged.errors import InputRejected
from edged.models.manager import ModelManager
from tests.backends.reshape_models import (
    BAD_ROWS,
    build_reshape_onnx,
    build_reshape_tflite,
    expected,
    reshape_inputs,
)

CASES = {  # id: (builder, backend setting, backend expected, dtype of `rows`)
    "onnx-auto": (build_reshape_onnx, "auto", "openvino", np.int64),
    "tflite-litert": (build_reshape_tflite, "litert", "litert", np.int32),
}


@pytest.fixture(params=list(CASES))
def reshape_manager(request, store, tmp_path):
    """(manager serving "reshape" 1, its backend, dtype of rows); fallback after 2 errors."""
    build, backend, expected_backend, dtype = CASES[request.param]
    store.add("reshape", [build(tmp_path / "model")], "1")
    store.activate("reshape", "1")
    settings = load_settings(
        None, store={"path": str(store.root)}, models={"reshape": {"backend": backend}},
        backends={"openvino_cache_dir": str(tmp_path / "cache"), "probe_runs": 1,
                  "fallback_after_errors": 2, "workers": 2},
    )
    manager = ModelManager(store, settings)
    manager.load_all()
    yield manager, expected_backend, dtype
    manager.close()


def test_every_bad_request_is_a_one_line_client_error(reshape_manager):
    manager, backend, dtype = reshape_manager
    served = manager.get("reshape")
    assert served.selection.backend == backend
    first = manager.infer("reshape", reshape_inputs(3, dtype)).outputs["y"]
    np.testing.assert_array_equal(first, expected(3))
    messages = []
    for _ in range(5):  # before the fix: the second and later answered with (3, 4)
        with pytest.raises(InputRejected) as info:
            manager.infer("reshape", reshape_inputs(BAD_ROWS, dtype))
        messages.append(str(info.value))
    assert len(set(messages)) == 1
    message = messages[0]
    assert message.startswith(f"reshape 1 on {backend}/CPU: the model rejected these inputs: ")
    assert "\n" not in message and "Exception from" not in message
    for rows in (4, 12):
        np.testing.assert_array_equal(manager.infer("reshape", reshape_inputs(rows, dtype)).outputs["y"],
                                      expected(rows))
    # Five bad inputs, with fallback after 2 errors: still the same model on the same backend.
    assert manager.get("reshape") is served and served.consecutive_errors == 0
    stats = manager.stats["reshape"]
    assert (stats.rejected, stats.errors, stats.requests) == (5, 0, 3)


def test_concurrent_good_and_bad_requests_never_cross(reshape_manager):
    manager, _, dtype = reshape_manager
    wrong: list[str] = []
    counts = {"errors": 0, "answers": 0}
    lock = threading.Lock()

    def call(rows: int, scale: float) -> None:
        x = np.arange(12, dtype=np.float32).reshape(2, 6) * scale
        for _ in range(60):
            try:
                out = manager.infer("reshape", reshape_inputs(rows, dtype, x)).outputs["y"]
            except InputRejected:
                with lock:
                    counts["errors"] += 1
                if rows != BAD_ROWS:
                    wrong.append(f"rows {rows} rejected")
                continue
            with lock:
                counts["answers"] += 1
            if rows == BAD_ROWS or not np.array_equal(out, expected(rows, x)):
                wrong.append(f"rows {rows} answered {out.shape} {out.flat[0]}")

    threads = [threading.Thread(target=call, args=(rows, i + 1.0))
               for i, rows in enumerate((3, BAD_ROWS, 6, BAD_ROWS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert counts == {"errors": 120, "answers": 120}
    assert manager.get("reshape").consecutive_errors == 0
