"""Route dispatch without a socket: `Api.handle` on real requests, a real manager and a real
(tiny) model. Method and path choose the handler; a known path with another method is 405
with `Allow`; an unknown path 404; domain errors become their statuses. The socket, HTTP
parsing and limits are tested end to end in test_server.py."""

from __future__ import annotations

import json
import os

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
    is_json = response.content_type == "application/json"
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
    assert b'edged_model_ready{model="tiny"} 1' in response.body


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
