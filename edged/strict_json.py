"""JSON that every parser reads, for everything edged sends out.

Python writes NaN and infinities as bare `NaN`/`Infinity` tokens, which JSON has not
got: a browser's or Go's parser rejects the whole document. A model output, a score or
an empty histogram's percentile can hold them, so they become `null` everywhere edged
speaks JSON (socket, MQTT, result files, command-line output). Binary tensors carry
them exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(document: Any, *, indent: int | None = None, default: Any = None) -> str:
    """`json.dumps`, compact unless `indent` is given, with non-finite numbers as null."""
    separators = (",", ":") if indent is None else None
    try:  # the usual case costs one pass: nothing to replace
        return json.dumps(document, separators=separators, indent=indent, allow_nan=False, default=default)
    except ValueError:
        return json.dumps(finite(document), separators=separators, indent=indent, default=default)


def dumpb(document: Any, *, default: Any = None) -> bytes:
    """Compact strict JSON as UTF-8 bytes."""
    return dumps(document, default=default).encode()


def finite(value: Any) -> Any:
    """The same document with every NaN and infinity replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
