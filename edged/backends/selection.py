"""Picks the backend for a model by trying it on this device.

`auto` loads the model in every backend that reads its format, times a few
warm runs of each on the same input, keeps the fastest and closes the rest.
The figures and the reason are kept with the model, so `status` can say why
a model runs where it runs. Each backend's load and probe run inside the
caller's `attempt` hook, which records them durably (edged/models/attempts.py)
so that a runtime crashing the whole process is not tried again after a restart.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edged.backends import candidates_for, get_backend
from edged.backends.base import LoadedModel, LoadOptions, TensorSpec
from edged.errors import BackendError

log = logging.getLogger(__name__)

# The packages each backend's runtime comes from, preferred first: their version is part
# of what a crash is remembered with (a new runtime is tried again). Read from the
# installed metadata, so the runtime is not imported to learn it.
RUNTIME_PACKAGES: dict[str, tuple[str, ...]] = {
    "openvino": ("openvino",),
    "litert": ("ai-edge-litert", "tflite-runtime"),
}

# Wraps the load and probe of one backend (the argument): records the attempt before and
# clears it after, or raises BackendSkipped when that combination crashed the process.
Attempt = Callable[[str], AbstractContextManager[object]]

# TEST-ONLY: a backend name. The process aborts (SIGABRT) right before that backend loads
# any model, as a runtime that segfaults would; tests/test_crash_loop.py needs a real
# crash on demand. Never set it on a device.
TEST_CRASH_VARIABLE = "EDGED_TEST_CRASH_BACKEND"


class BackendSkipped(BackendError):
    """A backend not tried, because trying it on this model crashed the process before."""


def runtime_version(backend: str) -> str:
    """The installed package of `backend`'s runtime and its version, e.g. `openvino 2026.4.1`."""
    for package in RUNTIME_PACKAGES.get(backend, ()):
        try:
            return f"{package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _crash_for_tests(backend: str) -> None:
    """The test-only switch above; a no-op unless the variable names `backend`."""
    if os.environ.get(TEST_CRASH_VARIABLE) == backend:
        log.critical("%s=%s: aborting before %s loads (test-only switch)", TEST_CRASH_VARIABLE,
                     backend, backend)
        os.abort()


@dataclass
class Selection:
    backend: str
    reason: str
    precision: str
    probes: dict[str, dict] = field(default_factory=dict)  # backend -> {"p50_ms"} or {"error"}
    ranking: list[str] = field(default_factory=list)  # backends that worked, fastest first

    def as_dict(self) -> dict:
        return {
            "backend": self.backend, "reason": self.reason, "precision": self.precision,
            "probes": self.probes, "ranking": self.ranking,
        }


def probe_input(specs: list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic input that fits `specs` (dynamic dimensions become 1)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if spec.dtype.kind == "f":
            inputs[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            inputs[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            inputs[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return inputs


def time_runs(model: LoadedModel, runs: int) -> float:
    """Median milliseconds of `runs` warm inferences."""
    inputs = probe_input(model.inputs)
    for _ in range(3):
        model.infer(inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.infer(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def select(
    path: Path,
    model_format: str,
    wanted: str,
    options: dict[str, LoadOptions],
    probe_runs: int,
    exclude: frozenset[str] = frozenset(),
    attempt: Attempt | None = None,
) -> tuple[LoadedModel, Selection]:
    """Load `path` on the backend `wanted` ("auto" to measure); raise BackendError if none can.
    `attempt(backend)` wraps each backend's load and probe (see `Attempt`)."""
    names = candidates_for(model_format) if wanted == "auto" else [wanted]
    names = [n for n in names if n not in exclude]
    if not names:
        raise BackendError(f"no backend reads {model_format!r} models" + (
            f" besides {', '.join(sorted(exclude))}" if exclude else ""))
    loaded: dict[str, LoadedModel] = {}
    probes: dict[str, dict] = {}
    for name in names:
        candidate: LoadedModel | None = None
        try:
            with attempt(name) if attempt is not None else nullcontext():
                _crash_for_tests(name)
                candidate = get_backend(name).load(path, model_format, options[name])
                runs = probe_runs if wanted == "auto" else 1
                probes[name] = {"p50_ms": round(time_runs(candidate, runs), 4)}
            loaded[name] = candidate
        except BackendSkipped as exc:
            probes[name] = {"error": str(exc), "skipped": True}
            log.warning("%s: %s skipped: %s", path.name, name, exc)
        except Exception as exc:  # a backend may fail in any way; each is one reason
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            probes[name] = {"error": reason}
            log.info("%s: %s skipped: %s", path.name, name, reason)
            if candidate is not None:
                candidate.close()
    if not loaded:
        reasons = "; ".join(f"{n}{' skipped' if p.get('skipped') else ''}: {p['error']}"
                            for n, p in probes.items())
        raise BackendError(f"no backend can run {path.name} ({reasons})")
    ranking = sorted(loaded, key=lambda n: probes[n]["p50_ms"])
    chosen = ranking[0]
    for name in ranking[1:]:
        loaded.pop(name).close()
    model = loaded[chosen]
    if wanted != "auto":
        reason = f"{chosen} set in config"
    elif len(ranking) == 1:
        failed = [f"{n} {'skipped' if p.get('skipped') else 'failed'}: {p['error']}"
                  for n, p in probes.items() if "error" in p]
        reason = f"only backend able to run it ({'; '.join(failed) or 'no other backend reads it'})"
    else:
        figures = ", ".join(f"{n} {probes[n]['p50_ms']:.3f} ms" for n in ranking)
        reason = f"fastest in probe ({figures})"
    return model, Selection(chosen, reason, model.precision, probes, ranking)
