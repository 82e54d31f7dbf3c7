"""A small, fast client for the edged socket API.

One keep-alive connection, the binary tensor extension by default, and errors
raised as `ClientError` carrying the server's one-line message. Tensors may also
stay in system shared memory (Triton's extension): register a segment as a region,
give inputs as `ShmTensor`s and ask for outputs at `ShmRef`s.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from edged.api import client_codec
from edged.api.http import send_parts
from edged.api.tensors import Parts, ShmRef, ShmTensor
from edged.errors import EdgedError


class ClientError(EdgedError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Client:
    def __init__(self, socket_path: str | Path, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    # --- API ----------------------------------------------------------------
    def live(self) -> bool:
        return self.request("GET", "/v2/health/live")[0] == 200

    def ready(self) -> bool:
        return self.request("GET", "/v2/health/ready")[0] == 200

    def server_metadata(self) -> dict:
        return self._json("GET", "/v2")

    def metadata(self, model: str, version: str | None = None) -> dict:
        return self._json("GET", _model_path(model, version))

    def status(self) -> dict:
        return self._json("GET", "/v2/edged/status")

    def pipelines(self) -> dict:
        return self._json("GET", "/v2/edged/pipelines")

    def pipeline_control(self, name: str, action: str) -> dict:
        """action: start, stop or restart."""
        return self._json("POST", f"/v2/edged/pipelines/{name}/{action}")

    def metrics(self) -> str:
        status, _, body = self.request("GET", "/metrics")
        if status != 200:
            raise ClientError(status, body.decode(errors="replace"))
        return body.decode()

    def infer(
        self, model: str, inputs: dict[str, np.ndarray | ShmTensor], *, version: str | None = None,
        binary: bool = True, outputs: list[str] | dict[str, ShmRef | None] | None = None,
    ) -> dict[str, np.ndarray | ShmTensor]:
        """Run `model` on `inputs`; returns its outputs by name (all, or those in `outputs`).

        An input given as a `ShmTensor` is read from that registered region; an output
        mapped to a `ShmRef` in `outputs` is written there and returned as the `ShmTensor`
        saying where, its dtype and shape (an output mapped to None comes back as an array)."""
        return self.infer_full(model, inputs, version=version, binary=binary, outputs=outputs)[1]

    def infer_full(
        self, model: str, inputs: dict[str, np.ndarray | ShmTensor], *, version: str | None = None,
        binary: bool = True, outputs: list[str] | dict[str, ShmRef | None] | None = None,
    ) -> tuple[dict, dict[str, np.ndarray | ShmTensor]]:
        """Like `infer`, also returning the response document (model_version, id)."""
        body, header_length = client_codec.encode_request_parts(
            inputs, binary=binary, outputs=outputs, binary_outputs=binary
        )
        headers = {"Content-Type": "application/octet-stream" if header_length else "application/json"}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        status, response_headers, data = self.request("POST", _model_path(model, version) + "/infer",
                                                      body, headers)
        if status != 200:
            raise ClientError(status, _error_text(data))
        length = response_headers.get("inference-header-content-length")
        return client_codec.decode_response(data, int(length) if length else None)

    # --- system shared memory ----------------------------------------------------
    def register_system_shared_memory(self, name: str, key: str, byte_size: int, offset: int = 0) -> None:
        """Register `byte_size` bytes from `offset` of the segment `key` ("/name", under
        /dev/shm, which this process's user must be able to read and write) as region `name`."""
        body = json.dumps({"key": key, "offset": offset, "byte_size": byte_size}).encode()
        self._json("POST", f"{_SHM}{_region(name)}/register", body)

    def register_memfd(self, name: str, fd: int, byte_size: int, offset: int = 0) -> None:
        """Register a memfd as region `name`, passing the descriptor itself over the socket: the
        zero-copy way (an edged extension). It must be sealed against shrinking, e.g.
        `fd = os.memfd_create("camera0", os.MFD_ALLOW_SEALING)`, `os.ftruncate(fd, size)`,
        `fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)`; the daemon then maps it and
        reads inputs and writes outputs in place. This process keeps its own `fd`."""
        body = json.dumps({"memfd": True, "offset": offset, "byte_size": byte_size}).encode()
        status, _, data = self.request("POST", f"{_SHM}{_region(name)}/register", body, fds=[fd])
        if status != 200:
            raise ClientError(status, _error_text(data))

    def unregister_system_shared_memory(self, name: str | None = None) -> None:
        """Unregister region `name`, or all of this user's regions."""
        self._json("POST", f"{_SHM}{_region(name)}/unregister")

    def get_system_shared_memory_status(self, name: str | None = None) -> list[dict]:
        """[{"name", "key", "offset", "byte_size"}] of region `name`, or of all this user's regions."""
        return self._json("GET", f"{_SHM}{_region(name)}/status")

    # --- HTTP -----------------------------------------------------------------
    def _json(self, method: str, path: str, body: bytes = b"") -> Any:
        status, _, data = self.request(method, path, body)
        if status != 200:
            raise ClientError(status, _error_text(data))
        return json.loads(bytes(data)) if data else None

    def request(
        self, method: str, path: str, body: bytes | Parts = b"", headers: dict[str, str] | None = None,
        fds: list[int] | None = None,
    ) -> tuple[int, dict[str, str], bytearray]:
        """`fds`: descriptors passed with the request (SCM_RIGHTS), as `register_memfd` does."""
        parts = body if isinstance(body, list) else [body]
        length = sum(len(p) for p in parts)
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {length}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        message = [("\r\n".join(head) + "\r\n\r\n").encode(), *parts]
        for attempt in (1, 2):
            fresh = self._sock is None
            sock = self._connect()
            try:
                try:
                    if fds:  # the descriptors go with the head's first byte
                        sent = socket.send_fds(sock, [message[0]], fds)
                        message = [message[0][sent:], *message[1:]]
                    send_parts(sock, message)
                except BrokenPipeError:
                    # The server may have refused the request early (413, 503) and closed:
                    # its answer is still there to read.
                    return self._read_response()
                return self._read_response()
            except (ConnectionError, _Closed):
                self.close()
                if not fresh and attempt == 1:
                    continue  # the server closed an idle keep-alive connection: retry once
                raise
        raise AssertionError("unreachable")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise EdgedError(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from None
            self._sock = sock
        return self._sock

    def _read_response(self) -> tuple[int, dict[str, str], bytearray]:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._recv()
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        have = min(length, len(self._buffer))
        body = bytearray(length)
        body[:have] = self._buffer[:have]
        del self._buffer[:have]
        if have < length:  # read the rest straight into place
            view = memoryview(body)
            assert self._sock is not None
            while have < length:
                n = self._sock.recv_into(view[have:])
                if n == 0:
                    raise _Closed("server closed the connection")
                have += n
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def _recv(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise _Closed("server closed the connection")
        self._buffer += chunk


class _Closed(Exception):
    pass


_SHM = "/v2/systemsharedmemory"


def _region(name: str | None) -> str:
    return "" if name is None else f"/region/{quote(name, safe='')}"


def _model_path(model: str, version: str | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


def _error_text(body: bytes | bytearray) -> str:
    try:
        return str(json.loads(bytes(body))["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]
