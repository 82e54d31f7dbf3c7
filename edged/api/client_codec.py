"""Open Inference Protocol requests and responses on the client's side (`edged.client`,
the tools and tests): a request written as JSON with binary or shared-memory tensors, a
response read back into arrays. The server trusts none of it (`edged.api.codec`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edged.api.tensors import (
    DATATYPES,
    SHM_BYTE_SIZE,
    SHM_OFFSET,
    SHM_REGION,
    Parts,
    ShmRef,
    ShmTensor,
    Tensor,
    bytes_of,
    datatype_of,
    describe,
)
from edged.untrusted_json import parse_json


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
        tensors.extend(describe({name: array}, {name: binary}))
        if binary:
            blobs.append(bytes_of(array))
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
