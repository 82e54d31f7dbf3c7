"""Picks the runtime and device for a model by trying them on this machine.

The candidates are (backend, device) pairs: `auto` takes every backend that reads the
model's format and, for each, every device it may run on here (OpenVINO's
`available_devices`, a configured LiteRT delegate, the CPU); a backend set in the config
takes its configured device alone. Each candidate is loaded, a few warm runs are timed
on the same input, the fastest is kept and the rest closed. A candidate that fails (an
absent device, a delegate that does not load) is one reason and the next is tried. The
figures and reasons are kept with the model, so `status` can say why a model runs
where it runs. Each candidate's load and probe run inside the caller's `attempt` hook,
which records them durably (edged/models/attempts.py) so that a runtime crashing the
whole process is not tried again after a restart; so does each backend's import and
device listing (as the device `LISTING`), since a runtime or a driver can crash there too.
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
from edged.backends.base import LoadedModel, LoadOptions, TensorSpec, first_line
from edged.errors import BackendError

log = logging.getLogger(__name__)

# The packages each backend's runtime comes from, preferred first: their version is part
# of what a crash is remembered with (a new runtime is tried again). Read from the
# installed metadata, so the runtime is not imported to learn it.
RUNTIME_PACKAGES: dict[str, tuple[str, ...]] = {
    "openvino": ("openvino",),
    "litert": ("ai-edge-litert", "tflite-runtime"),
}

# Wraps the load and probe of one backend on one device (the arguments): records the attempt
# before and clears it after, or raises BackendSkipped when that combination crashed the process.
Attempt = Callable[[str, str], AbstractContextManager[object]]

# What `attempt` is given as the device while a backend is imported and lists its devices.
LISTING = "listing devices"

# TEST-ONLY: a backend name. The process aborts (SIGABRT) right before that backend loads
# any model, as a runtime that segfaults would; with `@devices` after the name, right before
# it lists its devices. tests/test_crash_loop.py needs a real crash on demand. Never set it
# on a device.
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


def _crash_for_tests(backend: str, stage: str = "") -> None:
    """The test-only switch above; a no-op unless the variable names `backend` (and `stage`,
    "@devices", when given)."""
    value = os.environ.get(TEST_CRASH_VARIABLE)
    if value == backend + stage:
        log.critical("%s=%s: aborting before %s %s (test-only switch)", TEST_CRASH_VARIABLE, value,
                     backend, "lists its devices" if stage else "loads")
        os.abort()


@dataclass(frozen=True)
class Candidate:
    """One runtime on one device; `device` None when the runtime could not list its devices
    (not installed, say), and `error` then says why."""

    backend: str
    device: str | None = None
    error: str | None = field(default=None, compare=False)
    skipped: bool = field(default=False, compare=False)  # listing its devices crashed the process

    @property
    def label(self) -> str:
        """How status and logs name it: "openvino/GPU", "litert/libedgetpu.so.1"."""
        return self.backend if self.device is None else f"{self.backend}/{self.device}"


@dataclass
class Selection:
    backend: str
    reason: str
    precision: str
    # label -> {"p50_ms", "load_ms"} or {"error", "load_ms"}; "runs_on" where AUTO chose
    probes: dict[str, dict] = field(default_factory=dict)
    ranking: list[str] = field(default_factory=list)  # labels of the candidates that worked, fastest first
    device: str = "CPU"

    @property
    def label(self) -> str:
        return Candidate(self.backend, self.device).label

    @property
    def short(self) -> str:
        """For one-line summaries: the runtime, and the device when it is not the CPU."""
        return self.backend if self.device == "CPU" else self.label

    def as_dict(self) -> dict:
        return {
            "backend": self.backend, "device": self.device, "reason": self.reason,
            "precision": self.precision, "probes": self.probes, "ranking": self.ranking,
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


def candidates(model_format: str, wanted: str, options: dict[str, LoadOptions],
               attempt: Attempt | None = None, exclude: frozenset[str] = frozenset()) -> list[Candidate]:
    """What `select` tries, in the order a tie goes: each backend's devices, backends in
    table order. A backend that cannot be imported, or list its devices, is one candidate
    with no device, so its reason is shown like any other. Importing and listing run inside
    `attempt(backend, LISTING)`: a runtime that crashes the process there is skipped next time."""
    auto = wanted == "auto"
    found = []
    for name in candidates_for(model_format) if auto else [wanted]:
        if name in exclude:
            continue
        try:
            with attempt(name, LISTING) if attempt is not None else nullcontext():
                _crash_for_tests(name, "@devices")
                devices = get_backend(name).devices(options[name], auto)
        except BackendSkipped as exc:
            found.append(Candidate(name, error=str(exc), skipped=True))
            continue
        except Exception as exc:  # a runtime that cannot even list its devices is one reason
            found.append(Candidate(name, error=first_line(exc)))
            continue
        found.extend(Candidate(name, device) for device in devices)
    return found


def select(
    path: Path,
    model_format: str,
    wanted: str,
    options: dict[str, LoadOptions],
    probe_runs: int,
    exclude: frozenset[str] = frozenset(),
    attempt: Attempt | None = None,
) -> tuple[LoadedModel, Selection]:
    """Load `path` on the backend `wanted` ("auto" to measure every candidate); raise
    BackendError if none can. `exclude`: candidate labels (or whole backends) not to try.
    `attempt(backend, device)` wraps each candidate's load and probe (see `Attempt`)."""
    tried = [c for c in candidates(model_format, wanted, options, attempt, exclude)
             if c.label not in exclude]
    if not tried:
        raise BackendError(f"no backend reads {model_format!r} models" + (
            f" besides {', '.join(sorted(exclude))}" if exclude else ""))
    loaded: dict[str, LoadedModel] = {}
    probes: dict[str, dict] = {}
    for candidate in tried:
        probes[candidate.label] = _try(candidate, path, model_format, wanted, options, probe_runs,
                                       attempt, loaded)
    if not loaded:
        reasons = "; ".join(f"{label}{' skipped' if p.get('skipped') else ''}: {p['error']}"
                            for label, p in probes.items())
        raise BackendError(f"no backend can run {path.name} ({reasons})")
    ranking = sorted(loaded, key=lambda label: probes[label]["p50_ms"])
    chosen = ranking[0]
    for label in ranking[1:]:
        loaded.pop(label).close()
    model = loaded[chosen]
    if wanted != "auto":
        reason = f"{chosen} set in config"
    elif len(ranking) == 1:
        failed = [f"{label} {'skipped' if p.get('skipped') else 'failed'}: {p['error']}"
                  for label, p in probes.items() if "error" in p]
        reason = f"only candidate able to run it ({'; '.join(failed) or 'no other backend reads it'})"
    else:
        figures = ", ".join(f"{label} {probes[label]['p50_ms']:.3f} ms" for label in ranking)
        reason = f"fastest in probe ({figures})"
    return model, Selection(model.backend, reason, model.precision, probes, ranking, model.device)


