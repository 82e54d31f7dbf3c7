"""Open Inference Protocol (KServe v2) tensors: JSON, the binary extension and the system
shared memory extension's parameters.

Shared by the server and `edged.client`. A request is untrusted: every size,
shape and type is checked before any array is built, and nothing is cast.
A tensor in shared memory is decoded to a `ShmTensor` (which region, where, how
many bytes): the codec never touches a region; the server resolves it through
the caller's own regions (`edged.api.shared_memory`).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field, replace
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
MAX_INT64 = 2**63 - 1  # the extension's offsets and sizes are int64
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"

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


@dataclass(frozen=True)
class ShmRef:
    """`byte_size` bytes from `offset` in the caller's registered region `region`: the
    extension's `shared_memory_region`, `shared_memory_offset` and `shared_memory_byte_size`."""

    region: str
    byte_size: int
    offset: int = 0

    def parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {SHM_REGION: self.region, SHM_BYTE_SIZE: self.byte_size}
        if self.offset:  # optional, 0 by default (Triton sends it only when set)
            params[SHM_OFFSET] = self.offset
        return params


@dataclass(frozen=True)
class ShmTensor:
    """A tensor whose bytes are in a region: an input the server reads there, or an output
    the server wrote there."""

    ref: ShmRef
    dtype: np.dtype
    shape: tuple[int, ...]

    @classmethod
    def at(cls, region: str, dtype: Any, shape: tuple[int, ...] | list[int], offset: int = 0) -> ShmTensor:
        """The tensor of `dtype` and `shape` at `offset` in `region` (its byte size follows)."""
        dtype, shape = np.dtype(dtype), tuple(shape)
        return cls(ShmRef(region, math.prod(shape) * dtype.itemsize, offset), dtype, shape)


Tensor = np.ndarray | ShmTensor
OutputRequest = bool | ShmRef  # binary (True) or JSON (False), or where in a region to write it


@dataclass
class InferRequest:
    inputs: dict[str, Tensor]  # ShmTensor for an input in shared memory: resolve before inferring
    id: str | None = None
    outputs: dict[str, OutputRequest] | None = None  # None means all outputs
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    cacheable: bool = False  # no input came as JSON data: its layout may be remembered

    @property
    def uses_shared_memory(self) -> bool:
        return any(isinstance(v, ShmTensor) for v in self.inputs.values()) or any(
            isinstance(v, ShmRef) for v in (self.outputs or {}).values())


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
    bytes change (or, with shared memory, nothing changes: the body is the same
    small JSON each time). Only small headers with no JSON data are kept, and
    only their layout (never a tensor), so a hit is slicing the body, or
    nothing at all: a dict lookup, not a JSON parse.
    """

    MAX_HEADER = 4096

    def __init__(self, size: int = 256) -> None:
        self._cache = BoundedCache(size)

    def decode(self, body: memoryview, header_length: int | None) -> InferRequest | None:
        length = len(body) if header_length is None else header_length
        if length > self.MAX_HEADER:
            return None
        entry = self._cache.get((header_length is None, bytes(body[:length])))
        if entry is None:
            return None
        plan, template = entry
        binary = body[length:]
        if len(binary) != sum(how[2] for _, how in plan if not isinstance(how, ShmTensor)):
            return None  # let the full decoder name the problem
        inputs: dict[str, Tensor] = {}
        offset = 0
        for name, how in plan:
            if isinstance(how, ShmTensor):  # a description of where it is: safe to share
                inputs[name] = how
                continue
            dtype, shape, size = how
            inputs[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        return InferRequest(inputs, template.id, template.outputs, template.binary_default,
                            template.parameters, cacheable=True)

    def remember(self, body: memoryview, header_length: int | None, request: InferRequest) -> None:
        length = len(body) if header_length is None else header_length
        if length > self.MAX_HEADER or not request.cacheable:
            return
        plan = [(n, v if isinstance(v, ShmTensor) else (v.dtype, v.shape, v.nbytes))
                for n, v in request.inputs.items()]
        template = InferRequest({}, request.id, request.outputs, request.binary_default, request.parameters)
        self._cache.put((header_length is None, bytes(body[:length])), (plan, template))


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


Parts = list[bytes | memoryview]


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
    blobs = [_bytes_of(a) for n, a in arrays.items() if wanted[n] is True]
    reusable = request.id is None and all(how is not False for how in wanted.values())
    if reusable:  # the usual camera frame: reuse the header
        key = (model_name, model_version,
               *((n, a.dtype.str, a.shape, wanted[n]) for n, a in arrays.items()))
        header = _RESPONSE_HEADERS.get(key)
        if header is not None:
            return [header, *blobs], len(header) if blobs else None
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                           "outputs": _describe(arrays, wanted)}
    if request.id is not None:
        doc["id"] = request.id
    header = strict_json.dumpb(doc)
    if reusable:
        _RESPONSE_HEADERS.put(key, header)
    return [header, *blobs], len(header) if blobs else None


_RESPONSE_HEADERS = BoundedCache(256)  # (model, version, output layout) -> JSON header


def _bytes_of(array: np.ndarray) -> memoryview:
    """A flat byte view of the array, copying only one that is not contiguous."""
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")


def _describe(arrays: dict[str, np.ndarray], how: dict[str, OutputRequest]) -> list[dict]:
    """Tensor descriptions: binary ones with their size (their bytes follow the JSON in
    order), JSON ones with their data, shared-memory ones with where they are."""
    tensors = []
    for name, array in arrays.items():
        tensor: dict[str, Any] = {
            "name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)
        }
        place = how[name]
        if isinstance(place, ShmRef):  # described with the bytes written there
            tensor["parameters"] = replace(place, byte_size=array.nbytes).parameters()
        elif place:
            tensor["parameters"] = {"binary_data_size": array.nbytes}
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    return tensors


def encode_request(
    inputs: dict[str, Tensor], *, binary: bool = True,
    outputs: list[str] | dict[str, ShmRef | None] | None = None,
    binary_outputs: bool = True, request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Client side: body and JSON header length for an infer request."""
    parts, header_length = encode_request_parts(
        inputs, binary=binary, outputs=outputs, binary_outputs=binary_outputs, request_id=request_id
    )
    return b"".join(parts), header_length


