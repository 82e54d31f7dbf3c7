"""HTTP/1.1 for one connection: heads checked by llhttp, bodies received in place.

The API speaks a narrow slice of HTTP (GET and POST with Content-Length,
keep-alive) to local clients. llhttp (httptools, as in uvicorn) checks the
syntax of each head; edged enforces every limit where the bytes arrive: header
size, body size, a deadline for the whole request, and an idle timeout. A body
is received straight into the buffer its tensors are read from.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools

MAX_HEADER_BYTES = 16 * 1024
HEAD_CHUNK = 8192
BODY_CHUNK = 1 << 20  # a head fits; the body is then received in place, not through this buffer
MAX_HEADERS = 100
PASSED_FDS = 4  # descriptors a request may carry (SCM_RIGHTS); more are closed at once
FDS_SPACE = socket.CMSG_SPACE(PASSED_FDS * 4)
# As a plain int: OR-ing the enum members costs more per receive than the system call does.
RECEIVE_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
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
    fds: list[int] = field(default_factory=list)  # descriptors passed with it (SCM_RIGHTS); see PASSED_FDS


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


def send_parts(sock: socket.socket, parts: list[bytes | memoryview], deadline: float | None = None) -> None:
    """sendall for several buffers in as few syscalls as the kernel allows, copying none.

    `deadline`: on a socket with SO_SNDTIMEO, a client that pauses reading is waited for
    until then (monotonic time), not dropped at the first timeout.
    """
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError:
            if deadline is None or time.monotonic() >= deadline:
                raise
            continue
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class _Head:
    """httptools callbacks: the target and headers of one request head."""

    __slots__ = ("count", "headers", "target")

    def __init__(self) -> None:
        self.target = b""
        self.headers: dict[str, str] = {}
        self.count = 0

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count += 1
        if self.count > MAX_HEADERS:
            raise HTTPError(431, f"more than {MAX_HEADERS} header lines")
        key = name.decode("latin-1").lower()
        if key in self.headers and key in ("content-length", "host", "inference-header-content-length"):
            raise HTTPError(400, f"header {name.decode('latin-1')} appears twice")
        self.headers[key] = value.decode("latin-1").strip()


def _parser_error(exc: Exception, head: bytes) -> HTTPError:
    """llhttp's reason, worded as the rest of edged's one-line errors."""
    reason = str(exc)
    if isinstance(exc, httptools.HttpParserInvalidMethodError | httptools.HttpParserInvalidURLError):
        line = head.split(b"\r\n", 1)[0][:80]
        return HTTPError(400, f"malformed request line {line!r}: {reason}")
    if "Duplicate Content-Length" in reason:
        return HTTPError(400, "header Content-Length appears twice")
    if "Content-Length" in reason:
        return HTTPError(400, f"bad Content-Length: {reason}")
    if "Transfer-Encoding" in reason:
        return HTTPError(411, "chunked bodies are not supported: send Content-Length")
    if "header" in reason.lower():
        return HTTPError(400, f"malformed header line: {reason}")
    return HTTPError(400, f"malformed request: {reason}")


def parse_head(head: bytes, max_body: int) -> Request:
    """A request head (up to and including its blank line), checked by llhttp and by our limits.

    llhttp (through httptools, as uvicorn uses it) is the security boundary for the
    syntax: request line, header tokens and values, Content-Length and
    Transfer-Encoding rules. A fresh parser per head costs about 1.5 µs.
    """
    if len(head) > MAX_HEADER_BYTES:
        raise HTTPError(431, f"request head over {MAX_HEADER_BYTES} bytes")
    found = _Head()
    parser = httptools.HttpRequestParser(found)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # edged never switches protocols: the request is served as plain HTTP/1.1
    except httptools.HttpParserError as exc:
        if isinstance(exc.__context__, HTTPError):  # raised by our callback, wrapped by httptools
            raise exc.__context__ from None
        raise _parser_error(exc, head) from None
    version = parser.get_http_version()
    if version not in ("1.0", "1.1"):
        raise HTTPError(505, f"HTTP/{version} is not supported: speak HTTP/1.1")
    headers = found.headers
    if "transfer-encoding" in headers:
        raise HTTPError(411, "chunked bodies are not supported: send Content-Length")
    length = parse_length(headers.get("content-length", "0"), "Content-Length")
    if length > max_body:
        raise HTTPError(413, f"body of {length} bytes is over the {max_body}-byte limit")
    tokens = {token.strip() for token in headers.get("connection", "").lower().split(",")}  # a token list
    keep_alive = "close" not in tokens if version == "1.1" else "keep-alive" in tokens
    path, _, query = found.target.decode("latin-1").partition("?")
    method = parser.get_method().decode("latin-1")
    return Request(method, path, query, headers, memoryview(b""), keep_alive, f"HTTP/{version}", length)


def head_end(buffer: bytearray) -> int:
    """Where the head in `buffer` ends (past its blank line), or -1 while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


