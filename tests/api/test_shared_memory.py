"""The system shared memory extension on a real daemon: Triton's own client through a TCP
bridge, edged's client on the socket, regions kept per uid (a client running as `nobody`),
bounds checked on every use, a segment shrunk under the daemon, the limits, and fds closed
on unregister. Every /dev/shm file made here is removed after its test."""

from __future__ import annotations

import fcntl
import grp
import json
import mmap
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.api.access import Peer
from edged.api.shared_memory import RegionNotFound, Regions
from edged.api.tensors import ShmRef, ShmTensor
from edged.backends import get_backend
from edged.backends.base import LoadOptions
from edged.client import Client, ClientError
from edged.errors import Forbidden
from edged.models.store import ModelStore
from tests.broker import free_port
from tests.conftest import fill_sample_store
from tests.daemon_process import ChildProcess

FACE = np.random.default_rng(11).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
X = np.array([[1, 2, -3, 0.5]], np.float32)  # tiny: y = relu(2x + 1)
REGRESSORS, CLASSIFICATORS = 896 * 16 * 4, 896 * 4  # the face model's output sizes in bytes
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


# --- segments in /dev/shm -------------------------------------------------------------------
class Segments:
    """Files in /dev/shm with names unique to this run, removed by `remove_all`."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def make(self, data: bytes | int, mode: int = 0o600, owner: tuple[int, int] | None = None) -> str:
        """A segment holding `data` (or that many zero bytes); its key, "/name"."""
        key = f"/edged-test-{uuid.uuid4().hex[:12]}"
        path = Path("/dev/shm" + key)
        self.paths.append(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask took away
            if isinstance(data, int):
                os.ftruncate(fd, data)
            else:
                os.write(fd, data)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
        return key

    def path(self, key: str) -> Path:
        return Path("/dev/shm" + key)

    def read(self, key: str, tensor: ShmTensor) -> np.ndarray:
        data = self.path(key).read_bytes()[tensor.ref.offset : tensor.ref.offset + tensor.ref.byte_size]
        return np.frombuffer(data, tensor.dtype).reshape(tensor.shape)

    def remove_all(self) -> None:
        for path in self.paths:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)


@pytest.fixture
def segments() -> Iterator[Segments]:
    made = Segments()
    yield made
    made.remove_all()


# --- the daemon -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(start_module_daemon, sample_models, tiny_ir, tmp_path_factory):
    """One daemon whose socket `nobody` may use too (its group is nobody's, its directories
    searchable)."""
    store = fill_sample_store(ModelStore(tmp_path_factory.mktemp("store")), sample_models, tiny_ir)
    started = start_module_daemon(store.root, config={
        "models": {"face": {"backend": "openvino"}, "tiny": {"reject_non_finite": False}},
        "socket": {"group": NOGROUP},
    })
    for directory in (started.workdir.parent, started.workdir):
        directory.chmod(0o711)
    return started


@pytest.fixture(scope="module")
def expected(sample_models) -> dict[str, np.ndarray]:
    """The face model's outputs for FACE, computed in this process on the daemon's backend."""
    local = get_backend("openvino").load(sample_models["face"], "tflite", LoadOptions())
    try:
        return local.infer({"input": FACE})
    finally:
        local.close()


@pytest.fixture
def client(daemon) -> Iterator[Client]:
    with daemon.client() as connected:
        yield connected
        connected.unregister_system_shared_memory()  # each test starts with no regions


def refused(call: Callable[[], object]) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    assert "\n" not in info.value.message
    return info.value


def fds_to(pid: int, path: Path) -> int:
    """How many of process `pid`'s open files are `path`."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == str(path)
        except FileNotFoundError:
            pass  # closed meanwhile
    return count


