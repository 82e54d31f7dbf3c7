"""Serves the active version of every model in the store.

The manager is the one inference service behind every transport: the socket
API, pipelines and MQTT commands all call `infer`. It loads what the store
marks active, swaps versions without failing a request (load and warm the new
one, switch, close the old one when its last request finishes), and moves a
model to another backend when its backend starts failing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from edged.backends.base import LoadedModel, LoadOptions
from edged.backends.faults import run_checked
from edged.backends.selection import Selection, select
from edged.config import ModelSettings, Settings
from edged.errors import BackendError, EdgedError, InputRejected, ModelNotFound, ModelUnavailable
from edged.metrics import Counts, ModelStats
from edged.models.attempts import Attempts
from edged.models.lifecycle import (
    Adopted,
    Failed,
    Fallback,
    Loaded,
    ModelEvents,
    ModelState,
    ServedModel,
    Skipped,
    Unloaded,
    tell,
)
from edged.models.manifest import Manifest
from edged.models.store import ModelStore
from edged.models.validation import validate_inputs

log = logging.getLogger(__name__)


@dataclass
class InferResult:
    model: ServedModel
    outputs: dict[str, np.ndarray]


class ModelManager:
    def __init__(self, store: ModelStore, settings: Settings, events: ModelEvents | None = None) -> None:
        self.store = store
        self.settings = settings
        self.events = events or ModelEvents()
        # Loads recorded on disk: a backend that crashed the process is skipped after a restart.
        self.attempts = Attempts(store, lambda data: tell(self.events.on_skipped, Skipped(**data)))
        self._states: dict[str, ModelState] = {}  # model name -> all that is known of it
        self._first_load_done = False
        self._swap_lock = threading.RLock()
        self._stats_lock = threading.Lock()

    @property
    def failures(self) -> dict[str, str]:
        """{model: why it cannot be served} (a served older version may serve meanwhile)."""
        return {n: s.failure for n, s in list(self._states.items()) if s.failure is not None}

    @property
    def stats(self) -> dict[str, ModelStats]:
        """{model: its statistics}, for every model loaded at least once."""
        return {n: s.stats for n, s in list(self._states.items()) if s.stats is not None}

    def _state(self, name: str) -> ModelState:
        return self._states.setdefault(name, ModelState(name))

    # --- serving -----------------------------------------------------------
    def infer(
        self, name: str, inputs: dict[str, np.ndarray], version: str | None = None, *, internal: bool = False,
        into: Mapping[str, np.ndarray] | None = None,
    ) -> InferResult:
        """`internal`: the daemon's own inference (a watchdog check, an update's self-test),
        counted apart from client traffic; it runs the same path otherwise. `into`: where
        the caller would like outputs written (see `LoadedModel.infer`)."""
        served, model_stats = self._acquire(name, version)
        try:
            stats = model_stats.internal if internal else model_stats
            try:
                checked = validate_inputs(
                    inputs, served.loaded.inputs, reject_non_finite=served.settings.reject_non_finite
                )
            except EdgedError:
                self._count(stats, "rejected")
                raise
            start = time.perf_counter()
            where = f"{name} {served.version} on {served.selection.label}"
            try:  # a runtime error is judged there: the inputs' fault or the runtime's
                outputs = run_checked(served.loaded, checked, where, into)
            except InputRejected as exc:  # the backend is sound: no step towards a fallback
                self._count(stats, "rejected")
                raise InputRejected(f"{where}: the model rejected these inputs: {exc}") from exc
            except BackendError as exc:
                self._count(stats, "errors")
                self._on_backend_error(served, exc)
                raise BackendError(f"{where}: inference failed: {exc}") from exc
            stats.latency.observe(time.perf_counter() - start)
            served.consecutive_errors = 0
            return InferResult(served, outputs)
        finally:
            served.release()

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model (for metadata); raises like `infer` would."""
        return self._lookup(name, version)[0]

    def served(self) -> dict[str, ServedModel]:
        return {n: s.served for n, s in list(self._states.items()) if s.served is not None}

    def ready(self) -> bool:
        """True once every active model has been loaded or has failed."""
        return self._first_load_done and not any(s.pending for s in list(self._states.values()))

    def _lookup(self, name: str, version: str | None) -> tuple[ServedModel, ModelStats]:
        state = self._states.get(name)
        served = state.served if state is not None else None
        if served is None or state is None or state.stats is None:
            if not self._first_load_done:
                raise ModelUnavailable("edged is still loading its models")
            if state is not None and state.pending:
                raise ModelUnavailable(f"model {name!r} is still loading")
            if state is not None and state.failure is not None:
                raise ModelUnavailable(state.failure)
            raise ModelNotFound(name)
        if version is not None and version != served.version:
            raise ModelNotFound(name, version, f"the active version is {served.version}")
        return served, state.stats

    def _acquire(self, name: str, version: str | None) -> tuple[ServedModel, ModelStats]:
        while True:  # a swap between lookup and acquire retires the old model: look again
            served, stats = self._lookup(name, version)
            if served.acquire():
                return served, stats

    def _count(self, stats: Counts, field: str) -> None:
        with self._stats_lock:
            setattr(stats, field, getattr(stats, field) + 1)

    # --- loading -----------------------------------------------------------
    def load_all(self) -> None:
        """First load at start-up: every active version in the store."""
        for name in self._active_versions()[0]:
            self._state(name).pending = True
        self.sync()
        self._first_load_done = True

    def sync(self) -> None:
        """Make the served models match the store's active versions."""
        with self._swap_lock:
            wanted, unreadable = self._active_versions()
            now = time.monotonic()
            for name, version in wanted.items():
                state = self._state(name)
                current = state.served
                if current is not None and current.version == version:
                    if state.failed_version not in (None, version):
                        self._clear_failure(state)  # the failed version is no longer wanted
                    if current.retry_at is not None and now >= current.retry_at:
                        current.retry_at = None
                        if not self._load(name, version, reason="retry after fallback"):
                            current.retry_at = now + self.settings.backends.fallback_retry_s
                    continue
                if state.failed_version == version:
                    state.pending = False  # failed once; tried again when another is activated
                    continue
                self._load(name, version, reason="activated")
            for name, state in list(self._states.items()):
                state.drop_removed(self.store.versions)  # a trial load of a version removed since
                if name in wanted or name in unreadable:
                    continue  # a model whose pointer cannot be read keeps serving what it served
                state.pending = False  # removed meanwhile: nothing left to wait for
                if state.served is not None:
                    served, state.served = state.served, None
                    tell(self.events.on_unloaded, Unloaded(name, served.version))
                    served.retire()
                self._clear_failure(state)

    @staticmethod
    def _clear_failure(state: ModelState) -> None:
        state.failure = None
        state.failed_version = None

    def _active_versions(self) -> tuple[dict[str, str], set[str]]:
        """{name: active version}, and the names whose active pointer cannot be read."""
        wanted, unreadable = {}, set()
        for name in self.store.names():
            try:
                version = self.store.active(name)
            except EdgedError as exc:
                self._fail(name, None, str(exc))
                unreadable.add(name)
                continue
            if version is not None:
                wanted[name] = version
        return wanted, unreadable

    def load_options(self, settings: ModelSettings, manifest: Manifest) -> dict[str, LoadOptions]:
        """OpenVINO's cache is kept per content: it tells models apart by path, size and mtime only."""
        b = self.settings.backends
        content = hashlib.sha256(" ".join(f.sha256 for f in manifest.files).encode()).hexdigest()[:16]
        delegate = settings.delegate
        return {
            "openvino": LoadOptions(
                precision=settings.precision, workers=b.workers, threads_per_worker=b.openvino_threads,
                cache_dir=b.openvino_cache_dir / content, performance_hint=b.openvino_performance_hint,
                device=settings.device,
            ),
            "litert": LoadOptions(
                precision=settings.precision, workers=b.workers, threads_per_worker=b.litert_threads,
                delegate=delegate.library if delegate else None,
                delegate_options=dict(delegate.options) if delegate else {},
            ),
        }

    def load_version(self, name: str, version: str, wanted: str | None = None,
             exclude: frozenset[str] = frozenset()) -> tuple[Manifest, LoadedModel, Selection]:
        """Verify and load `version` with this model's settings and backend (or `wanted`),
        recorded against crash loops, without serving it; raises EdgedError."""
        settings, manifest = self.settings.model(name), self.store.verify(name, version)
        options = self.load_options(settings, manifest)
        path = self.store.version_dir(name, version) / manifest.entry
        loaded, selection = select(
            path, manifest.format, wanted or settings.backend, options, self.settings.backends.probe_runs,
            exclude, self.attempts.guard(name, version, settings, options),
        )
        return manifest, loaded, selection

    def adopt(self, name: str, adopted: Adopted) -> None:
        """Serve `adopted.version`, once activated, as this load (an update's tested trial load),
        not loaded and probed again. Another version's earlier adopted load is closed."""
        with self._swap_lock:
            state = self._state(name)
            state.drop_adopted()
            state.adopted = adopted

    def drop_adopted(self, name: str, version: str) -> None:
        """Close `version`'s adopted load, if still waiting (its update stopped before activation)."""
        with self._swap_lock:
            self._state(name).drop_adopted(version)

    def _load(self, name: str, version: str, reason: str, exclude: frozenset[str] = frozenset(),
              why_here: str | None = None) -> bool:
        """Load and swap in; `exclude` (a fallback) sets the retry time and `why_here` the
        reason shown, both before the swap, so no reader sees a half-described model."""
        state = self._state(name)
        try:  # a trial load of this version serves if the store's files are still the ones it loaded
            adopted = None if exclude else state.take_adopted(version, self.store.verify)
            if adopted is not None:
                manifest, loaded, selection = adopted.manifest, adopted.loaded, adopted.selection
            else:
                wanted = "auto" if exclude else None
                manifest, loaded, selection = self.load_version(name, version, wanted, exclude)
        except EdgedError as exc:
            self._fail(name, version, str(exc))
            return False
        except (OSError, ValueError, TypeError) as exc:  # whatever a damaged store throws
            self._fail(name, version, f"{type(exc).__name__}: {exc}")
            return False
        if adopted is not None:  # the tested choice, its probe figures and its reason
            selection = replace(selection, reason=f"{selection.reason}, when its update was tested")
        selection.reason = why_here or selection.reason
        served = ServedModel(manifest, loaded, selection, self.settings.model(name))
        if exclude:
            served.retry_at = time.monotonic() + self.settings.backends.fallback_retry_s
        old = state.served
        if state.stats is None:
            state.stats = ModelStats()
        state.served = served  # the swap: new requests go to the new version from here
        state.pending = False
        self._clear_failure(state)
        log.info("%s %s serving on %s: %s", name, version, selection.label, selection.reason,
                 extra={"MODEL": name, "VERSION": version})
        tell(self.events.on_loaded, Loaded(name, version, reason, old.version if old is not None else None,
                                           selection.backend, selection.reason, selection.device))
        if old is not None:
            old.retire()
        return True

    def _fail(self, name: str, version: str | None, reason: str) -> None:
        state = self._state(name)
        prefix = f"{name} {version}" if version else name
        message = reason if reason.startswith(name) else f"{prefix}: {reason}"
        if state.failure != message:
            log.error("cannot serve %s", message, extra={"MODEL": name, "VERSION": version})
            tell(self.events.on_failed, Failed(name, version, message))
        state.pending = False
        if version is not None:
            state.failed_version = version
        state.failure = message  # a served older version keeps serving meanwhile

    # --- runtime fallback ----------------------------------------------------
    def _on_backend_error(self, served: ServedModel, exc: Exception) -> None:
        served.consecutive_errors += 1
        limit = self.settings.backends.fallback_after_errors
        if served.consecutive_errors == limit and served.settings.backend == "auto":
            threading.Thread(
                target=self._fall_back, args=(served, limit, str(exc)), name=f"fallback-{served.name}",
                daemon=True,
            ).start()

    def _fall_back(self, served: ServedModel, errors: int, error: str) -> None:
        with self._swap_lock:
            state = self._state(served.name)
            if state.served is not served:
                return
            failing = served.selection.label
            log.warning("%s: %s failing (%s); trying another candidate", served.name, failing, error,
                        extra={"MODEL": served.name, "VERSION": served.version})
            if not self._load(served.name, served.version, reason=f"fallback from {failing}",
                              exclude=frozenset({failing}),
                              why_here=f"fallback from {failing} after {errors} errors ({error})"):
                served.consecutive_errors = 0  # no other backend now: try again after as many errors
                return
            new = state.served
            tell(self.events.on_fallback, Fallback(
                served.name, served.version, served.selection.backend, new.selection.backend if new else "?",
                error, served.selection.device, new.selection.device if new else "?"))

    # --- reporting -----------------------------------------------------------
    def status(self) -> dict:
        models = {}
        states = dict(self._states)
        for name, state in states.items():  # served first, then loading, then failed
            if state.served is not None and state.stats is not None:
                models[name] = {"state": "ready", **state.served.describe(), **state.stats.as_dict()}
                if state.failure is not None:  # e.g. a newer version that failed to load
                    models[name]["error"] = state.failure
        for name, state in states.items():
            if name not in models and state.pending:
                models[name] = {"state": "loading"}
        for name, state in states.items():
            if name not in models and state.failure is not None:
                models[name] = {"state": "failed", "error": state.failure}
        for name, why in self.attempts.skipped().items():
            if name in models:
                models[name]["skipped"] = why
        return models

    def close(self) -> None:
        with self._swap_lock:
            for state in self._states.values():
                state.drop_adopted()
                if state.served is not None:
                    state.served.retire()
                    state.served = None
