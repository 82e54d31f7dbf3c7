"""The daemon as a subprocess, over its real Unix socket: protocol, bit-for-bit outputs, bad input."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edged.api import client_codec
from edged.backends import get_backend
from edged.backends.base import LoadOptions
from edged.client import Client, ClientError
from edged.models.store import ModelStore
from tests.conftest import fill_sample_store
from tests.daemon_process import wait_until

FACE = np.random.default_rng(7).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
X = np.array([[1, 2, -3, 0.5]], np.float32)


def raw(path, data: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes, read one response: (status, JSON body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(data)
        except BrokenPipeError:
            pass  # refused before we finished sending: the answer is still there to read
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        lengths = [line.split(b":")[1] for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")]
        length = int(lengths[0]) if lengths else 0
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body else {}


def post(path, model: str, doc: object, extra_headers: str = "") -> tuple[int, dict]:
    body = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"{extra_headers}\r\n").encode()
    return raw(path, head + body)


@pytest.fixture(scope="module")
def daemon(start_module_daemon, sample_models, tiny_ir, tmp_path_factory):
    """One daemon for the tests that leave it as they found it."""
    store = fill_sample_store(ModelStore(tmp_path_factory.mktemp("store")), sample_models, tiny_ir)
    store.add("face-lite", [sample_models["face"]], "1")
    store.activate("face-lite", "1")
    return start_module_daemon(store.root, config={
        "models": {"face": {"backend": "openvino"}, "face-lite": {"backend": "litert"},
                   "tiny": {"reject_non_finite": False}},
        "socket": {"max_body_bytes": 2_000_000, "max_json_bytes": 1_500_000},
    })


def test_socket_is_0660_and_health_answers(daemon):
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    with daemon.client() as client:
        assert client.live() and client.ready()
        meta = client.server_metadata()
        assert meta["name"] == "edged" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(daemon):
    with daemon.client() as client:
        meta = client.metadata("face")
        assert meta["platform"] == "openvino" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 128, 128, 3]}]
        assert meta["parameters"]["precision"] == "f32"
        assert client.metadata("selfie")["platform"] == "litert"
        assert client.metadata("tiny", "1")["outputs"][0]["name"] == "y"
        assert client.request("GET", "/v2/models/face/ready")[0] == 200
        with pytest.raises(ClientError) as info:
            client.metadata("nosuch")
        assert info.value.status == 404 and "nosuch" in info.value.message
        with pytest.raises(ClientError) as info:
            client.metadata("face", "9")
        assert info.value.status == 404 and "active version is 1" in info.value.message


@pytest.mark.parametrize(("model", "backend"), [("face", "openvino"), ("face-lite", "litert")])
def test_socket_outputs_equal_in_process_bit_for_bit(daemon, sample_models, model, backend):
    local = get_backend(backend).load(sample_models["face"], "tflite", LoadOptions())
    expected = local.infer({"input": FACE})
    local.close()
    with daemon.client() as client:
        binary = client.infer(model, {"input": FACE})
        as_json = client.infer(model, {"input": FACE}, binary=False)
    for name in ("regressors", "classificators"):
        assert binary[name].dtype == expected[name].dtype
        assert np.array_equal(binary[name], expected[name])
        assert np.array_equal(as_json[name], expected[name])


def test_json_request_with_nested_data(daemon):
    status, doc = post(daemon.socket, "tiny", {
        "id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, -3, 0.5]]}],
    })
    assert status == 200
    assert doc["id"] == "r1" and doc["model_version"] == "1"
    assert doc["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [3, 5, 0, 2]}]


def test_json_outputs_carry_non_finite_values_as_null(daemon):
    """2 * 3e38 + 1 overflows float32: JSON has no token for infinity, so it becomes null."""
    status, doc = post(daemon.socket, "tiny", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [3e38, 2, -3, 0.5]}],
    })
    assert status == 200
    assert doc["outputs"][0]["data"] == [None, 5, 0, 2]
    with daemon.client() as client:  # binary outputs carry it exactly
        assert client.infer("tiny", {"x": np.array([[3e38, 2, -3, 0.5]], np.float32)})["y"][0, 0] == np.inf


def _tensor(data=None, **over):
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": data or [1, 2, 3, 4]}
    tensor.update(over)
    return {"inputs": [tensor]}


BAD_REQUESTS = [
    ("face", _tensor(), 400, "unknown input 'x'"),
    ("tiny", _tensor(shape=[1, 5], data=[1, 2, 3, 4, 5]), 400, "must have shape [1, 4]"),
    ("tiny", _tensor(datatype="INT64"), 400, "must be float32, got int64"),
    ("tiny", _tensor(datatype="INT32", data=[1.5, 2, 3, 4]), 400, "not INT32"),
    ("tiny", _tensor(datatype="STRING"), 400, "not supported"),
    ("tiny", _tensor(shape=[1, -4]), 400, "non-negative"),
    ("tiny", {"inputs": []}, 400, "1 to 256 tensors"),
    ("tiny", [1, 2], 400, "request must be an object"),
    ("tiny", b"{not json", 400, "is not JSON"),
    ("tiny", b"[" * 200_000 + b"]" * 200_000, 400, "nested too deeply"),
    ("nosuch", _tensor(), 404, "model 'nosuch' not found"),
]


@pytest.mark.parametrize(("model", "doc", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_one_line_errors(daemon, model, doc, status, message):
    got, body = post(daemon.socket, model, doc)
    assert got == status
    assert message in body["error"] and "\n" not in body["error"]
    with daemon.client() as client:  # still serving
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)


def test_non_finite_inputs_are_refused_unless_the_model_allows_them(daemon):
    nan_face = FACE.copy()
    nan_face[0, 0, 0, 0] = np.nan
    with daemon.client() as client:
        with pytest.raises(ClientError) as info:
            client.infer("face", {"input": nan_face})
        assert info.value.status == 400 and "NaN or Infinity" in info.value.message
        out = client.infer("tiny", {"x": np.array([[np.inf, 1, 1, 1]], np.float32)})
        assert out["y"][0, 0] == np.inf


def test_binary_size_disagreeing_with_header(daemon):
    body, length = client_codec.encode_request({"x": X})
    doc = json.loads(body[:length])
    doc["inputs"][0]["parameters"]["binary_data_size"] = 12
    header = json.dumps(doc).encode()
    status, reply = post(daemon.socket, "tiny", header + X.tobytes(),
                         f"Inference-Header-Content-Length: {len(header)}\r\n")
    assert status == 400 and "binary_data_size 12" in reply["error"]
    status, reply = post(daemon.socket, "tiny", body[:-4],
                         f"Inference-Header-Content-Length: {length}\r\n")
    assert status == 400 and "binary data ends after 12 of 16 bytes" in reply["error"]
    status, reply = post(daemon.socket, "tiny", body, "Inference-Header-Content-Length: 99999\r\n")
    assert status == 400 and "does not fit" in reply["error"]


def test_oversized_body_is_refused_before_it_is_read(daemon):
    big = np.zeros((1, 512, 512, 3), np.float32)  # 3 MB > the 2 MB limit
    with daemon.client() as client:
        with pytest.raises(ClientError) as info:
            client.infer("selfie", {"input_1": big})
        assert info.value.status == 413 and "2000000-byte limit" in info.value.message
    with daemon.client() as client:
        assert client.ready()


@pytest.mark.parametrize(("data", "status", "message"), [
    (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    (b"GET /v2 HTTP/1.1\r\nNoColon\r\n\r\n", 400, "malformed header"),
    (b"POST /v2/models/tiny/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411, "chunked"),
    (b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "bad Content-Length"),
    (b"GET /v2/models/tiny/infer HTTP/1.1\r\n\r\n", 405, "GET is not allowed"),
    (b"GET /nothing HTTP/1.1\r\n\r\n", 404, "no such endpoint"),
    (b"GET /v2 HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431, "request head over"),
    ("POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),
     400, "bad Content-Length"),
    (b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
     "appears twice"),
    (b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 1800000\r\n\r\n", 413,
     "send large tensors with the binary extension"),
    (b"GET /v2 HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431,
     "more than 100 header lines"),
    (b"GET /v2 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "header Host appears twice"),
    (b"GET /v2 HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not supported"),
])
def test_malformed_http(daemon, data, status, message):
    got, body = raw(daemon.socket, data)
    assert got == status and message in body["error"]


def test_client_disconnecting_mid_request_harms_nobody(daemon):
    for _ in range(5):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(daemon.socket))
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{\"in")
    with daemon.client() as client:
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)


def test_metrics_and_status(daemon):
    with daemon.client() as client:
        client.infer("tiny", {"x": X})
        text = client.metrics()
        status = client.status()
    assert 'edged_model_info{backend="openvino",model="face",precision="f32",version="1"} 1.0' in text
    assert 'edged_inference_seconds_count{model="tiny"}' in text
    assert status["models"]["selfie"]["backend"] == "litert"
    assert status["models"]["tiny"]["requests"] >= 1


def test_slow_client_times_out_without_slowing_others(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, config={"socket": {"request_timeout_s": 1.0}})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(daemon.socket))
        slow.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\n")
        with daemon.client() as client:  # others are served while the slow one holds its thread
            for _ in range(20):
                assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)
        slow.settimeout(5)
        for _ in range(3):  # trickle: the deadline covers the whole request, not each byte
            time.sleep(0.3)
            try:
                slow.sendall(b"X")
            except BrokenPipeError:
                break
        reply = slow.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and b"not received in time" in reply


def test_connection_cap_refuses_with_503(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, config={"socket": {"max_connections": 3}})
    held = [Client(daemon.socket) for _ in range(3)]
    try:
        for client in held:
            assert client.live()
        status, body = raw(daemon.socket, b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert status == 503 and "too many connections" in body["error"]
        held.pop().close()
        wait_until(lambda: raw(daemon.socket, b"GET /v2/health/live HTTP/1.1\r\n\r\n")[0] == 200, 5,
                   "a connection freed")
    finally:
        for client in held:
            client.close()


def test_requests_beyond_the_queue_get_503(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, config={"socket": {"max_pending_requests": 1}})
    statuses: list[int] = []
    selfie = np.zeros((1, 256, 256, 3), np.float32)

    def worker() -> None:
        with daemon.client() as client:
            for _ in range(15):
                try:
                    client.infer("selfie", {"input_1": selfie})
                    statuses.append(200)
                except ClientError as exc:
                    statuses.append(exc.status)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) > 0 and statuses.count(503) > 0


def test_socket_access_by_peer_credentials(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, config={"socket": {"allowed_users": ["nobody"]}}, ready=False)

    def live() -> tuple | None:
        try:
            return raw(daemon.socket, b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # not listening yet

    status, reply = wait_until(live, 30, lambda: f"the socket:\n{daemon.output()}")
    assert status == 403 and f"uid {os.getuid()} is not allowed to use this socket" in reply["error"]


def test_model_access_by_peer_credentials(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, config={
        "models": {"tiny": {"allowed_users": ["nobody"]}, "face": {"allowed_groups": ["root"]}},
    })
    with daemon.client() as client:
        with pytest.raises(ClientError) as info:
            client.infer("tiny", {"x": X})
        assert info.value.status == 403 and "model 'tiny'" in info.value.message
        assert client.infer("face", {"input": FACE})["classificators"].shape == (1, 896, 1)


def test_a_broken_model_is_reported_while_others_serve(start_daemon, sample_store, tmp_path):
    (sample_store.version_dir("selfie", "1") / "selfie_segmentation.tflite").write_bytes(b"\0" * 100)
    garbage = tmp_path / "garbage.tflite"  # hashes match its manifest, but no runtime can read it
    garbage.write_bytes(b"TFL3" + bytes(range(256)) * 4)
    sample_store.add("garbage", [garbage], "1")
    sample_store.activate("garbage", "1")
    daemon = start_daemon(sample_store.root)
    with daemon.client() as client:
        with pytest.raises(ClientError) as info:
            client.metadata("garbage")
        assert info.value.status == 503
        assert info.value.message.startswith("garbage 1: no backend can run garbage.tflite (openvino/CPU: ")
        assert "\n" not in info.value.message
        status, _, body = client.request("GET", "/v2/models/selfie/ready")
        assert status == 503 and json.loads(body) == {"name": "selfie", "ready": False}
        with pytest.raises(ClientError) as info:
            client.infer("selfie", {"input_1": np.zeros((1, 256, 256, 3), np.float32)})
        assert info.value.status == 503 and "selfie 1:" in info.value.message
        assert client.status()["models"]["selfie"]["state"] == "failed"
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)


def test_huge_integers_in_float_data_are_a_400(daemon):
    status, body = post(daemon.socket, "tiny", _tensor(data=[10**400, 1, 2, 3]))
    assert status == 400 and "outside the range of FP32" in body["error"]


def test_head_answers_without_a_body_and_405_names_the_allowed_methods(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        sock.sendall(b"HEAD /v2/health/live HTTP/1.1\r\n\r\nGET /v2/health/live HTTP/1.1\r\n\r\n")
        time.sleep(0.3)
        data = sock.recv(65536)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"Content-Length: 13" in first
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b'{"live":true}')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        sock.sendall(b"PUT /v2/health/live HTTP/1.1\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 405") and b"Allow: GET" in reply


def test_http10_keep_alive_is_answered_as_such(daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        for _ in range(2):
            sock.sendall(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            reply = sock.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200") and b"Connection: keep-alive" in reply


def test_announced_bodies_are_not_allocated_before_they_arrive(daemon):
    def rss_mb() -> float:
        text = Path(f"/proc/{daemon.proc.pid}/status").read_text()
        return int(text.split("VmRSS:")[1].split()[0]) / 1024

    before = rss_mb()
    held = []
    for _ in range(10):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemon.socket))
        body = json.dumps({"inputs": [{"name": "x"}]}).encode()
        header = len(body)
        sock.sendall(f"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 1990000\r\n"
                     f"Inference-Header-Content-Length: {header}\r\n\r\n".encode() + body)
        held.append(sock)
    time.sleep(0.5)
    grown = rss_mb() - before
    for sock in held:
        sock.close()
    assert grown < 15, f"RSS grew {grown:.0f} MB for 10 bodies that never came"


def test_a_refused_peer_is_disconnected(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root, config={"socket": {"allowed_users": ["nobody"]}}, ready=False)
    wait_until(daemon.socket.exists, 30, lambda: f"the socket:\n{daemon.output()}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 403") and b"Connection: close" in data


def test_a_damaged_store_never_stops_the_daemon(start_daemon, sample_store):
    daemon = start_daemon(sample_store.root)
    (sample_store.root / "lost+found").mkdir()
    (sample_store.root / "tiny" / ".active.json").write_text('{"version": 5}')
    manifest = sample_store.version_dir("selfie", "1") / "manifest.json"
    manifest.unlink()
    manifest.mkdir()
    face_file = sample_store.version_dir("face", "1") / "face_detection_short_range.tflite"
    sample_store.add("face", [face_file], "2")
    (sample_store.root / "face" / ".active.json").write_text('{"version": "2", "history": ["1"]}')
    (sample_store.version_dir("face", "2") / "manifest.json").unlink()
    (sample_store.version_dir("face", "2") / "manifest.json").mkdir()
    time.sleep(1.0)  # several polls of the store
    assert daemon.proc.poll() is None, daemon.output()
    with daemon.client() as client:
        status = client.status()["models"]
        assert "malformed active pointer" in status["tiny"]["error"]
        assert status["tiny"]["state"] == "ready"  # still serving what it served
        assert "face 2: cannot read manifest.json" in status["face"]["error"]
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)
