"""The Open Inference Protocol's tensors as both sides see them: datatypes and limits,
references into shared memory, a decoded request, and the tensor descriptions both the
server's responses and the client's requests are written with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edged.errors import InvalidInput

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


Parts = list[bytes | memoryview]


def bytes_of(array: np.ndarray) -> memoryview:
    """A flat byte view of the array, copying only one that is not contiguous."""
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")


def describe(arrays: dict[str, np.ndarray], how: dict[str, OutputRequest]) -> list[dict]:
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
