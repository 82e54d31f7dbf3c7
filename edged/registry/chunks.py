"""One chunk request: checked as docs/updates.md says, answered from the file index.

Nothing here trusts the request: its size, its JSON, every field's type and range, and
its response topic (only `{prefix}/devices/{id}/fetch`, so a request can never make the
registry publish anywhere else) are checked before a byte is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.errors import EdgedError
from edged.registry.store import ServedFile
from edged.topics import Topics

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 4096
MAX_CORRELATION_BYTES = 256  # devices send 12; an MQTT property may hold 64 KiB
SHA256 = re.compile(r"[0-9a-f]{64}")
FIELDS = frozenset({"sha256", "offset", "length"})


class Refused(EdgedError):
    """A request answered with status=error; `kind` groups the log lines."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ChunkRequest:
    response_topic: str
    correlation: bytes
    sha256: str
    offset: int
    length: int


def response_topics(prefix: str) -> re.Pattern[str]:
    """The only topics the registry answers on: a device's own fetch topic."""
    return Topics(prefix).device_pattern("fetch")


def reply_address(message: mqtt.MQTTMessage, allowed: re.Pattern[str]) -> tuple[str, bytes | None] | None:
    """Where a reply may go (response topic, correlation data), or None: nowhere."""
    props = getattr(message, "properties", None)
    topic = getattr(props, "ResponseTopic", None)
    if not topic or not allowed.fullmatch(topic):
        return None
    correlation = getattr(props, "CorrelationData", None) or None
    if correlation is not None and len(correlation) > MAX_CORRELATION_BYTES:
        return None  # echoing it would cost what the sender chose
    return topic, correlation


def parse_request(message: mqtt.MQTTMessage, allowed: re.Pattern[str], max_chunk_bytes: int) -> ChunkRequest:
    """The request, or Refused saying in one line what is wrong with it."""
    address = reply_address(message, allowed)
    if address is None:
        props = getattr(message, "properties", None)
        if len(getattr(props, "CorrelationData", None) or b"") > MAX_CORRELATION_BYTES:
            raise Refused("bad correlation data", f"correlation data over {MAX_CORRELATION_BYTES} bytes; "
                          "not answered")
        topic = getattr(props, "ResponseTopic", None)
        raise Refused("bad response topic", f"response topic {str(topic)[:100]!r} is not {{prefix}}/devices/"
                      "{id}/fetch; not answered")
    topic, correlation = address
    if correlation is None:
        raise Refused("no correlation data", "chunk request without correlation data")
    if len(message.payload) > MAX_REQUEST_BYTES:
        raise Refused("too large", f"request is over {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(message.payload)
    except (ValueError, RecursionError):
        raise Refused("not JSON", "request is not JSON") from None
    if not isinstance(request, dict) or request.keys() != FIELDS:
        raise Refused("malformed", "request must be a JSON object with sha256, offset and length")
    sha256, offset, length = request["sha256"], request["offset"], request["length"]
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        raise Refused("malformed", "sha256 must be 64 lower-case hex digits")
    for name, value in (("offset", offset), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise Refused("malformed", f"{name} must be an integer")
    if offset < 0:
        raise Refused("bad offset", "offset must not be negative")
    if length <= 0 or length > max_chunk_bytes:
        raise Refused("bad length", f"length must be between 1 and {max_chunk_bytes}")
    return ChunkRequest(topic, correlation, sha256, offset, length)


def read_chunk(index: dict[str, ServedFile], request: ChunkRequest) -> bytes:
    """The requested bytes (fewer only at the end of the file), or Refused."""
    served = index.get(request.sha256)
    if served is None:
        raise Refused("unknown hash", f"no file with sha256 {request.sha256} (unknown or retired)")
    offset = request.offset
    if offset > served.size or (offset == served.size and served.size > 0):
        raise Refused("bad offset", f"offset {offset} is past the end of the file ({served.size} bytes)")
    wanted = min(request.length, served.size - offset)
    try:
        fd = os.open(served.path, os.O_RDONLY)
        try:
            data = os.pread(fd, wanted, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise Refused("unreadable", f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) != wanted:
        raise Refused("unreadable", "the file changed on the registry; try again")
    return data


def reply_properties(correlation: bytes | None, **user: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if correlation:
        props.CorrelationData = correlation
    for key, value in user.items():
        props.UserProperty = (key, value)  # paho appends each pair
    return props


class RateLimitedLog:
    """One warning per kind of problem per minute, with how many were not logged."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every_s:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return
            self._last[kind] = now
            quiet = self._quiet.pop(kind, 0)
        log.warning("%s%s", message, f" ({quiet} more like it not logged)" if quiet else "")
