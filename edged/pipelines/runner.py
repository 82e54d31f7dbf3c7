"""One pipeline: source -> preprocess -> model -> decode -> sinks.

Two threads (besides the source's own) overlap the work so the model is never idle
waiting for Python:
    inferer   `ModelManager.infer` and nothing else (the same call the socket API
              makes, so hot swaps and backend fallbacks reach pipelines too)
    worker    everything in Python, one step at a time: when the model's slot is free,
              the newest frame or sensor window -> input quality -> preprocess (a
              window only takes the input's shape and dtype) into the slot; otherwise
              decode -> sinks for what the model has done
The Python steps hold the GIL and are short, so a thread each would not run them side
by side; it would only add hand-offs (wake-ups, context switches, GIL hand-overs:
measured at ~0.1 ms of CPU per frame for the third thread this replaced, on 2 cores).
Only the model, video decoding and OpenCV release the GIL for long. One condition variable
carries every hand-off; the slot holds one item, so a live camera's extra frames are
dropped at the source (counted), never queued, and the frame prepared is the newest
when the model is ready for it. A failure is counted and logged once per kind; an
unexpected exception restarts that thread's loop with a doubling backoff. Nothing
here ever stops the daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edged.backends.base import TensorSpec
from edged.config import PipelineSettings
from edged.errors import EdgedError, ModelNotFound
from edged.metrics import Histogram
from edged.models.manager import ModelManager, ServedModel
from edged.pipelines.annotate import Seen
from edged.pipelines.decoders import Decoder, build_decoder
from edged.pipelines.mqtt_port import SharedPort
from edged.pipelines.opencv import as_bgr, setup_opencv
from edged.pipelines.preprocess import Placement, Preprocessing, image_to_tensor, window_to_tensor
from edged.pipelines.quality import InputQuality
from edged.pipelines.sinks import FrameSink, Sink, build_sinks, wants_frames
from edged.pipelines.sinks.stream import EventHub
from edged.pipelines.sources import Frame, Window, build_source

log = logging.getLogger(__name__)
STAGES = ("preprocess", "infer", "decode", "sinks")
RAW_VALUES_MAX = 64  # raw results show an output's values up to this many, else only its shape


@dataclass
class _ModelView:
    """What the stages need to know about the served model, worked out once per version."""

    served: ServedModel
    spec: TensorSpec
    preprocessing: Preprocessing
    decoder: Decoder | None


@dataclass
class _Item:
    frame: Frame | Window
    model: _ModelView
    tensor: np.ndarray
    placement: Placement
    version: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


class Pipeline:
    def __init__(self, name: str, settings: PipelineSettings, manager: ModelManager,
                 mqtt: SharedPort | None = None) -> None:
        self.name = name
        self.settings = settings
        self.manager = manager
        self.source = build_source(settings.source, name, mqtt)
        self.events = EventHub()  # the socket's event stream; costs nothing without subscribers
        self.sinks: list[Sink] = build_sinks(settings.sinks, name, mqtt)  # the configured sinks
        # Where each result is written: the configured sinks and the event stream; sinks that
        # draw on the frame (snapshots) get it too, and only they: the rest pay nothing for it.
        self._frame_writers: list[FrameSink] = [s for s in self.sinks if wants_frames(s)]
        self._writers: list[Sink] = [s for s in (*self.sinks, self.events) if not wants_frames(s)]
        self.quality = InputQuality(settings.quality, settings.source.is_sensor, name, self._log_fields)
        self.stages = {stage: Histogram() for stage in STAGES}
        self.processed = 0
        self.errors = 0
        self.last_error = ""
        self.restarts = 0
        self.started_at = 0.0
        self.inference_cpu_s = 0.0  # CPU time of the inferer inside ModelManager.infer
        # The hand-offs, all under one condition: the prepared item the model takes next,
        # and the inferred items the worker decodes and writes out. A new frame at the
        # source wakes the worker through the same condition.
        self._cond = threading.Condition()
        self._slot: _Item | None = None
        self._inferred: deque[_Item] = deque()
        self._doing = "feed"  # what the worker does now, to name a failure
        self.source.frames.on_put = self._frame_arrived
        self._completed = 0  # frames through the sinks, or given up on after an error
        self._lock = threading.Lock()
        self._view: _ModelView | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self.started_at = time.monotonic()
        if not self.settings.source.is_sensor:
            setup_opencv()
        self.source.start()
        for stage in (self._infer, self._work):
            thread = threading.Thread(target=self._supervise, args=(stage,), daemon=True,
                                      name=f"pipeline-{self.name}-{stage.__name__.strip('_')}")
            self._threads.append(thread)
            thread.start()

    def request_stop(self) -> None:
        self._stop.set()
        self.source.request_stop()
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        self.request_stop()
        self.source.stop()
        for thread in self._threads:
            thread.join(timeout=2)
        for sink in (*self._writers, *self._frame_writers):
            sink.close()  # the event hub's close ends its streams

    @property
    def finished(self) -> bool:
        """A video file played to its end and every frame taken from it went through."""
        frames = self.source.frames
        return (self.source.state == "finished" and frames.pending == 0
                and self._completed >= frames.taken)

    def _supervise(self, stage: Callable[[], None]) -> None:
        """Run a stage item after item; a failed item is counted, repeated failures back off."""
        failures = 0
        while not self._stop.is_set():
            try:
                stage()
                failures = 0
            except Exception as exc:  # one bad frame or a bug must not end the pipeline or the daemon
                failures += 1
                self._done_with_one()
                if isinstance(exc, EdgedError):
                    self._note_error(str(exc))
                else:
                    with self._lock:
                        self.restarts += 1
                    doing = self._doing if stage == self._work else stage.__name__.strip("_")
                    # A traceback once per kind of failure: one that comes back with every
                    # frame (failures never reach 2 between good steps) must not flood the log.
                    self._note_error(f"{doing} failed: {type(exc).__name__}: {exc}", exc_info=True)
                if failures >= 3 and self._stop.wait(min(0.1 * 2 ** (failures - 3), 30.0)):
                    return

    # --- the two threads ----------------------------------------------------------------
    def _infer(self) -> None:
        with self._cond:
            while self._slot is None:
                if self._stop.is_set() or not self._cond.wait(0.5):
                    return
            item, self._slot = self._slot, None
            self._cond.notify_all()  # the worker may prepare the next frame meanwhile
        start, cpu = time.perf_counter(), time.thread_time()
        # Pinned to the version the frame was prepared for: across a hot swap, a frame
        # prepared for the old version fails alone instead of being decoded wrongly.
        result = self.manager.infer(self.settings.model, {item.model.spec.name: item.tensor},
                                    version=item.model.served.version)
        self.inference_cpu_s += time.thread_time() - cpu
        self.stages["infer"].observe(time.perf_counter() - start)
        item.outputs, item.version = result.outputs, result.model.version
        with self._cond:
            self._inferred.append(item)
            self._cond.notify_all()

    def _work(self) -> None:
        """One step: feed the model's free slot from a waiting frame first (the model must
        not wait), else finish the oldest inferred item; or wait for either."""
        with self._cond:
            while True:
                if self._slot is None and self.source.frames.pending:
                    item = None
                    break
                if self._inferred:
                    item = self._inferred.popleft()
                    break
                if self._stop.is_set() or not self._cond.wait(0.5):
                    return
        if item is not None:
            self._doing = "finish"
            self._finish(item)
            return
        self._doing = "feed"
        frame = self.source.take(timeout=0)
        if frame is not None:  # always, but for a source that was stopped meanwhile
            prepared = self._feed(frame)
            with self._cond:
                self._slot = prepared
                self._cond.notify_all()

    def _frame_arrived(self) -> None:
        """Called by the source after each new frame or window: the worker may be waiting."""
        with self._cond:
            self._cond.notify_all()

    # --- the steps --------------------------------------------------------------------
    def _feed(self, frame: Frame | Window) -> _Item:
        if isinstance(frame, Frame):
            frame.image = as_bgr(frame.image)
        self.quality.see(frame, self.source.reconnects, time.monotonic())
        view = self._model_view()
        start = time.perf_counter()
        if isinstance(frame, Window):
            tensor, placement = window_to_tensor(frame.data, view.spec.shape, view.spec.dtype)
        else:
            tensor, placement = image_to_tensor(frame.image, view.spec.shape, view.spec.dtype,
                                                view.preprocessing)
        self.stages["preprocess"].observe(time.perf_counter() - start)
        return _Item(frame, view, tensor, placement)

    def _finish(self, item: _Item) -> None:
        start = time.perf_counter()
        frame = item.frame
        if isinstance(frame, Window):
            # A window has no pixels: its "frame size" is the input's (samples, channels).
            width, height, counter = item.placement.input_width, item.placement.input_height, "window"
        else:
            (height, width), counter = frame.image.shape[:2], "frame"
        if item.model.decoder is not None:
            decoded = item.model.decoder.decode(item.outputs, item.placement, width, height)
        else:
            decoded = {"outputs": {n: _raw(a) for n, a in item.outputs.items()}}
        middle = time.perf_counter()
        record = {"pipeline": self.name, "model": self.settings.model, "version": item.version,
                  counter: frame.number, "time": round(frame.captured_at, 6), **decoded}
        for sink in self._writers:
            sink.write(record)
        if self._frame_writers and isinstance(frame, Frame):
            seen = Seen(frame.image, item.outputs, item.placement, item.model.decoder)
            for frame_sink in self._frame_writers:
                frame_sink.write_frame(record, seen)
        self.stages["decode"].observe(middle - start)
        self.stages["sinks"].observe(time.perf_counter() - middle)
        with self._lock:
            self.processed += 1
        self._done_with_one()

    # --- helpers ----------------------------------------------------------------------
    def _model_view(self) -> _ModelView:
        served = self.manager.get(self.settings.model)
        if self._view is None or self._view.served is not served:
            manifest = served.manifest
            self._view = _ModelView(served, served.loaded.inputs[0],
                                    Preprocessing.parse(manifest.preprocessing),
                                    build_decoder(manifest.decoder, manifest.labels,
                                                  windows=self.settings.source.is_sensor))
        return self._view

    @property
    def _log_fields(self) -> dict[str, str]:
        """Journal fields for this pipeline's log lines."""
        return {"PIPELINE": self.name, "MODEL": self.settings.model}

    def missing_model(self) -> str:
        """Why the model cannot serve this pipeline (not in the store, failed to load), or ''."""
        model = self.settings.model
        try:
            self.manager.get(model)
        except ModelNotFound as exc:
            return str(exc)
        except EdgedError as exc:  # unavailable: still loading (no failure) or failed to load
            return f"model {model!r} cannot be served: {exc}" if model in self.manager.failures else ""
        return ""

    def _done_with_one(self) -> None:
        with self._lock:
            self._completed += 1

    def _note_error(self, message: str, exc_info: bool = False) -> None:
        with self._lock:
            self.errors += 1
        if message != self.last_error:
            log.warning("pipeline %s: %s", self.name, message, exc_info=exc_info, extra=self._log_fields)
        self.last_error = message

    # --- reporting ----------------------------------------------------------------------
    def status(self) -> dict:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        source = self.source
        state, last_error = source.state, self.last_error or source.last_error
        # What keeps the results from being trusted (the input) or kept (a sink that fails).
        degraded = "; ".join(p for p in (self.quality.reason, *(s.problem for s in self.sinks)) if p)
        if missing := self.missing_model():
            state, last_error = "failed", missing  # nothing can be inferred until it is served
        elif state == "running" and degraded:
            state = "degraded"
        elif state == "finished" and not self.finished:
            state = "running"  # the last frames are still going through
        return {
            "model": self.settings.model,
            "state": state,
            "degraded_reason": degraded,
            "source_fps": round(source.frames.received / elapsed, 2),
            "processed_fps": round(self.processed / elapsed, 2),
            "frames": source.frames.received, "processed": self.processed,
            "dropped": source.frames.dropped, "errors": self.errors, "restarts": self.restarts,
            "reconnects": source.reconnects,
            "last_error": last_error,
            "latency": {stage: hist.summary_ms() for stage, hist in self.stages.items()},
            "sinks": [sink.details() for sink in self.sinks],
            "event_streams": self.events.subscribers,  # clients reading /v2/edged/pipelines/{name}/events
            **source.details(),
        }


def _raw(output: np.ndarray) -> dict:
    """An output without a decoder: its shape and type, and its values when there are few."""
    raw: dict = {"shape": list(output.shape), "dtype": str(output.dtype)}
    if output.size <= RAW_VALUES_MAX:
        raw["data"] = output.reshape(-1).tolist()
    return raw