# --- Triton's client, unchanged, through a TCP bridge ----------------------------------------------
@pytest.fixture
def bridge(daemon, tmp_path) -> Iterator[str]:
    """socat forwarding a loopback port to the daemon's socket: "127.0.0.1:port"."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed (tools/setup.sh installs it)", pytrace=False)
    port = free_port()
    child = ChildProcess([socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                          f"UNIX-CONNECT:{daemon.socket}"], tmp_path / "socat.log", name="socat")

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    child.wait_for(listening, 30, "socat to listen")
    yield f"127.0.0.1:{port}"
    child.stop()


def test_tritonclient_registers_infers_and_unregisters_through_a_bridge(bridge, expected):
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    in_key, out_key = (f"/edged-test-{uuid.uuid4().hex[:12]}" for _ in range(2))
    face_in = shm.create_shared_memory_region("face_in", in_key, FACE.nbytes)
    face_out = shm.create_shared_memory_region("face_out", out_key, REGRESSORS + CLASSIFICATORS)
    triton = httpclient.InferenceServerClient(bridge)
    try:
        assert "system_shared_memory" in triton.get_server_metadata()["extensions"]
        shm.set_shared_memory_region(face_in, [FACE])
        triton.register_system_shared_memory("face_in", in_key, FACE.nbytes)
        triton.register_system_shared_memory("face_out", out_key, REGRESSORS + CLASSIFICATORS)
        status = triton.get_system_shared_memory_status()
        assert sorted(status, key=lambda r: r["name"]) == [
            {"name": "face_in", "key": in_key, "offset": 0, "byte_size": FACE.nbytes},
            {"name": "face_out", "key": out_key, "offset": 0, "byte_size": REGRESSORS + CLASSIFICATORS},
        ]
        assert triton.get_system_shared_memory_status("face_in") == [
            r for r in status if r["name"] == "face_in"]

        image = httpclient.InferInput("input", list(FACE.shape), "FP32")
        image.set_shared_memory("face_in", FACE.nbytes)
        regressors = httpclient.InferRequestedOutput("regressors")
        regressors.set_shared_memory("face_out", REGRESSORS)
        classificators = httpclient.InferRequestedOutput("classificators")
        classificators.set_shared_memory("face_out", CLASSIFICATORS, offset=REGRESSORS)
        result = triton.infer("face", [image], outputs=[regressors, classificators])
        got = {}
        for name, offset in (("regressors", 0), ("classificators", REGRESSORS)):
            output = result.get_output(name)
            assert "data" not in output
            got[name] = shm.get_contents_as_numpy(
                face_out, triton_to_np_dtype(output["datatype"]), output["shape"], offset).copy()
        for name, array in expected.items():
            assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name

        # Without outputs named, every one comes back as binary data, as Triton does.
        plain = triton.infer("face", [image])
        for name, array in expected.items():
            assert np.array_equal(plain.as_numpy(name), array)

        triton.unregister_system_shared_memory("face_in")
        assert [r["name"] for r in triton.get_system_shared_memory_status()] == ["face_out"]
        with pytest.raises(InferenceServerException) as info:
            triton.get_system_shared_memory_status("face_in")
        assert info.value.status() == "404"
        assert "Unable to find system shared memory region: 'face_in'" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            triton.infer("face", [image], outputs=[regressors])
        assert info.value.status() == "404" and "'face_in'" in info.value.message()
        triton.unregister_system_shared_memory()
        assert triton.get_system_shared_memory_status() == []
    finally:
        triton.close()
        shm.destroy_shared_memory_region(face_in)
        shm.destroy_shared_memory_region(face_out)


# --- edged's own client on the socket --------------------------------------------------------------
def test_edged_client_infers_from_and_into_regions(client, segments, expected):
    in_key = segments.make(FACE.tobytes())
    out_key = segments.make(16 + REGRESSORS + CLASSIFICATORS)
    client.register_system_shared_memory("in", in_key, FACE.nbytes)
    client.register_system_shared_memory("out", out_key, REGRESSORS + CLASSIFICATORS, offset=16)
    assert client.get_system_shared_memory_status("out") == [
        {"name": "out", "key": out_key, "offset": 16, "byte_size": REGRESSORS + CLASSIFICATORS}]

    image = ShmTensor.at("in", np.float32, FACE.shape)
    places = {"regressors": ShmRef("out", REGRESSORS),
              "classificators": ShmRef("out", CLASSIFICATORS, REGRESSORS)}
    for _ in range(3):  # the same small JSON body each time: decoded once, then remembered
        outputs = client.infer("face", {"input": image}, outputs=places)
        assert outputs["regressors"] == ShmTensor(ShmRef("out", REGRESSORS), np.dtype("f4"), (1, 896, 16))
        for name, array in expected.items():
            where = outputs[name]
            got = segments.read(out_key, ShmTensor(ShmRef("out", where.ref.byte_size, 16 + where.ref.offset),
                                                   where.dtype, where.shape))
            assert np.array_equal(got, array), name

    mixed = client.infer("face", {"input": FACE}, outputs={"classificators": ShmRef("out", CLASSIFICATORS),
                                                          "regressors": None})
    assert np.array_equal(mixed["regressors"], expected["regressors"])
    assert isinstance(mixed["classificators"], ShmTensor)

    client.unregister_system_shared_memory("in")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
    assert refused(lambda: client.infer("face", {"input": image})).status == 404


def test_metadata_lists_the_extension(client):
    extensions = client.server_metadata()["extensions"]
    assert "system_shared_memory" in extensions and "binary_tensor_data" in extensions


def test_an_empty_outputs_list_returns_every_output(daemon):
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(FACE.shape),
                       "data": FACE.ravel().tolist()}], "outputs": []}
    with daemon.client() as client:
        status, _, body = client.request("POST", "/v2/models/face/infer", json.dumps(doc).encode())
    assert status == 200
    assert sorted(t["name"] for t in json.loads(body)["outputs"]) == ["classificators", "regressors"]


# --- another user -----------------------------------------------------------------------------------
NOBODY_CLIENT = r"""
import json, socket, sys
answers = []
for method, target, body in json.load(sys.stdin):
    data = b"" if body is None else json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(sys.argv[1])
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                     + data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        head, _, text = reply.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(text) < length:
            text += sock.recv(65536)
    answers.append([int(head.split()[1]), json.loads(text) if text else None])
