"""Remembering decoded request layouts and encoded response headers, so a camera client
that sends the same header with every frame costs a dict lookup, not a JSON parse."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from edged.api.tensors import InferRequest, ShmTensor, Tensor


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
