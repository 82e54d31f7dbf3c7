"""Unit tests for the Open Inference Protocol codec (edged/api/codec.py, client_codec.py,
tensors.py, header_cache.py): round trips and untrusted-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edged.api import codec
from edged.api.client_codec import decode_response, encode_request
from edged.api.codec import decode_request, encode_response, parse_json
from edged.api.header_cache import HeaderCache
from edged.api.tensors import (
    DATATYPES,
    MAX_RANK,
    MAX_TENSORS,
    InferRequest,
    ShmRef,
    ShmTensor,
    datatype_of,
)
from edged.errors import InvalidInput


# --- sample arrays ------------------------------------------------------------------
def extremes(datatype: str) -> np.ndarray:
    """Values of `datatype` that are easy to get wrong: limits, -0.0, values needing full precision."""
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return np.array([True, False, False, True, True, False], dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, info.max - 1, info.min + 1 if info.min else 2]
        return np.array(values, dtype)
    info = np.finfo(dtype)
    values = [
        dtype.type(0.1), dtype.type(1) / dtype.type(3), np.nextafter(dtype.type(1), dtype.type(2)),
        info.max, -info.max, info.smallest_normal, info.smallest_subnormal, dtype.type(-0.0),
        dtype.type(123456.789) if dtype.itemsize > 2 else dtype.type(-65504), dtype.type(np.pi),
    ]
    return np.array(values, dtype)


def bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert bits(got) == bits(want)


def body_of(doc: dict, binary: bytes = b"") -> tuple[bytes, int | None]:
    header = json.dumps(doc).encode()
    return header + binary, (len(header) if binary else None)


def one_input(**tensor) -> dict:
    return {"inputs": [{"name": "x", **tensor}]}


def json_request(**tensor) -> InferRequest:
    """Decode a JSON-only request with one input "x" described by `tensor`."""
    return decode_request(json.dumps(one_input(**tensor)).encode(), None)


def refused(body: bytes | dict, header_length: int | None = None) -> str:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    with pytest.raises(InvalidInput) as info:
        decode_request(body, header_length)
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 400
    return message


ALL = sorted(DATATYPES)


# --- datatypes ------------------------------------------------------------------------
def test_every_datatype_maps_back_and_forth() -> None:
    assert set(DATATYPES) == {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                              "INT64", "FP16", "FP32", "FP64"}
    for name, dtype in DATATYPES.items():
        assert datatype_of(dtype) == name
        assert datatype_of(dtype.type) == name


@pytest.mark.parametrize("dtype", [np.complex64, np.str_, np.object_, np.dtype("datetime64[s]")])
def test_datatype_of_refuses_unsupported_dtypes(dtype) -> None:
    with pytest.raises(InvalidInput, match="has no Open Inference Protocol datatype"):
        datatype_of(np.dtype(dtype))


# --- request round trips --------------------------------------------------------------
@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_request_round_trip_is_bit_for_bit(datatype: str, binary: bool) -> None:
    array = extremes(datatype).reshape(2, -1)
    body, header_length = encode_request({"x": array}, binary=binary)
    if binary:
        assert header_length is not None and header_length < len(body)
        assert body[header_length:] == bits(array)
    else:
        assert header_length is None
        json.loads(body)  # all of it is the JSON document
    request = decode_request(body, header_length)
    assert list(request.inputs) == ["x"]
    assert_identical(request.inputs["x"], array)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_non_finite_floats_round_trip(datatype: str, binary: bool) -> None:
    array = np.array([np.nan, np.inf, -np.inf, -0.0], DATATYPES[datatype])
    body, header_length = encode_request({"x": array}, binary=binary)
    assert_identical(decode_request(body, header_length).inputs["x"], array)


def test_float32_values_keep_every_bit_through_json() -> None:
    rng = np.random.default_rng(7)
    array = rng.standard_normal(1000).astype(np.float32) * np.float32(1e-3)
    array[:10] = np.array([0.1, 0.2, 0.3, 1 / 3, 2 / 3, 1e-38, 3.4e38, 16777217, 1.0000001, 0.7], np.float32)
    body, header_length = encode_request({"x": array}, binary=False)
    assert header_length is None
    assert_identical(decode_request(body, None).inputs["x"], array)


def test_several_inputs_mixed_datatypes_and_shapes() -> None:
    inputs = {
        "image": np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3),
        "scale": np.array(0.5, np.float32),  # rank 0
        "ids": np.array([[-(2**63), 2**63 - 1]], np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "flags": np.array([True, False]),
    }
    for binary in (True, False):
        body, header_length = encode_request(inputs, binary=binary)
        request = decode_request(body, header_length)
        assert list(request.inputs) == list(inputs)
        for name, array in inputs.items():
            assert_identical(request.inputs[name], array)


def test_request_options_round_trip() -> None:
    body, header_length = encode_request(
        {"x": np.zeros(2, np.float32)}, outputs=["y", "z"], binary_outputs=False, request_id="req-7"
    )
    request = decode_request(body, header_length)
    assert request.id == "req-7"
    assert request.outputs == {"y": False, "z": False}
    assert request.binary_default is False
    assert request.parameters == {"binary_data_output": False}


def test_decoded_binary_inputs_do_not_copy_more_than_their_bytes() -> None:
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    b = np.arange(4, dtype=np.float64)
    body, header_length = encode_request({"a": a, "b": b})
    assert len(body) == header_length + a.nbytes + b.nbytes
    request = decode_request(body, header_length)
    assert_identical(request.inputs["a"], a)
    assert_identical(request.inputs["b"], b)


# --- JSON data layouts ------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [[1, 2, 3, 4, 5, 6], [[1, 2, 3], [4, 5, 6]], [[1, 2], [3, 4], [5, 6]], [[[1], [2], [3], [4], [5], [6]]]],
)
def test_flat_and_nested_json_data_fill_the_shape_in_row_major_order(data: list) -> None:
    request = json_request(datatype="INT32", shape=[2, 3], data=data)
    assert_identical(request.inputs["x"], np.array([[1, 2, 3], [4, 5, 6]], np.int32))


def test_json_integers_are_accepted_for_float_inputs() -> None:
    request = json_request(datatype="FP32", shape=[3], data=[1, 2.5, -3])
    assert_identical(request.inputs["x"], np.array([1, 2.5, -3], np.float32))


def test_json_scalar_for_a_rank_zero_input() -> None:
    request = json_request(datatype="INT8", shape=[], data=5)
    assert_identical(request.inputs["x"], np.array(5, np.int8))


def test_json_booleans_for_a_bool_input() -> None:
    request = json_request(datatype="BOOL", shape=[3], data=[True, False, True])
    assert_identical(request.inputs["x"], np.array([True, False, True]))


def test_json_uint64_values_beyond_int64() -> None:
    big = [2**64 - 1, 2**63]
    request = json_request(datatype="UINT64", shape=[2], data=big)
    assert_identical(request.inputs["x"], np.array(big, np.uint64))


@pytest.mark.parametrize("data", [[0, 2**64 - 1], [2**63, 1]])
def test_json_uint64_values_mixing_small_and_beyond_int64(data: list[int]) -> None:
    request = json_request(datatype="UINT64", shape=[2], data=data)
    assert_identical(request.inputs["x"], np.array(data, np.uint64))


# --- response round trips --------------------------------------------------------------
def outputs_sample() -> dict[str, np.ndarray]:
    return {name.lower(): extremes(name) for name in ALL}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_response_round_trip_of_every_datatype(binary: bool) -> None:
    outputs = outputs_sample()
    request = InferRequest(inputs={}, id="abc", binary_default=binary)
    body, header_length = encode_response("face", "3", outputs, request)
    assert (header_length is not None) == binary
    doc, arrays = decode_response(body, header_length)
    assert doc["model_name"] == "face"
    assert doc["model_version"] == "3"
    assert doc["id"] == "abc"
    assert [t["name"] for t in doc["outputs"]] == list(outputs)
    assert list(arrays) == list(outputs)
    for name, array in outputs.items():
        assert_identical(arrays[name], array)


def test_response_with_chosen_outputs_mixing_binary_and_json() -> None:
    doc = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "outputs": [{"name": "b", "parameters": {"binary_data": True}}, {"name": "a"}],
    }
    request = decode_request(json.dumps(doc).encode(), None)
    assert request.outputs == {"b": True, "a": False}
    outputs = {
        "a": np.array([[0.1, 0.2]], np.float32),
        "b": np.array([1, 2, 3], np.int64),
        "c": np.array([9], np.uint8),  # not asked for
    }
    body, header_length = encode_response("m", "1", outputs, request)
    assert header_length is not None
    assert body[header_length:] == bits(outputs["b"])
    response, arrays = decode_response(body, header_length)
    assert "id" not in response
    assert [t["name"] for t in response["outputs"]] == ["b", "a"]
    assert "data" in response["outputs"][1]
    assert response["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert set(arrays) == {"a", "b"}
    assert_identical(arrays["a"], outputs["a"])
    assert_identical(arrays["b"], outputs["b"])


def test_response_without_binary_is_plain_json() -> None:
    request = InferRequest(inputs={})
    body, header_length = encode_response("m", "1", {"y": np.array([1.5], np.float64)}, request)
    assert header_length is None
    assert json.loads(body) == {
        "model_name": "m", "model_version": "1",
        "outputs": [{"name": "y", "datatype": "FP64", "shape": [1], "data": [1.5]}],
    }


def test_a_requested_unknown_output_is_refused() -> None:
    request = InferRequest(inputs={}, outputs={"y": True, "nope": False})
    with pytest.raises(InvalidInput, match=r"unknown output 'nope'; the model gives \['y'\]"):
        encode_response("m", "1", {"y": np.zeros(1, np.float32)}, request)


def test_request_id_may_be_a_number() -> None:
    doc = one_input(datatype="FP32", shape=[1], data=[1])
    doc["id"] = 42
    assert decode_request(json.dumps(doc).encode(), None).id == "42"


# --- malformed documents ---------------------------------------------------------------
@pytest.mark.parametrize("body", [b'{"inputs": [', b"{'inputs': []}", b"", b"\xff\xfe\x00", b"{} extra"])
def test_malformed_json_is_refused(body: bytes) -> None:
    assert refused(body).startswith("request is not JSON")


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deeply_nested_json_is_refused(depth: int) -> None:
    assert refused(b"[" * depth) == "request JSON is nested too deeply"
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":'
    assert "nested too deeply" in refused(head + b"[" * depth + b"1" + b"]" * depth + b"}]}")


def test_nesting_numpy_cannot_hold_is_refused() -> None:
    data = json.loads("[" * 100 + "1" + "]" * 100)
    message = refused(one_input(datatype="FP32", shape=[1], data=data))
    assert message.startswith("inputs[0].data is not a regular")


@pytest.mark.parametrize("body", [b"[]", b"1", b'"inputs"', b"null", b"true"])
def test_top_level_must_be_an_object(body: bytes) -> None:
    assert refused(body) == "request must be an object"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "request.inputs must be a list"),
        ({"inputs": {"x": 1}}, "request.inputs must be a list"),
        ({"inputs": []}, f"request.inputs must hold 1 to {MAX_TENSORS} tensors"),
        ({"inputs": [1]}, "inputs[0] must be an object"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "inputs[0].name must be a string"),
        ({"inputs": [{"name": 3, "datatype": "FP32", "shape": [1], "data": [1]}]},
         "inputs[0].name must be a string"),
        ({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}, "inputs[0].datatype must be a string"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}, "inputs[0].shape must be a list"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]},
         "input 'x' has neither data nor parameters.binary_data_size nor parameters.shared_memory_region"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": []}]},
         "inputs[0].parameters must be an object"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": 3},
         "request.parameters must be an object"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": {}},
         "request.outputs must be a list"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{"n": 1}]},
         "outputs[0].name must be a string"),
    ],
)
def test_structural_errors_name_the_field(doc: dict, message: str) -> None:
    assert refused(doc) == message


def test_too_many_inputs() -> None:
    tensors = [
        {"name": f"x{i}", "datatype": "UINT8", "shape": [1], "data": [0]} for i in range(MAX_TENSORS + 1)
    ]
    assert refused({"inputs": tensors}) == f"request.inputs must hold 1 to {MAX_TENSORS} tensors"


def test_an_input_named_twice() -> None:
    tensor = {"name": "x", "datatype": "UINT8", "shape": [1], "data": [0]}
    assert refused({"inputs": [tensor, tensor]}) == "input 'x' appears twice"


@pytest.mark.parametrize("datatype", ["FP8", "BYTES", "fp32", "float32", "BF16", ""])
def test_unknown_datatype(datatype: str) -> None:
    message = refused(one_input(datatype=datatype, shape=[1], data=[1]))
    assert message == f"inputs[0].datatype {datatype!r} is not supported"


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.5], ["2"], [True], [None]])
def test_shape_dims_must_be_non_negative_integers(shape: list) -> None:
    message = refused(one_input(datatype="FP32", shape=shape, data=[1]))
    assert message.startswith("inputs[0].shape must hold non-negative integers")


def test_shape_rank_is_bounded() -> None:
    shape = [1] * (MAX_RANK + 1)
    assert refused(one_input(datatype="FP32", shape=shape, data=[1])) == (
        f"inputs[0].shape has rank {MAX_RANK + 1}, over {MAX_RANK}"
    )


@pytest.mark.parametrize("shape", [[0, 2**62], [0, 2**70], [2**31, 2**31, 0]])
def test_empty_shapes_with_huge_dims_are_refused_cleanly(shape: list[int]) -> None:
    refused(one_input(datatype="FP32", shape=shape, data=[]))
    header = json.dumps(binary_doc(0, shape)).encode()
    refused(header, len(header))


# --- binary framing --------------------------------------------------------------------
def binary_doc(size: int, shape: list[int], datatype: str = "FP32") -> dict:
    return one_input(datatype=datatype, shape=shape, parameters={"binary_data_size": size})


@pytest.mark.parametrize(("size", "shape"), [(12, [4]), (20, [4]), (0, [4]), (16, [2, 4])])
def test_binary_data_size_must_match_the_shape(size: int, shape: list[int]) -> None:
    needed = math.prod(shape) * 4
    body, header_length = body_of(binary_doc(size, shape), b"\0" * max(size, 1))
    message = refused(body, header_length)
    assert message == (
        f"input 'x': binary_data_size {size} but shape {shape} of FP32 needs {needed} bytes"
    )


@pytest.mark.parametrize("size", ["16", 16.0, True, [16]])
def test_binary_data_size_must_be_an_integer(size) -> None:
    body, header_length = body_of(binary_doc(size, [4]), b"\0" * 16)
    assert refused(body, header_length) == "inputs[0].parameters.binary_data_size must be an integer"


def test_binary_data_shorter_than_claimed() -> None:
    body, header_length = body_of(binary_doc(16, [4]), b"\0" * 10)
    assert refused(body, header_length) == "input 'x': binary data ends after 10 of 16 bytes"


def test_binary_size_without_any_binary_part() -> None:
    body, _ = body_of(binary_doc(16, [4]))
    assert refused(body, None) == "input 'x': binary data ends after 0 of 16 bytes"


@pytest.mark.parametrize("extra", [1, 2, 1000])
def test_header_length_larger_than_the_body(extra: int) -> None:
    body, _ = body_of(binary_doc(16, [4]), b"\0" * 16)
    bad = len(body) + extra
    assert refused(body, bad) == f"Inference-Header-Content-Length {bad} does not fit a {len(body)}-byte body"


@pytest.mark.parametrize("header_length", [0, -1])
def test_header_length_must_be_positive(header_length: int) -> None:
    body, _ = body_of(binary_doc(16, [4]), b"\0" * 16)
    assert "Inference-Header-Content-Length" in refused(body, header_length)


def test_header_length_that_cuts_the_json_short() -> None:
    body, header_length = body_of(binary_doc(16, [4]), b"\0" * 16)
    assert refused(body, header_length - 1).startswith("request is not JSON")


def test_leftover_binary_bytes_are_refused() -> None:
    body, header_length = body_of(binary_doc(16, [4]), b"\0" * 19)
    assert refused(body, header_length) == "3 bytes of binary data are not claimed by any input"


def test_binary_bytes_after_a_json_only_request_are_refused() -> None:
    body, header_length = body_of(one_input(datatype="FP32", shape=[1], data=[1]), b"\0" * 8)
    assert refused(body, header_length) == "8 bytes of binary data are not claimed by any input"


def test_binary_inputs_take_their_bytes_in_order() -> None:
    a = np.array([1.5, -2.5], np.float32)
    b = np.array([7, 8, 9], np.uint16)
    doc = {"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
        {"name": "j", "datatype": "INT8", "shape": [1], "data": [3]},
        {"name": "b", "datatype": "UINT16", "shape": [3], "parameters": {"binary_data_size": 6}},
    ]}
    body, header_length = body_of(doc, a.tobytes() + b.tobytes())
    request = decode_request(body, header_length)
    assert_identical(request.inputs["a"], a)
    assert_identical(request.inputs["b"], b)
    assert_identical(request.inputs["j"], np.array([3], np.int8))


# --- JSON values that must not be cast -------------------------------------------------
@pytest.mark.parametrize("data", [[1.5, 2.0], [1.0, 2.0], [1, 2.0]])
def test_json_floats_for_an_int32_input_are_refused(data: list) -> None:
    message = refused(one_input(datatype="INT32", shape=[2], data=data))
    assert message == "inputs[0].data holds float values, not INT32"


@pytest.mark.parametrize("data", [[256], [-1], [0, 1000], [2**64]])
def test_integers_out_of_range_for_uint8_are_refused(data: list[int]) -> None:
    message = refused(one_input(datatype="UINT8", shape=[len(data)], data=data))
    assert message.startswith("inputs[0].data ")
    assert "UINT8" in message


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT8", 128), ("INT8", -129), ("UINT16", 65536), ("INT32", 2**31), ("INT32", -(2**31) - 1),
     ("UINT32", 2**32), ("INT64", 2**63), ("UINT64", -1)],
)
def test_integers_out_of_range_are_refused(datatype: str, value: int) -> None:
    assert datatype in refused(one_input(datatype=datatype, shape=[1], data=[value]))


@pytest.mark.parametrize(("datatype", "value"), [("INT8", 127), ("INT8", -128), ("UINT16", 65535),
                                                 ("INT64", -(2**63)), ("UINT64", 2**64 - 1)])
def test_integers_at_the_limits_are_accepted(datatype: str, value: int) -> None:
    request = json_request(datatype=datatype, shape=[1], data=[value])
    assert int(request.inputs["x"][0]) == value
    assert request.inputs["x"].dtype == DATATYPES[datatype]


@pytest.mark.parametrize(("datatype", "value"), [("FP32", 1e39), ("FP32", -1e39), ("FP16", 70000.0)])
def test_json_floats_out_of_range_are_refused_not_turned_into_infinity(datatype: str, value: float) -> None:
    message = refused(one_input(datatype=datatype, shape=[1], data=[value]))
    assert datatype in message


@pytest.mark.parametrize("data", [[[1, 2], [3]], [1, [2, 3]], [[1, 2], [3, [4]]]])
def test_ragged_lists_are_refused(data: list) -> None:
    assert refused(one_input(datatype="INT32", shape=[3], data=data)).startswith(
        "inputs[0].data is not a regular array"
    )


@pytest.mark.parametrize("data", [["1", "2"], [1, "2"], "12", [None, 1], [{"a": 1}, 1], {"a": 1}, None])
def test_non_numbers_in_data_are_refused(data) -> None:
    message = refused(one_input(datatype="INT32", shape=[2], data=data))
    assert message.startswith("inputs[0].data ")


@pytest.mark.parametrize("data", [["1.5"], ["nan"]])
def test_strings_are_refused_for_float_inputs(data: list) -> None:
    message = refused(one_input(datatype="FP32", shape=[1], data=data))
    assert message.startswith("inputs[0].data holds str values")


@pytest.mark.parametrize(
    ("datatype", "data"),
    [("BOOL", [0, 1]), ("BOOL", [1.0, 0.0]), ("INT32", [True, False]), ("FP32", [True, False]),
     ("UINT8", [True])],
)
def test_booleans_and_numbers_do_not_mix(datatype: str, data: list) -> None:
    message = refused(one_input(datatype=datatype, shape=[len(data)], data=data))
    assert message.startswith("inputs[0].data holds")


@pytest.mark.parametrize(
    ("datatype", "data"), [("INT32", [True, 1]), ("FP32", [1.5, False]), ("UINT8", [2, True])]
)
def test_booleans_mixed_into_numbers_are_refused(datatype: str, data: list) -> None:
    assert refused(one_input(datatype=datatype, shape=[len(data)], data=data)).startswith("inputs[0].data")


@pytest.mark.parametrize(("count", "shape"), [(5, [2, 3]), (7, [2, 3]), (1, [0])])
def test_element_count_must_match_the_shape(count: int, shape: list[int]) -> None:
    message = refused(one_input(datatype="FP32", shape=shape, data=list(range(count))))
    assert message == f"inputs[0].data has {count} elements, shape {shape} needs {math.prod(shape)}"


def test_request_id_must_be_text_or_a_number() -> None:
    doc = one_input(datatype="FP32", shape=[1], data=[1])
    doc["id"] = {"a": 1}
    assert refused(doc).startswith("request.id must be")
    doc["id"] = True
    assert refused(doc).startswith("request.id must be")


def test_parse_json_names_what_it_parses() -> None:
    assert parse_json(b'{"a": [1]}') == {"a": [1]}
    with pytest.raises(InvalidInput, match="response is not JSON"):
        parse_json(b"{", "response")
    with pytest.raises(InvalidInput, match="response JSON is nested too deeply"):
        parse_json(b"[" * 100_000, "response")


# --- outputs: all when none are named ---------------------------------------------------
@pytest.mark.parametrize("outputs", [[], None])
def test_an_empty_or_absent_outputs_list_means_every_output(outputs: list | None) -> None:
    doc = one_input(datatype="FP32", shape=[1], data=[1])
    if outputs is not None:
        doc["outputs"] = outputs
    request = decode_request(json.dumps(doc).encode(), None)
    assert request.outputs is None
    body, _ = encode_response("m", "1", {"a": np.zeros(1, np.float32), "b": np.ones(2, np.int8)}, request)
    assert [t["name"] for t in json.loads(body)["outputs"]] == ["a", "b"]


# --- the system shared memory extension's parameters -----------------------------------------
def shm_input(**params) -> dict:
    return one_input(datatype="FP32", shape=[1, 4], parameters=params)


def test_an_input_in_shared_memory_decodes_to_where_it_is() -> None:
    request = decode_request(json.dumps(shm_input(shared_memory_region="cam", shared_memory_byte_size=16,
                                                  shared_memory_offset=64)).encode(), None)
    assert request.inputs == {"x": ShmTensor(ShmRef("cam", 16, 64), np.dtype(np.float32), (1, 4))}
    assert request.uses_shared_memory and request.cacheable
    doc = shm_input(shared_memory_region="cam", shared_memory_byte_size=16)
    plain = decode_request(json.dumps(doc).encode(), None)
    assert plain.inputs["x"].ref == ShmRef("cam", 16, 0)  # the offset is optional, 0 by default


@pytest.mark.parametrize(("params", "message"), [
    ({"shared_memory_region": "cam"}, "inputs[0].parameters.shared_memory_byte_size must be given with"),
    ({"shared_memory_byte_size": 16}, "inputs[0].parameters.shared_memory_byte_size is given without"),
    ({"shared_memory_offset": 0}, "inputs[0].parameters.shared_memory_offset is given without"),
    ({"shared_memory_region": 3, "shared_memory_byte_size": 16}, "shared_memory_region must be a string"),
    ({"shared_memory_region": "", "shared_memory_byte_size": 16}, "shared_memory_region is empty"),
    ({"shared_memory_region": "c", "shared_memory_byte_size": 16.0}, "byte_size must be an integer"),
    ({"shared_memory_region": "c", "shared_memory_byte_size": True}, "byte_size must be an integer"),
    ({"shared_memory_region": "c", "shared_memory_byte_size": 16, "shared_memory_offset": -8},
     "shared_memory_offset must be a non-negative int64, got -8"),
    ({"shared_memory_region": "c", "shared_memory_byte_size": 16, "shared_memory_offset": 2**63},
     "must be a non-negative int64"),
    ({"shared_memory_region": "c", "shared_memory_byte_size": 12},
     "input 'x': shared_memory_byte_size 12 but shape [1, 4] of FP32 needs 16 bytes"),
    ({"shared_memory_region": "c", "shared_memory_byte_size": 16, "binary_data_size": 16},
     "input 'x' has parameters.binary_data_size and parameters.shared_memory_region: give only one"),
])
def test_bad_shared_memory_parameters_are_refused(params: dict, message: str) -> None:
    assert message in refused(shm_input(**params))


def test_data_with_a_region_is_refused() -> None:
    doc = shm_input(shared_memory_region="c", shared_memory_byte_size=16)
    doc["inputs"][0]["data"] = [1, 2, 3, 4]
    assert refused(doc) == "input 'x' has data and parameters.shared_memory_region: give only one"


def test_outputs_asked_for_in_shared_memory() -> None:
    doc = shm_input(shared_memory_region="in", shared_memory_byte_size=16)
    doc["outputs"] = [
        {"name": "y", "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 64,
                                     "binary_data": False}},
        {"name": "z", "parameters": {"binary_data": True}},
    ]
    request = decode_request(json.dumps(doc).encode(), None)
    assert request.outputs == {"y": ShmRef("out", 64), "z": True}
    doc["outputs"][0]["parameters"]["binary_data"] = True
    assert refused(doc) == "output 'y' has both shared_memory_region and binary_data: give only one"


def test_an_output_in_shared_memory_is_described_without_data() -> None:
    request = InferRequest(inputs={}, outputs={"y": ShmRef("out", 64, 8), "z": True})
    outputs = {"y": np.zeros((2, 3), np.float32), "z": np.arange(3, dtype=np.uint8)}
    for _ in range(2):  # the second answer's header comes from the cache: the same bytes
        body, header_length = encode_response("m", "1", outputs, request)
        doc = json.loads(body[:header_length])
        assert doc["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2, 3], "parameters": {
            "shared_memory_region": "out", "shared_memory_byte_size": 24, "shared_memory_offset": 8}}
        assert body[header_length:] == bits(outputs["z"])  # only z's bytes follow
    only_shm = InferRequest(inputs={}, outputs={"y": ShmRef("out", 24)})
    body, header_length = encode_response("m", "1", outputs, only_shm)
    assert header_length is None  # nothing follows: plain JSON
    _, arrays = decode_response(body, header_length)
    assert arrays == {"y": ShmTensor(ShmRef("out", 24), np.dtype(np.float32), (2, 3))}


def test_client_requests_with_regions_round_trip() -> None:
    inputs = {"x": ShmTensor.at("in", np.int16, (2, 3), offset=4), "w": np.arange(3, dtype=np.float32)}
    body, header_length = encode_request(inputs, outputs={"y": ShmRef("out", 12, 6), "z": None})
    request = decode_request(body, header_length)
    assert request.inputs["x"] == ShmTensor(ShmRef("in", 12, 4), np.dtype(np.int16), (2, 3))
    assert_identical(request.inputs["w"], inputs["w"])
    assert request.outputs == {"y": ShmRef("out", 12, 6), "z": True}
    body, header_length = encode_request({"x": inputs["x"]})
    assert header_length is None  # every input in a region: a small JSON-only body


def test_a_repeated_shared_memory_body_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = []
    real = codec.parse_json
    monkeypatch.setattr(codec, "parse_json", lambda data, *a: parsed.append(1) or real(data, *a))
    cache = HeaderCache()
    body, header_length = encode_request({"x": ShmTensor.at("in", np.float32, (1, 4))},
                                         outputs={"y": ShmRef("out", 16)})
    first = decode_request(body, header_length, cache)
    second = decode_request(bytes(body), header_length, cache)
    assert len(parsed) == 1
    assert second.inputs == first.inputs and second.outputs == first.outputs
    json_data = json.dumps(one_input(datatype="FP32", shape=[1], data=[1])).encode()
    one, two = (decode_request(json_data, None, cache) for _ in range(2))
    assert len(parsed) == 3  # a body with JSON data is parsed each time: arrays are never kept
    assert one.inputs["x"] is not two.inputs["x"]


def test_binary_and_shared_memory_inputs_mixed_keep_their_layout_in_the_cache() -> None:
    cache = HeaderCache()
    inputs = {"a": ShmTensor.at("in", np.uint8, (4,)), "b": np.arange(4, dtype=np.int32)}
    body, header_length = encode_request(inputs)
    decode_request(body, header_length, cache)
    new_b = np.arange(4, 8, dtype=np.int32)
    again = decode_request(body[:header_length] + new_b.tobytes(), header_length, cache)
    assert again.inputs["a"] == inputs["a"]
    assert_identical(again.inputs["b"], new_b)