print(json.dumps(answers))
"""


def as_nobody(daemon, requests: list[tuple[str, str, object]]) -> list[tuple[int, object]]:
    """Send `requests` (method, path, JSON body or None) from a process running as nobody:
    [(status, JSON answer)]. A system Python, as nobody may not reach this venv's."""
    python = next((p for p in ("/usr/bin/python3", sys.executable) if os.path.exists(p)), sys.executable)
    done = subprocess.run([python, "-c", NOBODY_CLIENT, str(daemon.socket)], input=json.dumps(requests),
                          user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return [tuple(answer) for answer in json.loads(done.stdout)]


def tiny_shm_request(region: str, **extra) -> dict:
    params = {"shared_memory_region": region, "shared_memory_byte_size": 16, **extra}
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": params}]}


@needs_root
def test_another_user_neither_registers_nor_sees_nor_uses_roots_regions(daemon, client, segments):
    root_only = segments.make(X.tobytes(), 0o600)
    group_rw = segments.make(X.tobytes(), 0o660, (0, NOBODY.pw_gid))
    others_read_only = segments.make(X.tobytes(), 0o644)
    own = segments.make(X.tobytes() + bytes(16), 0o600, (NOBODY.pw_uid, NOBODY.pw_gid))
    client.register_system_shared_memory("cam", root_only, 16)

    def register(name: str, key: str, byte_size: int = 16) -> tuple[str, str, dict]:
        return ("POST", f"/v2/systemsharedmemory/region/{name}/register",
                {"key": key, "offset": 0, "byte_size": byte_size})

    answers = as_nobody(daemon, [
        register("mine", root_only),
        register("mine", others_read_only),
        ("GET", "/v2/systemsharedmemory/status", None),
        ("GET", "/v2/systemsharedmemory/region/cam/status", None),
        ("POST", "/v2/models/tiny/infer", tiny_shm_request("cam")),
        ("POST", "/v2/systemsharedmemory/region/cam/unregister", None),
        register("cam", own, 32),  # the same name as root's region, in nobody's own namespace
        register("shared", group_rw),
        ("POST", "/v2/models/tiny/infer", {**tiny_shm_request("cam"), "outputs": [
            {"name": "y", "parameters": {"shared_memory_region": "cam", "shared_memory_byte_size": 16,
                                         "shared_memory_offset": 16}}]}),
        ("GET", "/v2/systemsharedmemory/status", None),
    ])
    statuses = [status for status, _ in answers]
    assert statuses == [403, 403, 200, 404, 404, 200, 200, 200, 200, 200], answers
    assert f"uid {NOBODY.pw_uid} may not read and write /dev/shm{root_only}" in answers[0][1]["error"]
    assert "mode 0644" in answers[1][1]["error"]
    assert answers[2][1] == []
    assert answers[3][1]["error"] == "Unable to find system shared memory region: 'cam'"
    assert answers[4][1]["error"] == "Unable to find shared memory region: 'cam'"
    assert answers[8][1]["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 4], "parameters": {
        "shared_memory_region": "cam", "shared_memory_byte_size": 16, "shared_memory_offset": 16}}]
    assert np.array_equal(np.frombuffer(segments.path(own).read_bytes()[16:], np.float32), [3, 5, 0, 2])
    assert sorted((r["name"], r["key"]) for r in answers[9][1]) == [("cam", own), ("shared", group_rw)]
    # root's region of the same name is untouched by all of that
    assert client.get_system_shared_memory_status() == [
        {"name": "cam", "key": root_only, "offset": 0, "byte_size": 16}]
    as_nobody(daemon, [("POST", "/v2/systemsharedmemory/unregister", None)])


