"""Open Inference Protocol (KServe v2) tensors: JSON and the binary extension.

Shared by the server and `edged.client`. A request is untrusted: every size,
shape and type is checked before any array is built, and nothing is cast.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edged import strict_json
from edged.errors import InvalidInput
from edged.untrusted_json import parse_json

HEADER_LENGTH = "inference-header-content-length"
MAX_RANK = 16
MAX_TENSORS = 256
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**40

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
DATATYPE_OF: dict[np.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype) -> str:
    try:
        return DATATYPE_OF[np.dtype(dtype)]
    except KeyError:
        raise InvalidInput(f"dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: dict[str, bool] | None = None  # name -> binary; None means all outputs
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    all_binary: bool = False  # every input came as binary data


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InvalidInput(f"{where} must be {_article(names)}")
    return value


def _article(name: str) -> str:
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer",
            "bool": "true or false"}.get(name, name)


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


class BoundedCache:
    """A small thread-safe map that forgets its oldest entry when full."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        return self._entries.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            if key not in self._entries and len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = value


class HeaderCache:
    """Remembers what a JSON header decoded to, keyed by its exact bytes.

    A camera client sends the same header with every frame; only the tensor
    bytes change. Only small headers whose tensors are all binary are kept, and
    only their layout (never a tensor), so a hit is just slicing the body.
    """

    MAX_HEADER = 4096

    def __init__(self, size: int = 256) -> None:
        self._cache = BoundedCache(size)

    def decode(self, body: memoryview, header_length: int) -> InferRequest | None:
        if header_length > self.MAX_HEADER:
            return None
        entry = self._cache.get(bytes(body[:header_length]))
        if entry is None:
            return None
        plan, template = entry
        binary = body[header_length:]
        if len(binary) != sum(size for *_, size in plan):
            return None  # let the full decoder name the problem
        inputs, offset = {}, 0
        for name, dtype, shape, size in plan:
            inputs[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        return InferRequest(inputs, template.id, template.outputs, template.binary_default,
                            template.parameters, all_binary=True)

    def remember(self, body: memoryview, header_length: int, request: InferRequest) -> None:
        if header_length > self.MAX_HEADER or not request.all_binary:
            return
        plan = [(n, a.dtype, a.shape, a.nbytes) for n, a in request.inputs.items()]
        template = InferRequest({}, request.id, request.outputs, request.binary_default, request.parameters)
        self._cache.put(bytes(body[:header_length]), (plan, template))


def decode_request(
    body: bytes | memoryview, header_length: int | None, cache: HeaderCache | None = None
) -> InferRequest:
    """Turn an infer request body (JSON, optionally followed by binary tensors) into arrays."""
    body = memoryview(body)
    if cache is not None and header_length is not None:
        if 0 < header_length <= len(body) and (hit := cache.decode(body, header_length)) is not None:
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
    inputs: dict[str, np.ndarray] = {}
    offset = binary_inputs = 0
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
        size = params.get("binary_data_size")
        if size is not None:
            _expect(size, int, f"{where}.parameters.binary_data_size")
            needed = math.prod(shape) * dtype.itemsize
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
            binary_inputs += 1
        elif "data" in raw:
            inputs[name] = _from_json_data(raw["data"], dtype, shape, where)
        else:
            raise InvalidInput(f"input {name!r} has neither data nor parameters.binary_data_size")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    request_params = _expect(doc.get("parameters", {}), dict, "request.parameters")
    binary_default = bool(request_params.get("binary_data_output", False))
    outputs = None
    if "outputs" in doc:
        outputs = {}
        for index, raw in enumerate(_expect(doc["outputs"], list, "request.outputs")):
            _expect(raw, dict, f"outputs[{index}]")
            name = _expect(raw.get("name"), str, f"outputs[{index}].name")
            params = _expect(raw.get("parameters", {}), dict, f"outputs[{index}].parameters")
            outputs[name] = bool(params.get("binary_data", binary_default))
    request_id = doc.get("id")
    if request_id is not None:
        request_id = str(_expect(request_id, (str, int), "request.id"))
    return InferRequest(inputs, request_id, outputs, binary_default, request_params,
                        all_binary=binary_inputs == len(inputs))


Parts = list[bytes | memoryview]


def encode_response(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[bytes, int | None]:
    """Body and JSON header length (None when the body is JSON only)."""
    parts, header_length = encode_response_parts(model_name, model_version, outputs, request)
    return b"".join(parts), header_length


def encode_response_parts(
    model_name: str, model_version: str, outputs: dict[str, np.ndarray], request: InferRequest
) -> tuple[Parts, int | None]:
    """Like `encode_response`, but the body as parts to send without copying the tensors."""
    wanted = request.outputs
    if wanted is None:
        wanted = dict.fromkeys(outputs, request.binary_default)
    else:
        unknown = sorted(set(wanted) - set(outputs))
        if unknown:
            raise InvalidInput(f"unknown output {unknown[0]!r}; the model gives {sorted(outputs)}")
    if request.id is None and all(wanted.values()):  # the usual camera frame: reuse the header
        arrays = [np.ascontiguousarray(outputs[name]) for name in wanted]
        key = (model_name, model_version,
               *((n, a.dtype.str, a.shape) for n, a in zip(wanted, arrays, strict=True)))
        header = _RESPONSE_HEADERS.get(key)
        if header is not None:
            return [header, *(memoryview(a.reshape(-1)).cast("B") for a in arrays)], len(header)
    tensors, blobs = _encode_tensors({name: (outputs[name], binary) for name, binary in wanted.items()})
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request.id is not None:
        doc["id"] = request.id
    header = strict_json.dumpb(doc)
    if request.id is None and all(wanted.values()):
        _RESPONSE_HEADERS.put(key, header)
    return [header, *blobs], len(header) if blobs else None


_RESPONSE_HEADERS = BoundedCache(256)  # (model, version, output layout) -> JSON header


def _encode_tensors(arrays: dict[str, tuple[np.ndarray, bool]]) -> tuple[list[dict], list[memoryview]]:
    """Tensor descriptions and, for those sent as binary, views of their bytes in order."""
    tensors, blobs = [], []
    for name, (value, binary) in arrays.items():
        array = np.asarray(value)
        tensor: dict[str, Any] = {
            "name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)
        }
        if binary:
            blob = memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    return tensors, blobs


def encode_request(
    inputs: dict[str, np.ndarray], *, binary: bool = True, outputs: list[str] | None = None,
    binary_outputs: bool = True, request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Client side: body and JSON header length for an infer request."""
    parts, header_length = encode_request_parts(
        inputs, binary=binary, outputs=outputs, binary_outputs=binary_outputs, request_id=request_id
    )
    return b"".join(parts), header_length


def encode_request_parts(
    inputs: dict[str, np.ndarray], *, binary: bool = True, outputs: list[str] | None = None,
    binary_outputs: bool = True, request_id: str | None = None,
) -> tuple[Parts, int | None]:
    """Like `encode_request`, but the body as parts to send without copying the tensors."""
    tensors, blobs = _encode_tensors({name: (array, binary) for name, array in inputs.items()})
    doc: dict[str, Any] = {"inputs": tensors, "parameters": {"binary_data_output": binary_outputs}}
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs]
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    return [header, *blobs], len(header) if blobs else None


def decode_response(
    body: bytes | bytearray | memoryview, header_length: int | None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Client side: the response document and its output arrays."""
    view = memoryview(body)
    header = view if header_length is None else view[:header_length]
    binary = memoryview(b"") if header_length is None else view[header_length:]
    doc = parse_json(header, "response")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in doc.get("outputs", []):
        dtype = DATATYPES[tensor["datatype"]]
        shape = tuple(tensor["shape"])
        size = tensor.get("parameters", {}).get("binary_data_size")
        if size is not None:
            arrays[tensor["name"]] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            arrays[tensor["name"]] = np.array(tensor["data"], dtype=dtype).reshape(shape)
    return doc, arrays
