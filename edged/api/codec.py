"""Open Inference Protocol (KServe v2) requests and responses on the server's side: JSON,
the binary extension and the system shared memory extension's parameters.

A request is untrusted: every size, shape and type is checked before any array is
built, and nothing is cast. A tensor in shared memory is decoded to a `ShmTensor`
(which region, where, how many bytes): the codec never touches a region; the server
resolves it through the caller's own regions (`edged.api.shared_memory`). The client's
side is `edged.api.client_codec`; what both share is `edged.api.tensors`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edged import strict_json
from edged.api.header_cache import BoundedCache, HeaderCache
from edged.api.tensors import (
    DATATYPES,
    MAX_DIM,
    MAX_ELEMENTS,
    MAX_INT64,
    MAX_RANK,
    MAX_TENSORS,
    SHM_BYTE_SIZE,
    SHM_OFFSET,
    SHM_REGION,
    InferRequest,
    OutputRequest,
    Parts,
    ShmRef,
    ShmTensor,
    Tensor,
    bytes_of,
    datatype_of,
    describe,
)
from edged.errors import InvalidInput
from edged.untrusted_json import parse_json


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidInput(f"{where} must be {_article(names)}")
    return value


def _article(name: str) -> str:
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer",
            "bool": "true or false"}.get(name, name)


def _shm_ref(params: dict, where: str) -> ShmRef | None:
    """The shared-memory parameters of one tensor, or None when it names no region."""
    if SHM_REGION not in params:
        for key in (SHM_OFFSET, SHM_BYTE_SIZE):
            if key in params:
                raise InvalidInput(f"{where}.parameters.{key} is given without {SHM_REGION}")
        return None
    region = _expect(params[SHM_REGION], str, f"{where}.parameters.{SHM_REGION}")
    if not region:
        raise InvalidInput(f"{where}.parameters.{SHM_REGION} is empty")
    if SHM_BYTE_SIZE not in params:
        raise InvalidInput(f"{where}.parameters.{SHM_BYTE_SIZE} must be given with {SHM_REGION}")
    numbers = []
    for key, default in ((SHM_BYTE_SIZE, None), (SHM_OFFSET, 0)):
        value = _expect(params.get(key, default), int, f"{where}.parameters.{key}")
        if not 0 <= value <= MAX_INT64:
            raise InvalidInput(f"{where}.parameters.{key} must be a non-negative int64, got {value}")
        numbers.append(value)
    return ShmRef(region, numbers[0], numbers[1])


def _shape(value: Any, where: str) -> tuple[int, ...]:
    _expect(value, list, f"{where}.shape")
    if len(value) > MAX_RANK:
        raise InvalidInput(f"{where}.shape has rank {len(value)}, over {MAX_RANK}")
    for dim in value:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InvalidInput(f"{where}.shape must hold non-negative integers, got {value}")
        if dim > MAX_DIM:
            raise InvalidInput(f"{where}.shape has a dimension over {MAX_DIM}")
    if math.prod(d for d in value if d) > MAX_ELEMENTS:
        raise InvalidInput(f"{where}.shape describes more than {MAX_ELEMENTS} elements")
    return tuple(value)


def _from_json_data(data: Any, dtype: np.dtype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """JSON numbers as `dtype`, refusing anything a cast would change (no bool for 1, no 1.5 for 1)."""
    count = math.prod(shape)
    name = datatype_of(dtype)
    try:
        values = np.array(data, dtype=object)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidInput(f"{where}.data is not a regular array: {exc}") from None
    if values.ndim > MAX_RANK:
        raise InvalidInput(f"{where}.data is not a regular array: nested over {MAX_RANK} levels")
    if any(isinstance(v, list) for v in values.flat):
        raise InvalidInput(f"{where}.data is not a regular array: its lists differ in length")
    if values.size != count:
        raise InvalidInput(f"{where}.data has {values.size} elements, shape {list(shape)} needs {count}")
    kinds = {type(v) for v in values.flat}
    allowed = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}}[dtype.kind]
    if not kinds <= allowed:
        found = ", ".join(sorted(k.__name__ for k in kinds - allowed))
        raise InvalidInput(f"{where}.data holds {found} values, not {name}")
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if min(values.flat) < info.min or max(values.flat) > info.max:
            raise InvalidInput(f"{where}.data has values outside the range of {name}")
    try:
        with np.errstate(over="raise"):
            return values.astype(dtype).reshape(shape)
    except (FloatingPointError, OverflowError):
        raise InvalidInput(f"{where}.data has values outside the range of {name}") from None


def decode_request(
    body: bytes | memoryview, header_length: int | None, cache: HeaderCache | None = None
) -> InferRequest:
    """Turn an infer request body (JSON, optionally followed by binary tensors) into arrays,
    and `ShmTensor`s for the inputs in shared memory."""
    body = memoryview(body)
    if cache is not None:
        fits = header_length is None or 0 < header_length <= len(body)
        if fits and (hit := cache.decode(body, header_length)) is not None:
            return hit
        request = decode_request(body, header_length)
        cache.remember(body, header_length, request)
        return request
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not 0 < header_length <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} does not fit a {len(body)}-byte body"
            )
        header, binary = body[:header_length], body[header_length:]
    doc = _expect(parse_json(header), dict, "request")
    raw_inputs = _expect(doc.get("inputs"), list, "request.inputs")
    if not raw_inputs or len(raw_inputs) > MAX_TENSORS:
        raise InvalidInput(f"request.inputs must hold 1 to {MAX_TENSORS} tensors")
    inputs: dict[str, Tensor] = {}
    offset = json_inputs = 0
    for index, raw in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        _expect(raw, dict, where)
        name = _expect(raw.get("name"), str, f"{where}.name")
        datatype = _expect(raw.get("datatype"), str, f"{where}.datatype")
        if datatype not in DATATYPES:
            raise InvalidInput(f"{where}.datatype {datatype!r} is not supported")
        dtype = DATATYPES[datatype]
        shape = _shape(raw.get("shape"), where)
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        params = _expect(raw.get("parameters", {}), dict, f"{where}.parameters")
        ref = _shm_ref(params, where)
        size = params.get("binary_data_size")
        sources = (("data", "data" in raw), ("parameters.binary_data_size", size is not None),
                   (f"parameters.{SHM_REGION}", ref is not None))
        given = [what for what, there in sources if there]
        if not given:
            raise InvalidInput(f"input {name!r} has neither data nor parameters.binary_data_size "
                               f"nor parameters.{SHM_REGION}")
        if len(given) > 1:
            raise InvalidInput(f"input {name!r} has {' and '.join(given)}: give only one")
        needed = math.prod(shape) * dtype.itemsize
        if ref is not None:
            if ref.byte_size != needed:
                raise InvalidInput(
                    f"input {name!r}: {SHM_BYTE_SIZE} {ref.byte_size} but shape {list(shape)} of {datatype} "
                    f"needs {needed} bytes"
                )
            inputs[name] = ShmTensor(ref, dtype, shape)
        elif size is not None:
            _expect(size, int, f"{where}.parameters.binary_data_size")
            if size != needed:
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} but shape {list(shape)} of {datatype} "
                    f"needs {needed} bytes"
                )
            if offset + size > len(binary):
                left = len(binary) - offset
                raise InvalidInput(f"input {name!r}: binary data ends after {left} of {size} bytes")
            inputs[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            inputs[name] = _from_json_data(raw["data"], dtype, shape, where)
            json_inputs += 1
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    request_params = _expect(doc.get("parameters", {}), dict, "request.parameters")
    binary_default = bool(request_params.get("binary_data_output", False))
    outputs = _requested_outputs(doc, binary_default)
    request_id = doc.get("id")
    if request_id is not None:
        request_id = str(_expect(request_id, (str, int), "request.id"))
    return InferRequest(inputs, request_id, outputs, binary_default, request_params,
                        cacheable=json_inputs == 0)


def _requested_outputs(doc: dict, binary_default: bool) -> dict[str, OutputRequest] | None:
    """name -> binary, or where to write it; None (every output) when absent or empty, as in
    Triton and KServe."""
    raw_outputs = _expect(doc.get("outputs", []), list, "request.outputs")
    if not raw_outputs:
        return None
    if len(raw_outputs) > MAX_TENSORS:
        raise InvalidInput(f"request.outputs must hold at most {MAX_TENSORS} tensors")
    outputs: dict[str, OutputRequest] = {}
    for index, raw in enumerate(raw_outputs):
        where = f"outputs[{index}]"
        _expect(raw, dict, where)
        name = _expect(raw.get("name"), str, f"{where}.name")
        params = _expect(raw.get("parameters", {}), dict, f"{where}.parameters")
        ref = _shm_ref(params, where)
        if ref is not None:
            if params.get("binary_data") is True:
                raise InvalidInput(f"output {name!r} has both {SHM_REGION} and binary_data: give only one")
            outputs[name] = ref
        else:
            outputs[name] = bool(params.get("binary_data", binary_default))
    return outputs


def requested(outputs: dict[str, np.ndarray], request: InferRequest) -> dict[str, OutputRequest]:
    """What to do with each output the request asked for (every one when it named none);
    an output the model does not have is refused."""
    if request.outputs is None:
        return dict.fromkeys(outputs, request.binary_default)
    unknown = sorted(set(request.outputs) - set(outputs))
    if unknown:
        raise InvalidInput(f"unknown output {unknown[0]!r}; the model gives {sorted(outputs)}")
    return request.outputs


def encode_response(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[bytes, int | None]:
    """Body and JSON header length (None when the body is JSON only)."""
    parts, header_length = encode_response_parts(model_name, model_version, outputs, request)
    return b"".join(parts), header_length


def encode_response_parts(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[Parts, int | None]:
    """Like `encode_response`, but the body as parts to send without copying the tensors.

    Outputs asked for in shared memory must already be written there (the server does
    that); each is described with its parameters and no data."""
    wanted = requested(outputs, request)
    arrays = {name: np.asarray(outputs[name]) for name in wanted}
    blobs = [bytes_of(a) for n, a in arrays.items() if wanted[n] is True]
    reusable = request.id is None and all(how is not False for how in wanted.values())
    if reusable:  # the usual camera frame: reuse the header
        key = (model_name, model_version,
               *((n, a.dtype.str, a.shape, wanted[n]) for n, a in arrays.items()))
        header = _RESPONSE_HEADERS.get(key)
        if header is not None:
            return [header, *blobs], len(header) if blobs else None
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                           "outputs": describe(arrays, wanted)}
    if request.id is not None:
        doc["id"] = request.id
    header = strict_json.dumpb(doc)
    if reusable:
        _RESPONSE_HEADERS.put(key, header)
    return [header, *blobs], len(header) if blobs else None


_RESPONSE_HEADERS = BoundedCache(256)  # (model, version, output layout) -> JSON header