# --- bounds, checked at registration and on every use -----------------------------------------------
def test_offsets_and_sizes_outside_the_region_or_the_tensor_are_refused(daemon, client, segments):
    key = segments.make(X.tobytes() + bytes(16))
    error = refused(lambda: client.register_system_shared_memory("r", key, 32, offset=4))
    assert error.status == 400 and f"past the end of /dev/shm{key} (32 bytes)" in error.message
    client.register_system_shared_memory("r", key, 24)
    for params, message in [
        ({"shared_memory_offset": 12}, "Invalid offset + byte size for shared memory region: 'r'"),
        ({"shared_memory_byte_size": 12}, "shared_memory_byte_size 12 but shape [1, 4] of FP32 needs 16"),
        ({"shared_memory_offset": -1}, "must be a non-negative int64"),
        ({"shared_memory_byte_size": None}, "shared_memory_byte_size must be an integer"),
    ]:
        status, _, body = client.request("POST", "/v2/models/tiny/infer",
                                         json.dumps(tiny_shm_request("r", **params)).encode())
        assert status == 400 and message in json.loads(body)["error"], body
    small = {"y": ShmRef("r", 8)}
    error = refused(lambda: client.infer("tiny", {"x": ShmTensor.at("r", np.float32, (1, 4))}, outputs=small))
    assert error.status == 400 and "(8 bytes) should be at least 16 bytes" in error.message
    outputs = client.infer("tiny", {"x": ShmTensor.at("r", np.float32, (1, 4))},
                           outputs={"y": ShmRef("r", 8 + 16, offset=0)})
    assert outputs["y"].ref == ShmRef("r", 16)
    assert np.array_equal(segments.read(key, outputs["y"]), [[3, 5, 0, 2]])


def test_a_segment_shrunk_after_registration_is_a_400_not_a_crash(daemon, client, segments):
    key = segments.make(X.tobytes() + bytes(16))
    client.register_system_shared_memory("r", key, 32)
    x_in, y_out = ShmTensor.at("r", np.float32, (1, 4)), {"y": ShmRef("r", 16, offset=16)}
    assert client.infer("tiny", {"x": x_in}, outputs=y_out)["y"].shape == (1, 4)
    os.truncate(segments.path(key), 8)
    error = refused(lambda: client.infer("tiny", {"x": x_in}))
    assert error.status == 400 and f"shared memory region 'r' ({key}) shrank" in error.message
    os.truncate(segments.path(key), 20)
    error = refused(lambda: client.infer("tiny", {"x": X}, outputs=y_out))
    assert error.status == 400 and "shrank to 20 bytes: output 'y' needs bytes up to 32" in error.message
    assert segments.path(key).stat().st_size == 20  # not grown back by a write past its end
    assert daemon.proc.poll() is None
    assert client.live() and client.infer("tiny", {"x": X})["y"].shape == (1, 4)


