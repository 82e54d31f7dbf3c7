"""Serves the active version of every model in the store.

The manager is the one inference service behind every transport: the socket
API, pipelines and MQTT commands all call `infer`. It loads what the store
marks active, swaps versions without failing a request (load and warm the new
one, switch, close the old one when its last request finishes), and moves a
model to another backend when its backend starts failing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from edged.backends.base import LoadedModel, LoadOptions
from edged.backends.faults import run_checked
from edged.backends.selection import Selection, select
from edged.config import ModelSettings, Settings
from edged.errors import BackendError, EdgedError, InputRejected, ModelNotFound, ModelUnavailable
from edged.metrics import Counts, ModelStats
from edged.models.attempts import Attempts
from edged.models.manifest import Manifest
from edged.models.store import ModelStore
from edged.models.validation import validate_inputs

log = logging.getLogger(__name__)
Listener = Callable[[str, dict], None]


class ServedModel:
    """One loaded version, counted in and out so it is closed only when idle."""

    def __init__(
        self, manifest: Manifest, loaded: LoadedModel, selection: Selection, settings: ModelSettings
    ) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.loaded = loaded
        self.selection = selection
        self.settings = settings
        self.loaded_at = time.time()
        self.retry_at: float | None = None  # set after a fallback: when to probe again
        self.consecutive_errors = 0
        self._lock = threading.Lock()
        self._inflight = 0
        self._retired = False

    def acquire(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            close = self._retired and self._inflight == 0
        if close:
            self.loaded.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._inflight == 0
        if close:
            self.loaded.close()

    def describe(self) -> dict:
        return {
            "version": self.version,
            "format": self.manifest.format,
            "sha256": self.manifest.files[0].sha256 if len(self.manifest.files) == 1 else None,
            "loaded_at": self.loaded_at,
            **self.selection.as_dict(),
        }


@dataclass
class InferResult:
    model: ServedModel
    outputs: dict[str, np.ndarray]


class ModelManager:
    def __init__(self, store: ModelStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.failures: dict[str, str] = {}  # model name -> why it cannot be served
        self.stats: dict[str, ModelStats] = {}
        self.listeners: list[Listener] = []
        # Loads recorded on disk: a backend that crashed the process is skipped after a restart.
        self.attempts = Attempts(store, lambda data: self._emit("model_skipped", data))
        self._models: dict[str, ServedModel] = {}
        self._failed_version: dict[str, str] = {}
        self._chosen: dict[tuple[str, str], Selection] = {}  # (name, version) -> tested backend
        self._pending: set[str] = set()
        self._first_load_done = False
        self._swap_lock = threading.RLock()
        self._stats_lock = threading.Lock()

    # --- serving -----------------------------------------------------------
    def infer(
        self, name: str, inputs: dict[str, np.ndarray], version: str | None = None, *, internal: bool = False
    ) -> InferResult:
        """`internal`: the daemon's own inference (a watchdog check, an update's self-test),
        counted apart from client traffic; it runs the same path otherwise."""
        served = self._acquire(name, version)
        try:
            stats = self.stats[name].internal if internal else self.stats[name]
            try:
                checked = validate_inputs(
                    inputs, served.loaded.inputs, reject_non_finite=served.settings.reject_non_finite
                )
            except EdgedError:
                self._count(stats, "rejected")
                raise
            start = time.perf_counter()
            where = f"{name} {served.version} on {served.selection.backend}"
            try:  # a runtime error is judged there: the inputs' fault or the runtime's
                outputs = run_checked(served.loaded, checked, where)
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
        return self._lookup(name, version)

    def served(self) -> dict[str, ServedModel]:
        return dict(self._models)

    def ready(self) -> bool:
        """True once every active model has been loaded or has failed."""
        return self._first_load_done and not self._pending

    def _lookup(self, name: str, version: str | None) -> ServedModel:
        served = self._models.get(name)
        if served is None:
            if not self._first_load_done:
                raise ModelUnavailable("edged is still loading its models")
            if name in self._pending:
                raise ModelUnavailable(f"model {name!r} is still loading")
            if name in self.failures:
                raise ModelUnavailable(self.failures[name])
            raise ModelNotFound(name)
        if version is not None and version != served.version:
            raise ModelNotFound(name, version, f"the active version is {served.version}")
        return served

    def _acquire(self, name: str, version: str | None) -> ServedModel:
        while True:  # a swap between lookup and acquire retires the old model: look again
            served = self._lookup(name, version)
            if served.acquire():
                return served

    def _count(self, stats: Counts, field: str) -> None:
        with self._stats_lock:
            setattr(stats, field, getattr(stats, field) + 1)

    # --- loading -----------------------------------------------------------
    def load_all(self) -> None:
        """First load at start-up: every active version in the store."""
        self._pending = set(self._active_versions()[0])
        self.sync()
        self._first_load_done = True

    def sync(self) -> None:
        """Make the served models match the store's active versions."""
        with self._swap_lock:
            wanted, unreadable = self._active_versions()
            now = time.monotonic()
            for name, version in wanted.items():
                current = self._models.get(name)
                if current is not None and current.version == version:
                    if self._failed_version.get(name) not in (None, version):
                        self._clear_failure(name)  # the failed version is no longer wanted
                    if current.retry_at is not None and now >= current.retry_at:
                        current.retry_at = None
                        if not self._load(name, version, reason="retry after fallback"):
                            current.retry_at = now + self.settings.backends.fallback_retry_s
                    continue
                if self._failed_version.get(name) == version:
                    self._pending.discard(name)  # failed once; tried again when another is activated
                    continue
                self._load(name, version, reason="activated")
            self._pending &= set(wanted)  # removed meanwhile: nothing left to wait for
            # A model whose pointer cannot be read keeps serving what it served.
            for name in set(self._models) - set(wanted) - unreadable:
                self._emit("model_unloaded", {"model": name, "version": self._models[name].version})
                self._models.pop(name).retire()
            for name in set(self.failures) - set(wanted) - unreadable:
                self._clear_failure(name)

    def _clear_failure(self, name: str) -> None:
        self.failures.pop(name, None)
        self._failed_version.pop(name, None)

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

    def load_options(self, settings: ModelSettings) -> dict[str, LoadOptions]:
        b = self.settings.backends
        return {
            "openvino": LoadOptions(
                precision=settings.precision, workers=b.workers,
                threads_per_worker=b.openvino_threads,
                cache_dir=b.openvino_cache_dir, performance_hint=b.openvino_performance_hint,
            ),
            "litert": LoadOptions(
                precision=settings.precision, workers=b.workers, threads_per_worker=b.litert_threads,
            ),
        }

    def adopt_selection(self, name: str, version: str, selection: Selection) -> None:
        """Serve `version`, once activated, on the backend a check already chose and tested
        (an update's self-test), instead of probing again: what was tested is what serves."""
        with self._swap_lock:
            self._chosen = {key: s for key, s in self._chosen.items() if key[0] != name}
            self._chosen[(name, version)] = selection

    def _load(self, name: str, version: str, reason: str, exclude: frozenset[str] = frozenset(),
              why_here: str | None = None) -> bool:
        """Load and swap in; `exclude` (a fallback) sets the retry time and `why_here` the
        reason shown, both before the swap, so no reader sees a half-described model."""
        settings = self.settings.model(name)
        chosen = None if exclude else self._chosen.pop((name, version), None)
        wanted = "auto" if exclude else chosen.backend if chosen else settings.backend
        options = self.load_options(settings)
        try:
            manifest = self.store.verify(name, version)
            path = self.store.version_dir(name, version) / manifest.entry
            loaded, selection = select(
                path, manifest.format, wanted, options, self.settings.backends.probe_runs, exclude,
                self.attempts.guard(name, version, settings, options),
            )
        except EdgedError as exc:
            self._fail(name, version, str(exc))
            return False
        except (OSError, ValueError, TypeError) as exc:  # whatever a damaged store throws
            self._fail(name, version, f"{type(exc).__name__}: {exc}")
            return False
        if chosen is not None:  # the tested choice, its probe figures and its reason
            selection = replace(chosen, precision=selection.precision,
                                reason=f"{chosen.reason}, when its update was tested")
        selection.reason = why_here or selection.reason
        served = ServedModel(manifest, loaded, selection, settings)
        if exclude:
            served.retry_at = time.monotonic() + self.settings.backends.fallback_retry_s
        old = self._models.get(name)
        self.stats.setdefault(name, ModelStats())
        self._models[name] = served  # the swap: new requests go to the new version from here
        self._pending.discard(name)
        self.failures.pop(name, None)
        self._failed_version.pop(name, None)
        log.info("%s %s serving on %s: %s", name, version, selection.backend, selection.reason,
                 extra={"MODEL": name, "VERSION": version})
        self._emit("model_loaded", {"model": name, "version": version, "why": reason,
                                    "previous": old.version if old is not None else None,
                                    "backend": selection.backend, "reason": selection.reason})
        if old is not None:
            old.retire()
        return True

    def _fail(self, name: str, version: str | None, reason: str) -> None:
        prefix = f"{name} {version}" if version else name
        message = reason if reason.startswith(name) else f"{prefix}: {reason}"
        if self.failures.get(name) != message:
            log.error("cannot serve %s", message, extra={"MODEL": name, "VERSION": version})
            self._emit("model_failed", {"model": name, "version": version, "error": message})
        self._pending.discard(name)
        if version is not None:
            self._failed_version[name] = version
        self.failures[name] = message  # a served older version keeps serving meanwhile

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
            if self._models.get(served.name) is not served:
                return
            failing = served.selection.backend
            log.warning("%s: %s failing (%s); trying another backend", served.name, failing, error,
                        extra={"MODEL": served.name, "VERSION": served.version})
            if not self._load(served.name, served.version, reason=f"fallback from {failing}",
                              exclude=frozenset({failing}),
                              why_here=f"fallback from {failing} after {errors} errors ({error})"):
                served.consecutive_errors = 0  # no other backend now: try again after as many errors
                return
            new = self._models[served.name]
            self._emit("backend_fallback", {"model": served.name, "version": served.version,
                                            "from": failing, "to": new.selection.backend, "error": error})

    # --- reporting -----------------------------------------------------------
    def _emit(self, kind: str, data: dict) -> None:
        for listener in self.listeners:
            try:
                listener(kind, data)
            except Exception:  # a listener must never break loading
                log.exception("event listener failed on %s", kind)

    def status(self) -> dict:
        models = {}
        for name, served in self.served().items():
            stats = self.stats.get(name, ModelStats())
            models[name] = {"state": "ready", **served.describe(), **stats.as_dict()}
            if name in self.failures:  # e.g. a newer version that failed to load
                models[name]["error"] = self.failures[name]
        for name in self._pending - set(models):
            models[name] = {"state": "loading"}
        for name, reason in dict(self.failures).items():
            models.setdefault(name, {"state": "failed", "error": reason})
        for name, why in self.attempts.skipped().items():
            if name in models:
                models[name]["skipped"] = why
        return models

    def close(self) -> None:
        with self._swap_lock:
            for served in self._models.values():
                served.retire()
            self._models.clear()
