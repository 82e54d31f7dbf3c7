"""One pipeline: source -> preprocess -> model -> decode -> sinks, in its own thread.

The model is called through the same `ModelManager.infer` as the socket API, so a
hot swap or a backend fallback reaches the pipeline too. A failure in any stage is
counted, logged once per kind and never stops the daemon; a crash of the loop
itself restarts it with a doubling backoff.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from edged.config import PipelineSettings
from edged.errors import EdgedError
from edged.metrics import Histogram
from edged.models.manager import ModelManager
from edged.pipelines.decoders import build_decoder
from edged.pipelines.preprocess import Preprocessing, image_to_tensor
from edged.pipelines.quality import QualityMonitor
from edged.pipelines.sinks.jsonl import JsonlSink
from edged.pipelines.sources.camera import CameraSource

log = logging.getLogger(__name__)
STAGES = ("preprocess", "infer", "decode", "sinks")


class Pipeline:
    def __init__(self, name: str, settings: PipelineSettings, manager: ModelManager) -> None:
        self.name = name
        self.settings = settings
        self.manager = manager
        self.source = CameraSource(settings.source)
        self.sinks = [JsonlSink(s) for s in settings.sinks]
        self.quality = QualityMonitor(settings.quality)
        self.stages = {stage: Histogram() for stage in STAGES}
        self.processed = 0
        self.errors = 0
        self.last_error = ""
        self.restarts = 0
        self.started_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self.started_at = time.monotonic()
        self.source.start()
        self._thread = threading.Thread(target=self._supervise, name=f"pipeline-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.source.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sink in self.sinks:
            sink.close()

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except Exception as exc:  # a bug in one pipeline must not end the others
                self.restarts += 1
                self._note_error(f"pipeline crashed: {type(exc).__name__}: {exc}")
                log.exception("pipeline %s crashed; restarting in %.0f s", self.name, backoff)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)

    # --- the loop -------------------------------------------------------------------
    def _loop(self) -> None:
        cache: tuple | None = None  # (model version, spec, preprocessing, decoder)
        while not self._stop.is_set():
            frame = self.source.take(timeout=0.5)
            if frame is None:
                if self.source.state == "finished":
                    return
                continue
            was = self.quality.reason
            if self.quality.check(frame.image, time.monotonic()) != was:
                if self.quality.reason:
                    log.warning("pipeline %s degraded: %s", self.name, self.quality.reason)
                else:
                    log.info("pipeline %s: input recovered", self.name)
            try:
                served = self.manager.get(self.settings.model)
            except EdgedError as exc:
                self._note_error(str(exc))
                continue
            if cache is None or cache[0] is not served:
                spec = served.loaded.inputs[0]
                cache = (served, spec, Preprocessing.parse(served.manifest.preprocessing),
                         build_decoder(served.manifest.decoder, served.manifest.labels))
            _, spec, preprocessing, decoder = cache
            try:
                self._process(frame, spec, preprocessing, decoder)
            except EdgedError as exc:
                self._note_error(str(exc))

    def _process(self, frame, spec, preprocessing, decoder) -> None:
        t0 = time.perf_counter()
        tensor, placement = image_to_tensor(frame.image, spec.shape, spec.dtype, preprocessing)
        t1 = time.perf_counter()
        result = self.manager.infer(self.settings.model, {spec.name: tensor})
        t2 = time.perf_counter()
        height, width = frame.image.shape[:2]
        if decoder is not None:
            decoded = decoder.decode(result.outputs, placement, width, height)
        else:
            decoded = {"outputs": {n: _summary(a) for n, a in result.outputs.items()}}
        t3 = time.perf_counter()
        record = {"pipeline": self.name, "model": self.settings.model, "version": result.model.version,
                  "frame": frame.number, "time": round(frame.captured_at, 6), **decoded}
        for sink in self.sinks:
            sink.write(record)
        t4 = time.perf_counter()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            self.stages[stage].observe(seconds)
        self.processed += 1

    def _note_error(self, message: str) -> None:
        self.errors += 1
        if message != self.last_error:
            log.warning("pipeline %s: %s", self.name, message)
        self.last_error = message

    # --- reporting ----------------------------------------------------------------
    def status(self) -> dict:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        source = self.source
        return {
            "model": self.settings.model,
            "state": "degraded" if source.state == "running" and self.quality.reason else source.state,
            "degraded_reason": self.quality.reason,
            "source_fps": round(source.frames.received / elapsed, 2),
            "processed_fps": round(self.processed / elapsed, 2),
            "frames": source.frames.received, "processed": self.processed,
            "dropped": source.frames.dropped, "errors": self.errors, "restarts": self.restarts,
            "reconnects": source.reconnects,
            "last_error": self.last_error or source.last_error,
            "latency": {stage: hist.summary_ms() for stage, hist in self.stages.items()},
        }


def _summary(array: np.ndarray) -> dict:
    return {"shape": list(array.shape), "dtype": str(array.dtype)}
