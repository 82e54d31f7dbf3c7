"""Unit tests for input validation: exact dtypes and shapes, no casting, no NaN unless allowed."""

from __future__ import annotations

import numpy as np
import pytest

from edged.backends.base import TensorSpec
from edged.errors import InvalidInput
from edged.models.validation import validate_inputs

F32 = np.dtype(np.float32)
SPECS = [TensorSpec("x", (1, 4), F32), TensorSpec("mask", (1, 4), np.dtype(np.int32))]


def good_inputs() -> dict[str, np.ndarray]:
    return {"x": np.arange(4, dtype=np.float32).reshape(1, 4), "mask": np.ones((1, 4), np.int32)}


def refused(inputs: dict[str, np.ndarray], specs: list[TensorSpec] = SPECS, *, reject_non_finite=True) -> str:
    with pytest.raises(InvalidInput) as info:
        validate_inputs(inputs, specs, reject_non_finite=reject_non_finite)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_matching_inputs_pass_unchanged() -> None:
    inputs = good_inputs()
    checked = validate_inputs(inputs, SPECS, reject_non_finite=True)
    assert set(checked) == {"x", "mask"}
    for name, array in inputs.items():
        assert checked[name].dtype == array.dtype
        np.testing.assert_array_equal(checked[name], array)
        assert checked[name].flags.c_contiguous


def test_non_contiguous_inputs_come_back_contiguous_with_the_same_values() -> None:
    wide = np.arange(8, dtype=np.float32).reshape(1, 8)
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    checked = validate_inputs({"x": strided}, [SPECS[0]], reject_non_finite=True)
    assert checked["x"].flags.c_contiguous
    np.testing.assert_array_equal(checked["x"], [[0, 2, 4, 6]])


@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.float16, np.int32, np.uint8, np.bool_])
def test_dtype_must_match_exactly(dtype) -> None:
    inputs = good_inputs()
    inputs["x"] = np.zeros((1, 4), dtype)
    message = refused(inputs)
    assert message == f"input 'x' must be float32, got {np.dtype(dtype)}"


def test_int64_for_a_float32_input_is_refused_even_with_integral_values() -> None:
    inputs = good_inputs()
    inputs["x"] = np.array([[1, 2, 3, 4]], np.int64)
    assert "must be float32, got int64" in refused(inputs)


def test_float32_for_an_int32_input_is_refused() -> None:
    inputs = good_inputs()
    inputs["mask"] = np.ones((1, 4), np.float32)
    assert refused(inputs) == "input 'mask' must be int32, got float32"


def test_a_byte_swapped_dtype_is_not_the_same_dtype() -> None:
    inputs = good_inputs()
    inputs["x"] = inputs["x"].astype(F32.newbyteorder())
    assert "must be float32" in refused(inputs)


@pytest.mark.parametrize("shape", [(1, 5), (4, 1), (2, 4), (4,), (1, 1, 4), (), (1, 0)])
def test_shape_must_match(shape: tuple[int, ...]) -> None:
    inputs = good_inputs()
    inputs["x"] = np.zeros(shape, np.float32)
    assert refused(inputs) == f"input 'x' must have shape [1, 4], got {list(shape)}"


@pytest.mark.parametrize("shape", [(1, 4), (7, 4), (0, 4), (1000, 4)])
def test_dynamic_dimensions_accept_any_size(shape: tuple[int, ...]) -> None:
    spec = TensorSpec("x", (-1, 4), F32)
    checked = validate_inputs({"x": np.zeros(shape, np.float32)}, [spec], reject_non_finite=True)
    assert checked["x"].shape == shape


def test_dynamic_dimensions_still_check_rank_and_fixed_dims() -> None:
    spec = [TensorSpec("x", (-1, 4), F32)]
    message = refused({"x": np.zeros((3, 5), np.float32)}, spec)
    assert message == "input 'x' must have shape [-1, 4], got [3, 5]"
    assert "got [4]" in refused({"x": np.zeros((4,), np.float32)}, spec)
    assert "got [2, 4, 1]" in refused({"x": np.zeros((2, 4, 1), np.float32)}, spec)


def test_fully_dynamic_shape() -> None:
    spec = [TensorSpec("x", (-1, -1, -1), F32)]
    checked = validate_inputs({"x": np.zeros((2, 3, 5), np.float32)}, spec, reject_non_finite=True)
    assert checked["x"].shape == (2, 3, 5)
    assert "must have shape [-1, -1, -1]" in refused({"x": np.zeros((2, 3), np.float32)}, spec)


def test_a_missing_input_is_named() -> None:
    inputs = good_inputs()
    del inputs["mask"]
    assert refused(inputs) == "missing input 'mask'"


def test_no_inputs_at_all() -> None:
    assert refused({}) == "missing input 'mask'"


def test_an_unknown_input_is_named_with_the_expected_ones() -> None:
    inputs = good_inputs()
    inputs["y"] = np.zeros((1, 4), np.float32)
    assert refused(inputs) == "unknown input 'y'; the model takes ['mask', 'x']"


def test_a_misnamed_input_reports_the_unknown_name_first() -> None:
    inputs = {"X": np.zeros((1, 4), np.float32), "mask": np.ones((1, 4), np.int32)}
    assert refused(inputs).startswith("unknown input 'X'")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_values_are_refused_when_asked(bad: float, dtype) -> None:
    array = np.array([[0.0, 1.0, bad, 2.0]], dtype)
    spec = [TensorSpec("x", (1, 4), np.dtype(dtype))]
    assert refused({"x": array}, spec, reject_non_finite=True) == "input 'x' holds NaN or Infinity"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_pass_when_allowed(bad: float) -> None:
    array = np.array([[0.0, 1.0, bad, 2.0]], np.float32)
    checked = validate_inputs({"x": array}, [SPECS[0]], reject_non_finite=False)
    np.testing.assert_array_equal(checked["x"], array)  # NaN compares equal here
    assert checked["x"].tobytes() == array.tobytes()


def test_extreme_finite_values_are_accepted() -> None:
    info = np.finfo(np.float32)
    array = np.array([[info.max, -info.max, info.smallest_subnormal, -0.0]], np.float32)
    checked = validate_inputs({"x": array}, [SPECS[0]], reject_non_finite=True)
    assert checked["x"].tobytes() == array.tobytes()


def test_integer_inputs_are_not_checked_for_finiteness() -> None:
    spec = [TensorSpec("i", (2,), np.dtype(np.int64))]
    array = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max], np.int64)
    checked = validate_inputs({"i": array}, spec, reject_non_finite=True)
    np.testing.assert_array_equal(checked["i"], array)
