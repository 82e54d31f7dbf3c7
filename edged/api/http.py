"""A small, strict HTTP/1.1 reader and writer for one connection.

The API speaks a narrow slice of HTTP (GET and POST with Content-Length,
keep-alive) to local clients; writing it here keeps a request to a few
syscalls and lets every limit be enforced where the bytes arrive: header
size, body size, a deadline for the whole request, and an idle timeout.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024
HEAD_CHUNK = 8192
BODY_CHUNK = 1 << 20  # a head fits; the body is then received in place, not through this buffer
MAX_HEADERS = 100
REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class HTTPError(Exception):
    """A request that cannot be read; the connection answers `status` and closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The peer closed the connection or let it idle out; nothing to answer."""


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: memoryview
    keep_alive: bool
    version: str = "HTTP/1.1"
    length: int = 0


def parse_length(text: str, name: str) -> int:
    """A byte count from a header: ASCII digits only (latin-1 '²' passes str.isdigit)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise HTTPError(400, f"bad {name} {text[:20]!r}")
    return int(text)


@dataclass
class Response:
    status: int
    body: bytes | list[bytes | memoryview]  # a list is sent as is, without joining
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    stream: Iterator[bytes] | None = None  # sent chunked after the head; the connection then closes


def send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """sendall for several buffers in as few syscalls as the kernel allows, copying none."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class Connection:
    def __init__(
        self, sock: socket.socket, *, max_body: int, request_timeout: float, idle_timeout: float
    ) -> None:
        self.sock = sock
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.buffer = bytearray()
        self.in_request = False  # from a request's first byte until its response is sent
        # A blocking socket with kernel timeouts, set once: no poll() before every recv and
        # send as Python does for sockets with a timeout. Deadlines are checked between calls.
        sock.settimeout(None)
        step = min(request_timeout, idle_timeout)
        timeval = struct.pack("ll", int(step), int((step % 1) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def _fill(self, deadline: float, idle: bool = False) -> None:
        while True:
            if time.monotonic() >= deadline:
                raise ClientGone("idle") if idle else HTTPError(408, "request not received in time")
            try:
                chunk = self.sock.recv(HEAD_CHUNK)
                break
            except BlockingIOError:  # SO_RCVTIMEO expired: look at the deadline again
                continue
            except (ConnectionResetError, BrokenPipeError):
                raise ClientGone("reset") from None
        if not chunk:
            raise ClientGone("closed")
        self.buffer += chunk

    def read_head(self) -> Request:
        """The request line and headers; the body is read by `read_body` once they pass."""
        self.in_request = False
        if not self.buffer:
            self._fill(time.monotonic() + self.idle_timeout, idle=True)
        self.in_request = True
        deadline = time.monotonic() + self.request_timeout
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise HTTPError(431, f"request head over {MAX_HEADER_BYTES} bytes")
            self._fill(deadline)
        if end > MAX_HEADER_BYTES:
            raise HTTPError(431, f"request head over {MAX_HEADER_BYTES} bytes")
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HTTPError(400, f"malformed request line {lines[0][:80]!r}")
        method, target, version = parts
        if len(lines) - 1 > MAX_HEADERS:
            raise HTTPError(431, f"more than {MAX_HEADERS} header lines")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HTTPError(400, f"malformed header line {line[:80]!r}")
            key = name.lower()
            if key in headers and key in ("content-length", "host", "inference-header-content-length"):
                raise HTTPError(400, f"header {name} appears twice")
            headers[key] = value.strip()
        if "transfer-encoding" in headers:
            raise HTTPError(411, "chunked bodies are not supported: send Content-Length")
        length = parse_length(headers.get("content-length", "0"), "Content-Length")
        if length > self.max_body:
            raise HTTPError(413, f"body of {length} bytes is over the {self.max_body}-byte limit")
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        path, _, query = target.partition("?")
        self._deadline = deadline
        return Request(method, path, query, headers, memoryview(b""), keep_alive, version, length)

    def read_body(self, request: Request) -> None:
        """Receive the body of a request whose head was accepted."""
        if request.length and request.headers.get("expect", "").lower() == "100-continue" \
                and request.version == "HTTP/1.1":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.body = self._read_body(request.length, self._deadline)

    def _read_body(self, length: int, deadline: float) -> memoryview:
        if len(self.buffer) >= length:
            body = self.buffer[:length]  # a writable copy: tensors may be shared with the runtime
            del self.buffer[:length]
            return memoryview(body)
        # The buffer grows with what arrives (doubling from 1 MiB), so a client that
        # announces a large body without sending it cannot make us allocate it.
        have = len(self.buffer)
        body = bytearray(min(length, max(have, BODY_CHUNK)))
        body[:have] = self.buffer
        self.buffer.clear()
        while have < length:
            if time.monotonic() > deadline:
                raise HTTPError(408, f"body not received in time ({have} of {length} bytes)")
            if have == len(body):
                body.extend(bytes(min(len(body), length - len(body))))
            try:
                n = self.sock.recv_into(memoryview(body)[have:])
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                raise ClientGone("reset") from None
            if n == 0:
                raise ClientGone("closed mid-body")
            have += n
        return memoryview(body)

    def send_stream(self, response: Response) -> None:
        """A long-lived chunked response; ends when its iterator does or the client goes."""
        assert response.stream is not None
        head = (f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
                f"Content-Type: {response.content_type}\r\nTransfer-Encoding: chunked\r\n"
                "Cache-Control: no-cache\r\nConnection: close\r\n\r\n").encode("latin-1")
        self.sock.sendall(head)
        for chunk in response.stream:
            send_parts(self.sock, [f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n"])
        self.sock.sendall(b"0\r\n\r\n")

    def send(
        self, response: Response, keep_alive: bool, http10: bool = False, head_only: bool = False
    ) -> None:
        if response.stream is not None and not head_only:
            self.send_stream(response)
            return
        body = response.body if isinstance(response.body, list) else [response.body]
        lines = [
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {sum(len(part) for part in body)}",
        ]
        for name, value in (response.headers or {}).items():
            lines.append(f"{name}: {value}")
        if not keep_alive:
            lines.append("Connection: close")
        elif http10:
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # A client that stops reading times out (SO_SNDTIMEO) instead of holding us forever.
        send_parts(self.sock, [head] if head_only else [head, *body])
