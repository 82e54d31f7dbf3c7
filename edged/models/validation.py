"""Checks a request's tensors against a model's input specs, with no casting.

OpenVINO accepts int64 for a float32 input and turns NaN into zeros without
a word; edged refuses both so that what a client sends is what the model sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from edged.backends.base import TensorSpec
from edged.errors import InvalidInput


class Layout(Protocol):
    dtype: np.dtype
    shape: tuple[int, ...]


def check_layout(inputs: Mapping[str, Layout], specs: list[TensorSpec]) -> None:
    """Names, dtypes and shapes against the model's inputs: for tensors not yet read (a shared
    memory input is checked before the daemon allocates and reads it)."""
    expected = {spec.name: spec for spec in specs}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0]!r}; the model takes {sorted(expected)}")
    for name, tensor in inputs.items():
        spec = expected[name]
        if tensor.dtype != spec.dtype:
            raise InvalidInput(f"input {name!r} must be {spec.dtype}, got {tensor.dtype}")
        if len(tensor.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
        ):
            raise InvalidInput(f"input {name!r} must have shape {list(spec.shape)}, got {list(tensor.shape)}")


def validate_inputs(
    inputs: dict[str, np.ndarray], specs: list[TensorSpec], *, reject_non_finite: bool
) -> dict[str, np.ndarray]:
    check_layout(inputs, specs)
    expected = {spec.name: spec for spec in specs}
    missing = sorted(set(expected) - set(inputs))
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}")
    checked = {}
    for name, array in inputs.items():
        if reject_non_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInput(f"input {name!r} holds NaN or Infinity")
        checked[name] = np.ascontiguousarray(array)
    return checked