class Connection:
    """One client connection: the bytes received so far, who the peer is, and the
    blocking reads and writes a worker does once a request's head has arrived."""

    def __init__(
        self, sock: socket.socket, *, max_body: int, request_timeout: float, idle_timeout: float
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.buffer = bytearray()
        self.deadline = time.monotonic() + idle_timeout  # idle, then for the request from its first byte
        self.requests = 0  # answered on this connection
        self.queued_at = 0.0  # when it was last handed to the worker pool
        self.passed_fds: list[int] = []  # received with the next request's head, not yet taken
        self.accepted = time.monotonic()
        self.peer: Any = None  # who connected (edged.api.access.Peer), set by the server
        self.parked = False  # True while the event loop, not a worker, owns the connection
        # A blocking socket with kernel timeouts, set once: no poll() before every recv and
        # send as Python does for sockets with a timeout. Deadlines are checked between calls;
        # the event loop reads the same socket with MSG_DONTWAIT.
        sock.settimeout(None)
        step = min(request_timeout, idle_timeout, 1.0)
        timeval = struct.pack("ll", int(step), int((step % 1) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def receive(self) -> bool:
        """Take what the kernel holds without waiting; False when the peer has closed.

        Descriptors sent with a request's head (SCM_RIGHTS: a sealed memfd to register as a
        shared-memory region) are kept for that request, at most PASSED_FDS; any more are
        closed. Those sent with a body are dropped by the kernel (the body is read without
        room for them)."""
        try:
            chunk, ancillary, _, _ = self.sock.recvmsg(HEAD_CHUNK, FDS_SPACE, RECEIVE_FLAGS)
        except BlockingIOError:
            return True
        except OSError:
            return False
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i", data[: len(data) - len(data) % 4])
                for fd in fds:
                    if len(self.passed_fds) < PASSED_FDS:
                        self.passed_fds.append(fd)
                    else:
                        os.close(fd)
        if not chunk:
            return False
        if not self.buffer:  # a request starts: it has request_timeout to arrive whole
            self.deadline = time.monotonic() + self.request_timeout
        self.buffer += chunk
        return True

    def close_passed_fds(self) -> None:
        for fd in self.passed_fds:
            os.close(fd)
        self.passed_fds.clear()

    def take_head(self) -> Request | None:
        """The next request's head if it has arrived whole (HTTPError when it is bad)."""
        end = head_end(self.buffer)
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise HTTPError(431, f"request head over {MAX_HEADER_BYTES} bytes")
            return None
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        return parse_head(head, self.max_body)

    def read_body(self, request: Request) -> None:
        """Receive the body of a request whose head was accepted."""
        if request.length and request.headers.get("expect", "").lower() == "100-continue" \
                and request.version == "HTTP/1.1":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.body = self._read_body(request.length, self.deadline)

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

    def discard_body(self, length: int | None, limit: int, seconds: float) -> None:
        """Read and drop what the client still sends, so that it reads our answer rather
        than a reset (a Unix socket closed with unread data resets its peer).

        `length` None: until the client stops sending (a head we could not read).
        Bounded in bytes and time: a client that keeps sending is closed anyway.
        """
        drop = len(self.buffer)
        self.buffer.clear()
        want = limit if length is None else min(length, limit)
        deadline = time.monotonic() + seconds
        scratch = bytearray(BODY_CHUNK)
        while drop < want and time.monotonic() < deadline:
            try:
                n = self.sock.recv_into(scratch, min(len(scratch), want - drop))
            except BlockingIOError:  # SO_RCVTIMEO: look at the deadline again
                continue
            except OSError:
                return
            if n == 0:
                return
            drop += n

    def send_stream(self, response: Response, http10: bool = False) -> None:
        """A long-lived response, chunked (HTTP/1.0: ended by closing); ends when its iterator
        does or the client goes (a client that stops reading for `request_timeout`)."""
        assert response.stream is not None
        chunked = "" if http10 else "Transfer-Encoding: chunked\r\n"
        head = (f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
                f"Content-Type: {response.content_type}\r\n{chunked}"
                "Cache-Control: no-cache\r\nConnection: close\r\n\r\n").encode("latin-1")
        send_parts(self.sock, [head], time.monotonic() + self.request_timeout)
        for chunk in response.stream:
            parts = [chunk] if http10 else [f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n"]
            send_parts(self.sock, parts, time.monotonic() + self.request_timeout)
        if not http10:
            send_parts(self.sock, [b"0\r\n\r\n"], time.monotonic() + self.request_timeout)

    def send(
        self, response: Response, keep_alive: bool, http10: bool = False, head_only: bool = False
    ) -> None:
        if response.stream is not None and not head_only:
            self.send_stream(response, http10)
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
        # A client that stops reading for request_timeout is dropped instead of holding us forever.
        send_parts(self.sock, [head] if head_only else [head, *body], time.monotonic() + self.request_timeout)