# --- limits, and the extension turned off -------------------------------------------------------------
def test_the_region_and_byte_limits_per_uid_name_their_settings(start_daemon, tiny_store, segments):
    limited = start_daemon(tiny_store.root, config={
        "socket": {"max_shm_regions_per_uid": 2, "max_shm_bytes_per_uid": 48}})
    key = segments.make(64)
    with limited.client() as client:
        client.register_system_shared_memory("a", key, 16)
        error = refused(lambda: client.register_system_shared_memory("b", key, 40))
        assert error.status == 400 and "to 56 bytes, over socket.max_shm_bytes_per_uid (48)" in error.message
        client.register_system_shared_memory("b", key, 32, offset=16)
        error = refused(lambda: client.register_system_shared_memory("c", key, 1))
        assert error.status == 400 and "socket.max_shm_regions_per_uid" in error.message
        error = refused(lambda: client.register_system_shared_memory("a", key, 8))
        assert error.status == 400 and "'a' already in manager" in error.message
        client.unregister_system_shared_memory("b")
        client.register_system_shared_memory("c", key, 32)


def test_zero_regions_turns_the_extension_off(start_daemon, tiny_store, segments):
    off = start_daemon(tiny_store.root, config={"socket": {"max_shm_regions_per_uid": 0}})
    key = segments.make(X.tobytes())
    with off.client() as client:
        assert "system_shared_memory" not in client.server_metadata()["extensions"]
        for call in (lambda: client.register_system_shared_memory("r", key, 16),
                     client.get_system_shared_memory_status, client.unregister_system_shared_memory,
                     lambda: client.infer("tiny", {"x": ShmTensor.at("r", np.float32, (1, 4))})):
            error = refused(call)
            assert error.status == 400
            assert error.message == ("the system shared memory extension is off here "
                                     "(socket.max_shm_regions_per_uid = 0)")
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)


# --- fds --------------------------------------------------------------------------------------------
def test_unregister_closes_the_segments_fd(daemon, client, segments):
    one, two = segments.make(16), segments.make(16)
    client.register_system_shared_memory("one", one, 16)
    client.register_system_shared_memory("two", two, 16)
    client.register_system_shared_memory("again", two, 8)
    pid = daemon.proc.pid
    assert (fds_to(pid, segments.path(one)), fds_to(pid, segments.path(two))) == (1, 2)
    client.unregister_system_shared_memory("one")
    assert (fds_to(pid, segments.path(one)), fds_to(pid, segments.path(two))) == (0, 2)
    client.unregister_system_shared_memory()
    assert fds_to(pid, segments.path(two)) == 0


# --- bad register requests ----------------------------------------------------------------------------
def test_bad_register_requests_get_one_line_400s(daemon, client, segments, tmp_path):
    good = segments.make(16)
    link = "/" + f"edged-test-{uuid.uuid4().hex[:12]}"
    segments.paths.append(segments.path(link))
    segments.path(link).symlink_to(segments.path(good))
    fifo = "/" + f"edged-test-{uuid.uuid4().hex[:12]}"
    segments.paths.append(segments.path(fifo))
    os.mkfifo(segments.path(fifo), 0o600)
    directory = "/" + f"edged-test-{uuid.uuid4().hex[:12]}"
    segments.paths.append(segments.path(directory))
    segments.path(directory).mkdir(0o700)
    cases = [
        ({"offset": 0, "byte_size": 16}, "has no 'key' field"),
        ({"key": good, "offset": 0}, "has no 'byte_size' field"),
        ({"key": "../x", "byte_size": 16}, "must be one name under /dev/shm"),
        ({"key": "/../etc/passwd", "byte_size": 16}, "must be one name under /dev/shm"),
        ({"key": "/..", "byte_size": 16}, "must be one name under /dev/shm"),
        ({"key": "/a/b", "byte_size": 16}, "must be one name under /dev/shm"),
        ({"key": good, "offset": -1, "byte_size": 16}, "offset must be 0 or more"),
        ({"key": good, "byte_size": 0}, "byte_size over 0"),
        ({"key": good, "byte_size": "16"}, "must be integers"),
        ({"key": good, "byte_size": True}, "must be integers"),
        ({"key": 5, "byte_size": 16}, "'key' must be a string"),
        ({"key": link, "byte_size": 16}, "is a symbolic link"),
        ({"key": fifo, "byte_size": 16}, "is not a regular file"),
        ({"key": directory, "byte_size": 16}, "is a directory"),
        ({"key": "/edged-test-nonexistent", "byte_size": 16}, "there is no /dev/shm/edged-test-nonexistent"),
        ([1, 2], "register request must be an object"),
    ]
    for body, message in cases:
        status, _, reply = client.request("POST", "/v2/systemsharedmemory/region/r/register",
                                          json.dumps(body).encode())
        error = json.loads(reply)["error"]
        assert (status, "\n" in error) == (400, False) and message in error, (body, error)
    status, _, reply = client.request("POST", "/v2/systemsharedmemory/region/r/register", b"{nope")
    assert status == 400 and "register request is not JSON" in json.loads(reply)["error"]
    assert client.get_system_shared_memory_status() == []
    assert fds_to(daemon.proc.pid, segments.path(good)) == 0  # each refusal closed what it opened


