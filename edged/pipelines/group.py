"""All pipelines of a daemon: started from the config, controlled at run time."""

from __future__ import annotations

import logging
import threading

from edged.config import PipelineSettings
from edged.errors import EdgedError, InvalidInput
from edged.models.manager import ModelManager
from edged.pipelines.mqtt_port import MqttPort, SharedPort
from edged.pipelines.runner import Pipeline

log = logging.getLogger(__name__)


class PipelineNotFound(EdgedError):
    pass


class Pipelines:
    def __init__(self, settings: dict[str, PipelineSettings], manager: ModelManager,
                 mqtt: MqttPort | None = None) -> None:
        """`mqtt`: the daemon's link (None without one), for mqtt sources and sinks."""
        self.settings = settings
        self.manager = manager
        self.running: dict[str, Pipeline] = {}
        self.failures: dict[str, str] = {}  # pipelines that could not start, and why
        self.mqtt = SharedPort(mqtt) if mqtt is not None else None
        # One control operation at a time: start, stop and restart never interleave.
        self._lock = threading.RLock()

    def start_enabled(self) -> None:
        """Start every enabled pipeline; one that cannot start is reported, the rest run."""
        with self._lock:
            for name, settings in self.settings.items():
                if not settings.enabled or name in self.running:
                    continue
                try:
                    self._start(name)
                except EdgedError as exc:
                    log.error("%s", exc, extra={"PIPELINE": name, "MODEL": settings.model})

    def start(self, name: str) -> None:
        with self._lock:
            if name in self.running:
                raise InvalidInput(f"pipeline {name!r} is already running")
            self._start(name)

    def stop(self, name: str) -> None:
        with self._lock:
            self._known(name)
            pipeline = self.running.pop(name, None)
            if pipeline is None:
                raise InvalidInput(f"pipeline {name!r} is not running")
            pipeline.stop()
        log.info("pipeline %s stopped", name, extra={"PIPELINE": name})

    def restart(self, name: str) -> None:
        with self._lock:
            self._known(name)
            pipeline = self.running.pop(name, None)
            if pipeline is not None:
                pipeline.stop()
            self._start(name)

    def apply(self, settings: dict[str, PipelineSettings]) -> None:
        """A reloaded config: stop pipelines removed or changed, start new and changed enabled ones."""
        with self._lock:
            for name in list(self.running):
                if settings.get(name) != self.settings.get(name):
                    self.running.pop(name).stop()
                    log.info("pipeline %s stopped (config changed)", name, extra={"PIPELINE": name})
            for name in set(self.failures) - set(settings):
                self.failures.pop(name)
            self.settings = settings
            self.start_enabled()

    def stop_all(self) -> None:
        with self._lock:
            pipelines, self.running = list(self.running.values()), {}
            for pipeline in pipelines:
                pipeline.request_stop()  # all at once, then wait for each
            for pipeline in pipelines:
                pipeline.stop()

    def status(self) -> dict:
        idle = {"frames": 0, "processed": 0, "dropped": 0, "errors": 0, "restarts": 0,
                "reconnects": 0, "last_error": ""}
        result = {name: {"model": s.model, "state": "stopped", "source": s.source.uri or s.source.kind,
                         **idle} for name, s in sorted(self.settings.items())}
        for name, reason in self.failures.items():
            result[name].update(state="failed", last_error=reason)
        for name, pipeline in list(self.running.items()):
            source = pipeline.settings.source
            result[name] = {**pipeline.status(), "source": source.uri or source.kind}
        return result

    def counts(self) -> tuple[int, int, int]:
        """(running, failed, finished) for the daemon's status line; a pipeline whose model is
        not served is started but counts as failed, and one whose source reached its end
        (`finished`: a video file, stdin at EOF) is neither running nor failed."""
        states = [info["state"] for info in self.status().values()]
        running = sum(state not in ("stopped", "failed", "finished") for state in states)
        return running, states.count("failed"), states.count("finished")

    def _known(self, name: str) -> PipelineSettings:
        if name not in self.settings:
            raise PipelineNotFound(f"no pipeline {name!r} in the configuration")
        return self.settings[name]

    def _start(self, name: str) -> None:
        settings = self._known(name)
        try:
            pipeline = Pipeline(name, settings, self.manager, self.mqtt)
        except (OSError, ValueError) as exc:  # e.g. a sink file that cannot be opened
            reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) else str(exc)
            self.failures[name] = f"pipeline {name!r} cannot start: {reason}"
            raise InvalidInput(self.failures[name]) from None
        self.failures.pop(name, None)
        pipeline.start()
        self.running[name] = pipeline
        log.info("pipeline %s: %s -> %s", name, settings.source.uri or settings.source.kind, settings.model,
                 extra={"PIPELINE": name, "MODEL": settings.model})
        if missing := pipeline.missing_model():  # it runs, `failed`, until the model is served
            log.error("pipeline %s: %s", name, missing, extra={"PIPELINE": name, "MODEL": settings.model})
