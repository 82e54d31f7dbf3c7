"""JSON from peers we do not trust: the socket API's requests and the MQTT commands.

One parser for both, so both transports have the same nesting limit and say the same
thing past it. The limit is the interpreter's recursion limit, which the C decoder
enforces on every nested array or object (about 1,000 levels less the caller's depth):
far beyond any real request (tensor data nests at most 16 deep), and a document nested
past it is refused before it can end a thread with a `RecursionError`. Size limits stay
with each transport, which checks them before the bytes are read or parsed.
"""

from __future__ import annotations

import json
from typing import Any

from edged.errors import InvalidInput


def parse_json(data: bytes | memoryview, what: str = "request") -> Any:
    """Decode `data`; whatever is wrong with it is an `InvalidInput` naming `what`."""
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise InvalidInput(f"{what} JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not JSON: {exc}") from None
