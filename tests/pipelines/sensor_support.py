"""Helpers for the sensor tests: the window IR (waiting is tests.daemon_process.wait_until)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES, CHANNELS = 4, 2  # the window the IR reads: float32 [1, 4, 2]


def build_window_ir(directory: Path, samples: int = SAMPLES, channels: int = CHANNELS) -> Path:
    """A real OpenVINO IR: "sums" [1, C] = the sum of each channel over a [1, N, C] window "x"."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([1, samples, channels], np.float32, name="x")
    sums = ops.reduce_sum(x, np.array([1], np.int64), keep_dims=False)
    sums.output(0).get_tensor().set_names({"sums"})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "window.xml"
    ov.save_model(ov.Model([sums], [x], "window"), str(path), compress_to_fp16=False)
    return path