# --- Regions alone: the rules no real client here can reach -------------------------------------------
def stranger(*groups: int) -> Peer:
    return Peer(pid=1, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid, supplementary=frozenset(groups))


def test_group_rights_count_through_the_peers_own_groups(segments):
    key = segments.make(16, 0o660, (0, 4242))
    regions = Regions(4, 1024)
    try:
        with pytest.raises(Forbidden, match="may not read and write"):
            regions.register(stranger(), "r", key, 0, 16)
        regions.register(stranger(4242), "r", key, 0, 16)  # a supplementary group of the peer process
        assert regions.status(NOBODY.pw_uid) == [{"name": "r", "key": key, "offset": 0, "byte_size": 16}]
    finally:
        regions.close()


def test_a_segment_with_an_acl_is_left_to_its_owner(segments):
    """An ACL's named entries are not in the mode bits: edged refuses rather than guess."""
    key = segments.make(16, 0o660)
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 6, NOBODY.pw_uid), (0x04, 0, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
               (0x20, 0, 0xFFFFFFFF)]  # user::rw- user:nobody:rw- group::--- mask::rw- other::---
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    try:
        os.setxattr(segments.path(key), "system.posix_acl_access", acl)
    except OSError as exc:
        pytest.skip(f"this /dev/shm takes no POSIX ACL: {exc.strerror}")
    regions = Regions(4, 1024)
    try:
        with pytest.raises(Forbidden, match="has a POSIX ACL, which edged does not evaluate: only its owner"):
            regions.register(stranger(), "r", key, 0, 16)
        regions.register(Peer(pid=1, uid=0, gid=0), "r", key, 0, 16)
    finally:
        regions.close()


def test_a_region_unregistered_while_in_use_keeps_its_fd_until_that_use_ends(segments):
    key = segments.make(X.tobytes())
    regions = Regions(4, 1024)
    regions.register(Peer(pid=1, uid=0, gid=0), "r", key, 0, 16)
    with regions._borrowed(0, ShmRef("r", 16)):  # a request reading it now
        regions.unregister(0, "r")
        assert fds_to(os.getpid(), segments.path(key)) == 1
        with pytest.raises(RegionNotFound):
            regions.read(0, ShmTensor.at("r", np.float32, (1, 4)))
    assert fds_to(os.getpid(), segments.path(key)) == 0
    regions.close()


def test_an_input_whose_layout_the_model_refuses_is_not_read(daemon, client, segments):
    """A big region named with a shape the model does not take: 400 before the daemon allocates
    and reads what the client names (the face model takes [1, 128, 128, 3] FP32)."""
    key = segments.make(64 << 20)
    client.register_system_shared_memory("big", key, 64 << 20)
    before = bytes_read(daemon.proc.pid)
    for shape, dtype, message in [((1, 2048, 2048, 3), np.float32, "must have shape [1, 128, 128, 3]"),
                                  ((1, 128, 128, 3), np.float64, "must be float32")]:
        error = refused(lambda s=shape, d=dtype: client.infer("face", {"input": ShmTensor.at("big", d, s)}))
        assert error.status == 400 and message in error.message
    assert bytes_read(daemon.proc.pid) - before < 1 << 20  # the 48 MB tensor was never read


def bytes_read(pid: int) -> int:
    """What the process has read through read(2)-like calls, preadv included."""
    return int(Path(f"/proc/{pid}/io").read_text().split("rchar:")[1].split()[0])