def encode_request_parts(
    inputs: dict[str, Tensor], *, binary: bool = True,
    outputs: list[str] | dict[str, ShmRef | None] | None = None,
    binary_outputs: bool = True, request_id: str | None = None,
) -> tuple[Parts, int | None]:
    """Like `encode_request`, but the body as parts to send without copying the tensors.

    An input given as a `ShmTensor` is read by the server from that region; an output
    mapped to a `ShmRef` is written there (None: sent back as the others are)."""
    tensors, blobs = [], []
    for name, value in inputs.items():
        if isinstance(value, ShmTensor):
            tensors.append({"name": name, "datatype": datatype_of(value.dtype), "shape": list(value.shape),
                            "parameters": value.ref.parameters()})
            continue
        array = np.asarray(value)
        tensors.extend(_describe({name: array}, {name: binary}))
        if binary:
            blobs.append(_bytes_of(array))
    doc: dict[str, Any] = {"inputs": tensors, "parameters": {"binary_data_output": binary_outputs}}
    if outputs is not None:
        places = outputs if isinstance(outputs, dict) else dict.fromkeys(outputs)
        doc["outputs"] = [{"name": n, "parameters": ref.parameters() if ref is not None
                           else {"binary_data": binary_outputs}} for n, ref in places.items()]
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    return [header, *blobs], len(header) if blobs else None


def decode_response(
    body: bytes | bytearray | memoryview, header_length: int | None
) -> tuple[dict, dict[str, Tensor]]:
    """Client side: the response document and its output arrays (a `ShmTensor`, where the
    server wrote it, for an output asked for in shared memory)."""
    view = memoryview(body)
    header = view if header_length is None else view[:header_length]
    binary = memoryview(b"") if header_length is None else view[header_length:]
    doc = parse_json(header, "response")
    arrays: dict[str, Tensor] = {}
    offset = 0
    for tensor in doc.get("outputs", []):
        dtype = DATATYPES[tensor["datatype"]]
        shape = tuple(tensor["shape"])
        params = tensor.get("parameters", {})
        size = params.get("binary_data_size")
        if SHM_REGION in params:
            ref = ShmRef(params[SHM_REGION], params[SHM_BYTE_SIZE], params.get(SHM_OFFSET, 0))
            arrays[tensor["name"]] = ShmTensor(ref, dtype, shape)
        elif size is not None:
            arrays[tensor["name"]] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            arrays[tensor["name"]] = np.array(tensor["data"], dtype=dtype).reshape(shape)
    return doc, arrays
