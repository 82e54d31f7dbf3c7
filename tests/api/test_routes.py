"""Route dispatch without a socket: `Api.handle` on real requests, a real manager and a real
(tiny) model. Method and path choose the handler; a known path with another method is 405
with `Allow`; an unknown path 404; domain errors become their statuses. The socket, HTTP
parsing and limits are tested end to end in test_server.py."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.api.access import Peer
from edged.api.http import Request
from edged.api.routes import Api
from edged.config import load_settings
from edged.models.manager import ModelManager
from edged.pipelines.group import Pipelines

PEER = Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


def request(method: str, path: str, body: bytes = b"") -> Request:
    return Request(method, path, "", {}, memoryview(body), keep_alive=True, length=len(body))


@pytest.fixture
def api(tiny_store, tmp_path):
    settings = load_settings(None, store={"path": str(tiny_store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "cache")})
    manager = ModelManager(tiny_store, settings)
    api = Api(manager, settings)
    api.pipelines = Pipelines(settings.pipelines, manager)
    manager.load_all()
    yield api
    manager.close()


def answer(api: Api, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    response = api.handle(request(method, path, body), PEER)
    body = response.body if isinstance(response.body, bytes) else b"".join(response.body)
    text = body.decode()
    is_json = response.content_type == "application/json" and text  # an empty success has no JSON
    return response.status, json.loads(text) if is_json else {"text": text}


@pytest.mark.parametrize(("method", "path", "status", "expected"), [
    ("GET", "/v2/health/live", 200, {"live": True}),
    ("GET", "/v2/health/ready", 200, {"ready": True}),
    ("GET", "/v2", 200, {"name": "edged"}),
    ("GET", "/v2/", 200, {"name": "edged"}),
    ("GET", "/v2/models/tiny", 200, {"name": "tiny", "versions": ["1"]}),
    ("GET", "/v2/models/tiny/versions/1", 200, {"name": "tiny", "versions": ["1"]}),
    ("GET", "/v2/models/tiny/ready", 200, {"name": "tiny", "ready": True}),
    ("GET", "/v2/models/tiny/versions/1/ready", 200, {"name": "tiny", "ready": True}),
    ("GET", "/v2/edged/pipelines", 200, {}),
])
def test_each_path_and_method_reaches_its_handler(api, method, path, status, expected):
    got_status, document = answer(api, method, path)
    assert got_status == status
    assert expected.items() <= document.items()


def test_infer_is_dispatched_with_the_name_and_version_from_the_path(api):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "data": [1, 2, -3, 0.5]}]}).encode()
    for path in ("/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer"):
        status, document = answer(api, "POST", path, body)
        assert status == 200, document
        assert document["model_name"] == "tiny" and document["model_version"] == "1"
        assert np.allclose(document["outputs"][0]["data"], [3, 5, 0, 2])  # relu(2x + 1)


def test_status_and_metrics_routes(api):
    status, document = answer(api, "GET", "/v2/edged/status")
    assert status == 200 and document["models"]["tiny"]["state"] == "ready"
    response = api.handle(request("GET", "/metrics"), PEER)
    assert response.status == 200 and response.content_type.startswith("text/plain")
    assert b'edged_model_ready{model="tiny"} 1.0' in response.body
    scrape = request("GET", "/metrics")
    scrape.headers["accept"] = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"  # as Prometheus
    response = api.handle(scrape, PEER)
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.body.endswith(b"# EOF\n") and b'edged_model_ready{model="tiny"} 1.0' in response.body


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("POST", "/v2/health/live", "GET"),
    ("DELETE", "/v2/models/tiny", "GET"),
    ("GET", "/v2/models/tiny/infer", "POST"),
    ("PUT", "/v2/edged/pipelines/cam/restart", "POST"),
    ("POST", "/metrics", "GET"),
])
def test_a_known_path_with_another_method_is_405_naming_the_allowed_ones(api, method, path, allow):
    response = api.handle(request(method, path), PEER)
    assert response.status == 405
    assert response.headers == {"Allow": allow}
    assert json.loads(response.body)["error"] == f"{method} is not allowed on {path}"


@pytest.mark.parametrize("path", ["/", "/v1/models/tiny", "/v2/models", "/v2/models/tiny/versions",
                                  "/v2/models/tiny/explain", "/v2/edged/pipelines/cam/pause",
                                  "/v2/health/live/", "/metricsx"])
def test_an_unknown_path_is_404(api, path):
    status, document = answer(api, "GET", path)
    assert status == 404
    assert document == {"error": f"no such endpoint: GET {path}"}


@pytest.mark.parametrize(("method", "path", "status", "error"), [
    ("GET", "/v2/models/nope", 404, "nope"),
    ("GET", "/v2/models/tiny/versions/7", 404, "the active version is 1"),
    ("POST", "/v2/models/tiny/infer", 400, ""),  # no body: invalid JSON
    ("POST", "/v2/edged/pipelines/cam/start", 404, "no pipeline 'cam' in the configuration"),
    ("GET", "/v2/edged/pipelines/cam/events", 404, "no running pipeline 'cam'"),
])
def test_domain_errors_become_their_statuses(api, method, path, status, error):
    got_status, document = answer(api, method, path)
    assert got_status == status
    assert error in document["error"]


def test_path_parameters_are_percent_decoded(api):
    status, document = answer(api, "GET", "/v2/models/ti%6Ey")
    assert status == 200 and document["name"] == "tiny"


def test_a_model_not_loaded_yet_is_503(tiny_store, tmp_path):
    settings = load_settings(None, store={"path": str(tiny_store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "cache")})
    api = Api(ModelManager(tiny_store, settings), settings)  # load_all not called yet
    status, document = answer(api, "GET", "/v2/models/tiny/ready")
    assert (status, document) == (503, {"name": "tiny", "ready": False})
    status, document = answer(api, "GET", "/v2/models/tiny")
    assert status == 503 and document["error"] == "edged is still loading its models"


# --- the system shared memory extension ------------------------------------------------------
@pytest.fixture
def segment() -> Iterator[Path]:
    """A 32-byte /dev/shm segment of this process's own, removed after the test."""
    path = Path(f"/dev/shm/edged-test-routes-{uuid.uuid4().hex[:12]}")
    path.write_bytes(np.array([[1, 2, -3, 0.5]], np.float32).tobytes() + bytes(16))
    path.chmod(0o600)
    yield path
    path.unlink(missing_ok=True)