# --- a sealed memfd passed over the socket: read and written in place ---------------------------
def sealed_memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("edged-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mapped = mmap.mmap(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd, mapped


def memfds_of(pid: int) -> int:
    """Descriptors and mappings process `pid` holds of memfds made here."""
    fds = sum("memfd:edged-test" in os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    maps = sum("memfd:edged-test" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return fds + maps


def test_a_sealed_memfd_is_read_and_written_in_place(daemon, client, expected):
    fd, mapped = sealed_memfd(FACE.nbytes + REGRESSORS + CLASSIFICATORS)
    try:
        np.frombuffer(mapped, np.float32, FACE.size).reshape(FACE.shape)[...] = FACE
        client.register_memfd("cam", fd, len(mapped))
        status = client.get_system_shared_memory_status("cam")
        assert status[0]["key"].startswith("memfd:") and status[0]["byte_size"] == len(mapped)
        image = ShmTensor.at("cam", np.float32, FACE.shape)
        places = {"regressors": ShmRef("cam", REGRESSORS, FACE.nbytes),
                  "classificators": ShmRef("cam", CLASSIFICATORS, FACE.nbytes + REGRESSORS)}
        read_before = bytes_read(daemon.proc.pid)
        for _ in range(10):
            client.infer("face", {"input": image}, outputs=places)
        assert bytes_read(daemon.proc.pid) - read_before < FACE.nbytes  # 10 inputs, not one copied in
        for name, array in expected.items():
            ref = places[name]
            written = mapped[ref.offset : ref.offset + ref.byte_size]  # a copy: no view left on the map
            got = np.frombuffer(written, np.float32).reshape(array.shape)
            assert np.array_equal(got, array), name
        # OpenVINO wrote those outputs there itself; the next request, over plain HTTP, gets
        # its own and leaves the region alone.
        mapped[FACE.nbytes :] = bytes(REGRESSORS + CLASSIFICATORS)
        answer = client.infer("face", {"input": FACE})
        for name, array in expected.items():
            assert np.array_equal(answer[name], array), name
        assert mapped[FACE.nbytes :] == bytes(REGRESSORS + CLASSIFICATORS)
        client.unregister_system_shared_memory("cam")
        assert memfds_of(daemon.proc.pid) == 0  # its descriptors closed, its mapping gone
    finally:
        mapped.close()
        os.close(fd)


def test_a_memfd_the_daemon_cannot_trust_is_refused_and_not_kept(daemon, client, tmp_path):
    unsealed, unsealed_map = sealed_memfd(4096, seals=0)
    plain = os.open(tmp_path / "plain", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(plain, 4096)
    try:
        error = refused(lambda: client.register_memfd("m", unsealed, 4096))
        assert error.status == 400 and "not sealed against shrinking: add F_SEAL_SHRINK" in error.message
        error = refused(lambda: client.register_memfd("m", plain, 4096))
        assert error.status == 400 and "not a memfd" in error.message
        body = json.dumps({"memfd": True, "byte_size": 4096}).encode()
        status, _, data = client.request("POST", "/v2/systemsharedmemory/region/m/register", body)
        assert status == 400 and "exactly one descriptor" in json.loads(data)["error"]
        status, _, data = client.request("POST", "/v2/systemsharedmemory/region/m/register", body,
                                         fds=[unsealed, plain, unsealed])
        assert status == 400 and "it carried 3" in json.loads(data)["error"]
        assert memfds_of(daemon.proc.pid) == 0  # every descriptor passed was closed
        assert client.get_system_shared_memory_status() == []
    finally:
        unsealed_map.close()
        os.close(unsealed)
        os.close(plain)


def test_a_memfd_sealed_against_writes_gives_inputs_but_takes_no_outputs(daemon, client, expected):
    fd, mapped = sealed_memfd(FACE.nbytes + REGRESSORS, seals=0)
    try:
        np.frombuffer(mapped, np.float32, FACE.size)[...] = FACE.reshape(-1)
        mapped.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
        client.register_memfd("ro", fd, FACE.nbytes + REGRESSORS)
        image = ShmTensor.at("ro", np.float32, FACE.shape)
        outputs = client.infer("face", {"input": image})
        assert np.array_equal(outputs["regressors"], expected["regressors"])
        error = refused(lambda: client.infer("face", {"input": image},
                                             outputs={"regressors": ShmRef("ro", REGRESSORS, FACE.nbytes)}))
        assert error.status == 400 and "sealed against writes" in error.message
        client.unregister_system_shared_memory("ro")
    finally:
        os.close(fd)
