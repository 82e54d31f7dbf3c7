"""The Open Inference Protocol endpoints and edged's own extensions.

Handlers call the model manager and turn domain errors into HTTP statuses;
this is the only place that knows about either.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote

from edged import __version__, strict_json
from edged.api import codec
from edged.api.access import Peer, Rule
from edged.api.header_cache import HeaderCache
from edged.api.http import HTTPError, Request, Response, parse_length
from edged.api.shared_memory import RegionNotFound, Regions
from edged.api.tensors import HEADER_LENGTH, ShmTensor, datatype_of
from edged.config import Settings
from edged.errors import (
    BackendError,
    Busy,
    EdgedError,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
)
from edged.health import Health
from edged.metrics import MetricsPage, health_metrics, inference_metrics
from edged.models.manager import ModelManager, ServedModel
from edged.models.validation import check_layout
from edged.pipelines.group import PipelineNotFound, Pipelines
from edged.untrusted_json import parse_json

log = logging.getLogger(__name__)

STATUS_OF: list[tuple[type[Exception], int]] = [
    (InvalidInput, 400), (Forbidden, 403), (ModelNotFound, 404), (PipelineNotFound, 404),
    (RegionNotFound, 404), (Busy, 503), (ModelUnavailable, 503), (BackendError, 500),
]
_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_SHM = r"/v2/systemsharedmemory"
_REGION = r"/region/(?P<name>[^/]+)"


def json_response(status: int, doc: object) -> Response:
    return Response(status, strict_json.dumpb(doc))


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


class Api:
    def __init__(self, manager: ModelManager, settings: Settings, health: Health | None = None,
                 pipelines: Pipelines | None = None, startup_done: bool = True) -> None:
        """`startup_done`: False while the daemon loads its models and starts its pipelines."""
        self.manager = manager
        self.settings = settings
        self.health = health or Health(manager, manager.store.root)
        self.started = self.health.started
        self.socket_rule = Rule.build(
            settings.socket.allowed_users, settings.socket.allowed_groups, "socket"
        )
        self.model_rules = {
            name: Rule.build(m.allowed_users, m.allowed_groups, f"models.{name}")
            for name, m in settings.models.items()
        }
        self.max_pending = settings.socket.max_pending_requests
        self.max_json = settings.socket.max_json_bytes
        self.header_cache = HeaderCache()
        self.regions = Regions(settings.socket.max_shm_regions_per_uid, settings.socket.max_shm_bytes_per_uid)
        self.pending = 0
        self.counters: dict[str, int] = {}
        self.pipelines = pipelines
        # Ready also means started: the daemon sets this once its pipelines have started.
        self.startup_done = threading.Event()
        if startup_done:
            self.startup_done.set()
        self.stopping = threading.Event()
        self.socket_problem: str | None = None  # set by the server while its path cannot be reached
        self._lock = threading.Lock()
        self._infer_route = re.compile(_MODEL + r"/infer")
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = [
            ("POST", self._infer_route, self.infer),  # first: the hot path
            ("GET", re.compile(r"/v2/health/live"), self.live),
            ("GET", re.compile(r"/v2/health/ready"), self.ready),
            ("GET", re.compile(r"/v2/?"), self.server_metadata),
            ("GET", re.compile(_MODEL), self.model_metadata),
            ("GET", re.compile(_MODEL + r"/ready"), self.model_ready),
            ("GET", re.compile(r"/metrics"), self.metrics),
            ("GET", re.compile(r"/v2/edged/status"), self.status),
            ("GET", re.compile(r"/v2/edged/pipelines"), self.pipeline_status),
            ("GET", re.compile(r"/v2/edged/pipelines/(?P<name>[^/]+)/events"), self.pipeline_events),
            ("POST", re.compile(r"/v2/edged/pipelines/(?P<name>[^/]+)/(?P<action>start|stop|restart)"),
             self.pipeline_control),
            ("GET", re.compile(f"{_SHM}(?:{_REGION})?/status"), self.shm_status),
            ("POST", re.compile(f"{_SHM}{_REGION}/register"), self.shm_register),
            ("POST", re.compile(f"{_SHM}(?:{_REGION})?/unregister"), self.shm_unregister),
        ]

    def close(self) -> None:
        """Release what the API holds for its clients (their shared-memory regions); safe to
        call again."""
        self.regions.close()

    # --- dispatch -------------------------------------------------------------
    def admit(self, request: Request, peer: Peer) -> Response | None:
        """Refuse on the head alone, before a body is received: who, which model, room, size."""
        match = self._infer_route.fullmatch(request.path)
        name = match["name"] if match else None
        if name is None and (model := re.match(r"/v2/models/([^/]+)", request.path)):
            name = model[1]
        if name is not None:
            rule = self.model_rules.get(unquote(name))
            if rule is not None and not rule.allows(peer):
                message = f"uid {peer.uid} is not allowed to use model {unquote(name)!r}"
                return error_response(403, message)
        if match is None or request.method != "POST":
            return None
        if self.pending >= self.max_pending:
            self.count("refused_busy")
            return error_response(503, f"server busy: {self.pending} requests in progress, try again")
        json_length = request.length
        if HEADER_LENGTH in request.headers:
            try:
                json_length = parse_length(request.headers[HEADER_LENGTH],
                                           "Inference-Header-Content-Length")
            except HTTPError as exc:
                return error_response(400, str(exc))
        if json_length > self.max_json:
            return error_response(413, f"JSON part of {json_length} bytes is over the {self.max_json}-byte "
                                       "limit: send large tensors with the binary extension")
        return None

    def handle(self, request: Request, peer: Peer) -> Response:
        allowed_methods = []
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed_methods.append(method)
                continue
            try:
                params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                return handler(request, peer, **params)
            except EdgedError as exc:
                return error_response(self._status(exc), str(exc))
            except Exception as exc:  # a bug must cost one request, never the daemon
                log.exception("unhandled error on %s %s", request.method, request.path)
                return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        if allowed_methods:
            response = error_response(405, f"{request.method} is not allowed on {request.path}")
            response.headers = {"Allow": ", ".join(sorted(set(allowed_methods)))}
            return response
        return error_response(404, f"no such endpoint: {request.method} {request.path}")

    @staticmethod
    def _status(exc: EdgedError) -> int:
        for kind, status in STATUS_OF:
            if isinstance(exc, kind):
                return status
        return 400

    def _check_model_access(self, name: str, peer: Peer) -> None:
        rule = self.model_rules.get(name)
        if rule is not None and not rule.allows(peer):
            raise Forbidden(f"uid {peer.uid} is not allowed to use model {name!r}")

    def _model(self, name: str, peer: Peer, version: str | None = None) -> ServedModel:
        self._check_model_access(name, peer)
        return self.manager.get(name, version)

    # --- health and metadata ------------------------------------------------------
    def live(self, request: Request, peer: Peer) -> Response:
        return json_response(200, {"live": True})

    def ready(self, request: Request, peer: Peer) -> Response:
        ready = self.health.ready() and self.startup_done.is_set()
        return json_response(200 if ready else 503, {"ready": ready})

    def server_metadata(self, request: Request, peer: Peer) -> Response:
        extensions = ["binary_tensor_data", "edged"]
        if self.regions.enabled:
            extensions.insert(1, "system_shared_memory")
        return json_response(200, {"name": "edged", "version": __version__, "extensions": extensions})

    def model_metadata(self, request: Request, peer: Peer, name: str, version: str | None = None) -> Response:
        served = self._model(name, peer, version)
        loaded = served.loaded

        def tensors(specs):
            return [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)}
                    for s in specs]

        return json_response(200, {
            "name": name, "versions": [served.version], "platform": served.selection.backend,
            "inputs": tensors(loaded.inputs), "outputs": tensors(loaded.outputs),
            "parameters": {
                "precision": served.selection.precision, "format": served.manifest.format,
                "labels": served.manifest.labels, "preprocessing": served.manifest.preprocessing,
                "decoder": served.manifest.decoder,
            },
        })

    def model_ready(self, request: Request, peer: Peer, name: str, version: str | None = None) -> Response:
        try:
            self._model(name, peer, version)
        except ModelUnavailable:
            return json_response(503, {"name": name, "ready": False})
        return json_response(200, {"name": name, "ready": True})

    # --- inference ------------------------------------------------------------------
    def infer(self, request: Request, peer: Peer, name: str, version: str | None = None) -> Response:
        self._check_model_access(name, peer)
        with self._lock:
            if self.pending >= self.max_pending:
                self.counters["refused_busy"] = self.counters.get("refused_busy", 0) + 1
                raise Busy(f"server busy: {self.pending} requests in progress, try again")
            self.pending += 1
        try:
            header_length = None
            if HEADER_LENGTH in request.headers:
                try:
                    header_length = parse_length(request.headers[HEADER_LENGTH],
                                                 "Inference-Header-Content-Length")
                except HTTPError as exc:
                    raise InvalidInput(str(exc)) from None
            decoded = codec.decode_request(request.body, header_length, self.header_cache)
            inputs, places = decoded.inputs, {}
            if decoded.uses_shared_memory:  # checked before the daemon allocates and reads anything
                loaded = self.manager.get(name, version).loaded
                check_layout({k: v for k, v in inputs.items() if isinstance(v, ShmTensor)},
                             loaded.inputs)
                places = self.regions.output_places(peer.uid, decoded.outputs, loaded.outputs)
                inputs = self.regions.read_inputs(peer.uid, inputs)
            result = self.manager.infer(name, inputs, version, into=places)
            if decoded.uses_shared_memory:
                self.regions.write_outputs(peer.uid, codec.requested(result.outputs, decoded), result.outputs,
                                           places)
            body, json_length = codec.encode_response_parts(
                name, result.model.version, result.outputs, decoded
            )
        finally:
            with self._lock:
                self.pending -= 1
        if json_length is None:
            return Response(200, body)
        return Response(200, body, "application/octet-stream",
                        {"Inference-Header-Content-Length": str(json_length)})

    # --- system shared memory (Triton's extension, regions kept per peer uid) -------------
    def shm_status(self, request: Request, peer: Peer, name: str | None = None) -> Response:
        return json_response(200, self.regions.status(peer.uid, name))

    def shm_register(self, request: Request, peer: Peer, name: str) -> Response:
        doc = parse_json(request.body, "register request")
        if not isinstance(doc, dict):
            raise InvalidInput('register request must be an object: {"key": "/name", "offset": 0, '
                               '"byte_size": n}')
        memfd = doc.get("memfd") is True  # edged's zero-copy way: the segment's fd comes with the request
        for field in ("byte_size",) if memfd else ("key", "byte_size"):
            if field not in doc:
                raise InvalidInput(f"Shared memory register request has no {field!r} field")
        if not memfd and not isinstance(doc["key"], str):
            raise InvalidInput("register request: 'key' must be a string such as \"/camera0\"")
        numbers = [doc.get("offset", 0), doc["byte_size"]]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise InvalidInput("register request: 'offset' and 'byte_size' must be integers")
        if not memfd:
            self.regions.register(peer, name, doc["key"], *numbers)
        elif len(request.fds) != 1:
            raise InvalidInput(f'a "memfd" register request must carry exactly one descriptor (SCM_RIGHTS) '
                               f"with its head; it carried {len(request.fds)}")
        else:
            self.regions.register_memfd(peer, name, request.fds.pop(), *numbers)
        return Response(200, b"")  # as Triton: success has an empty body

    def shm_unregister(self, request: Request, peer: Peer, name: str | None = None) -> Response:
        self.regions.unregister(peer.uid, name)
        return Response(200, b"")

    # --- edged extensions --------------------------------------------------------------
    def status(self, request: Request, peer: Peer) -> Response:
        return json_response(200, self.status_document())

    def pipeline_status(self, request: Request, peer: Peer) -> Response:
        return json_response(200, self.pipelines.status() if self.pipelines else {})

    def pipeline_events(self, request: Request, peer: Peer, name: str) -> Response:
        """Newline-delimited JSON results of a running pipeline, for as long as the client reads."""
        pipeline = self.pipelines.running.get(name) if self.pipelines else None
        if pipeline is None:
            raise PipelineNotFound(f"no running pipeline {name!r}")
        self._check_model_access(pipeline.settings.model, peer)

        def lines():
            # Subscribed on the first chunk, not before: a stream that is never sent (HEAD, a
            # refusal, a client gone before the head) must leave no subscription behind.
            subscription = pipeline.events.subscribe()
            try:
                while not self.stopping.is_set() and not pipeline.events.closed.is_set():
                    result = subscription.get(timeout=1.0)
                    if result is None:
                        yield b"\n"  # an empty line now and then finds out when a client has gone
                    else:
                        yield strict_json.dumpb(result) + b"\n"
            finally:
                subscription.close()

        return Response(200, b"", "application/x-ndjson", stream=lines())

    def pipeline_control(self, request: Request, peer: Peer, name: str, action: str) -> Response:
        if self.pipelines is None or name not in self.pipelines.settings:
            raise PipelineNotFound(f"no pipeline {name!r} in the configuration")
        self._check_model_access(self.pipelines.settings[name].model, peer)
        getattr(self.pipelines, action)(name)
        return json_response(200, {"pipeline": name, "done": action})

    def status_document(self) -> dict:
        return self.health.document()

    def socket_reachable(self) -> bool:
        """The document's `ready` is the readiness clients see: models loaded and the socket
        reachable at its path (a transport's fact, so it comes from here, not health.py)."""
        return self.socket_problem is None

    def api_status(self) -> dict:
        """This transport's own section of the health document."""
        return {"pending": self.pending, "socket_problem": self.socket_problem, **self.counters}

    def metrics(self, request: Request, peer: Peer) -> Response:
        text = MetricsPage()
        text.family("edged_uptime_seconds", "gauge", "Seconds since the daemon started.")
        text.sample("edged_uptime_seconds", round(time.time() - self.started, 3))
        text.family("edged_model_ready", "gauge", "1 when the model serves requests.")
        served = self.manager.served()
        for name in sorted(set(served) | set(self.manager.failures)):
            text.sample("edged_model_ready", int(name in served), {"model": name})
        text.family("edged_model_info", "gauge", "Active version and backend of each served model.")
        for name, model in sorted(served.items()):
            text.sample("edged_model_info", 1, {
                "model": name, "version": model.version, "backend": model.selection.backend,
                "precision": model.selection.precision,
            })
        inference_metrics(text, sorted(self.manager.stats.items()))
        text.family("edged_api_pending_requests", "gauge", "Inference requests in progress.")
        text.sample("edged_api_pending_requests", self.pending)
        text.family("edged_api_events_total", "counter", "Connection-level events on the socket.")
        for event, count in sorted(self.counters.items()):
            text.sample("edged_api_events_total", count, {"event": event})
        health_metrics(text, self.health.document())
        body, content_type = text.render(request.headers.get("accept", ""))
        return Response(200, body, content_type)

    def count(self, event: str) -> None:
        with self._lock:
            self.counters[event] = self.counters.get(event, 0) + 1