def open_fds_to(path: Path) -> int:
    return sum(os.readlink(fd) == str(path) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink())


def test_shared_memory_routes_reach_their_handlers(api, segment):
    key = "/" + segment.name
    register = json.dumps({"key": key, "offset": 0, "byte_size": 32}).encode()
    assert answer(api, "POST", "/v2/systemsharedmemory/region/r1/register", register) == (200, {"text": ""})
    assert answer(api, "GET", "/v2/systemsharedmemory/status") == (
        200, [{"name": "r1", "key": key, "offset": 0, "byte_size": 32}])
    status, document = answer(api, "GET", "/v2/systemsharedmemory/region/r%32/status")
    assert status == 404 and document == {"error": "Unable to find system shared memory region: 'r2'"}
    body = json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                    "parameters": {"shared_memory_region": "r1", "shared_memory_byte_size": 16}}],
        "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r1", "shared_memory_byte_size": 16,
                                                 "shared_memory_offset": 16}}],
    }).encode()
    status, document = answer(api, "POST", "/v2/models/tiny/infer", body)
    assert status == 200 and "data" not in document["outputs"][0]
    assert np.array_equal(np.frombuffer(segment.read_bytes()[16:], np.float32), [3, 5, 0, 2])
    assert answer(api, "POST", "/v2/systemsharedmemory/region/r1/unregister") == (200, {"text": ""})
    assert answer(api, "POST", "/v2/systemsharedmemory/unregister") == (200, {"text": ""})
    assert answer(api, "GET", "/v2/systemsharedmemory/status") == (200, [])


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/v2/systemsharedmemory/region/r/register", "POST"),
    ("GET", "/v2/systemsharedmemory/unregister", "POST"),
    ("POST", "/v2/systemsharedmemory/status", "GET"),
    ("POST", "/v2/systemsharedmemory/region/r/status", "GET"),
])
def test_shared_memory_routes_answer_405_to_other_methods(api, method, path, allow):
    response = api.handle(request(method, path), PEER)
    assert (response.status, response.headers) == (405, {"Allow": allow})


def test_close_releases_every_region_and_may_be_called_again(api, segment):
    register = json.dumps({"key": "/" + segment.name, "byte_size": 32}).encode()
    for name in ("a", "b"):
        assert answer(api, "POST", f"/v2/systemsharedmemory/region/{name}/register", register)[0] == 200
    assert open_fds_to(segment) == 2
    api.close()
    assert open_fds_to(segment) == 0
    assert answer(api, "GET", "/v2/systemsharedmemory/status") == (200, [])
    api.close()


def test_metadata_lists_the_extension_only_when_it_is_on(api, tiny_store, tmp_path):
    assert "system_shared_memory" in answer(api, "GET", "/v2")[1]["extensions"]
    settings = load_settings(None, store={"path": str(tiny_store.root)},
                             socket={"max_shm_regions_per_uid": 0},
                             backends={"openvino_cache_dir": str(tmp_path / "cache")})
    off = Api(ModelManager(tiny_store, settings), settings)
    assert answer(off, "GET", "/v2")[1]["extensions"] == ["binary_tensor_data", "edged"]
    status, document = answer(off, "GET", "/v2/systemsharedmemory/status")
    assert status == 400 and "socket.max_shm_regions_per_uid = 0" in document["error"]