def _try(candidate: Candidate, path: Path, model_format: str, wanted: str,
         options: dict[str, LoadOptions], probe_runs: int, attempt: Attempt | None,
         loaded: dict[str, LoadedModel]) -> dict:
    """Load and probe one candidate; its figures, or its error in one line (also logged)."""
    name, device, label = candidate.backend, candidate.device, candidate.label
    model: LoadedModel | None = None
    start = time.perf_counter()

    def spent() -> float:
        return round((time.perf_counter() - start) * 1000, 1)

    try:
        if device is None:  # it could not list its devices: say why
            error = candidate.error or f"{name} lists no device"
            raise BackendSkipped(error) if candidate.skipped else BackendError(error)
        with attempt(name, device) if attempt is not None else nullcontext():
            _crash_for_tests(name)
            model = get_backend(name).load(path, model_format, options[name], device)
            runs = probe_runs if wanted == "auto" else 1
            figures = {"p50_ms": round(time_runs(model, runs), 4)}
        if model.runs_on != device:
            figures["runs_on"] = model.runs_on
        loaded[label] = model
        return {**figures, "load_ms": spent()}
    except BackendSkipped as exc:
        log.warning("%s: %s skipped: %s", path.name, label, exc)
        return {"error": str(exc), "skipped": True, "load_ms": spent()}
    except Exception as exc:  # a runtime may fail in any way; each is one reason
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        asked = device is not None and device in (options[name].device, options[name].delegate)
        log.log(logging.WARNING if asked else logging.INFO, "%s: %s failed: %s", path.name, label, reason)
        if model is not None:
            model.close()
        return {"error": reason, "load_ms": spent()}
