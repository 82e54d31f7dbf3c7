"""Cheap inference for simulated devices: one compiled model per process, shared by every
device of that process whose store holds the same files.

Why: a device compiles its model on its own, and OpenVINO keeps its own copy of the
weights per compiled model. Measured here (OpenVINO 2026.4, a 1600 x 1600 float32 MatMul
IR, 10 MB of weights): 21 MiB of resident memory and 0.05 CPU s per compile. 500 devices
loading it each would hold ~10 GiB beside the stores, on a machine other people use. So
the simulator registers `SharedOpenVINO` as the `openvino` entry of edged's backend table
(`edged.backends.BACKENDS`, the one place a backend is chosen) in its worker processes,
and nothing else of edged changes:

- a device's load still goes through its own manager, store verification, backend
  selection, crash-attempt records and probe runs, its update's trial load and self-test;
- the handle it gets shares one `OpenVINOModel` (edged's own class, compiled by edged's
  own `OpenVINOBackend`) per set of file sha256s, read from the store's `manifest.json`
  beside the model, which the store has just verified against the files. Inferences of
  one process's devices take turns on that model's lock;
- `close()` of a handle leaves the shared model open: a process holds at most a few
  versions, never thousands.

Fault injection (`FAULTY_STORES`): the devices whose store root is listed get a runtime
that misbehaves: their compiled model is of a different graph, the same IR with every
output multiplied by 1.5 (`scaled_model`), as a broken CPU kernel or a runtime computing
in the wrong precision would. The store, the files and the release are untouched, so
those devices fail the release's self-test honestly (a release without a self-test would
go unnoticed on them: that is what the self-test is for).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edged.backends.base import Backend, LoadedModel, LoadOptions
from edged.backends.openvino import OpenVINOBackend, OpenVINOModel, _shared_core
from edged.errors import BackendError

FAULTY_STORES: set[Path] = set()  # store roots of the devices whose runtime misbehaves
FAULT_SCALE = 1.5
TARGET = "tools.fleet_sim.shared_model:SharedOpenVINO"


def install() -> None:
    """Make edged's backend table load `openvino` models through the shared wrapper."""
    from edged import backends

    backends.BACKENDS["openvino"] = TARGET


def scaled_model(path: Path, scale: float = FAULT_SCALE):
    """The IR at `path` with each output multiplied by `scale`, its names kept: a multiply
    put between each Result and what it read."""
    from openvino import opset13 as ops

    model = _shared_core().read_model(str(path))
    for result in model.get_results():
        source = result.input_value(0)
        names = source.get_tensor().get_names()
        scaled = ops.multiply(source, ops.constant(np.float32(scale)))
        source.get_tensor().set_names(set())
        scaled.output(0).get_tensor().set_names(names)
        result.input(0).replace_source_output(scaled.output(0))
    model.validate_nodes_and_infer_types()
    return model


class SharedHandle(LoadedModel):
    """One device's view of a shared compiled model."""

    backend = "openvino"

    def __init__(self, shared: OpenVINOModel) -> None:
        self.shared = shared
        self.inputs, self.outputs, self.precision = shared.inputs, shared.outputs, shared.precision

    def infer(
        self, inputs: dict[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        return self.shared.infer(inputs, into)

    def close(self) -> None:
        """The shared model stays for the other devices (see the module's docstring)."""


class SharedOpenVINO(Backend):
    name = "openvino"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple, OpenVINOModel] = {}
        self.compiles = 0

    def devices(self, options: LoadOptions, auto: bool) -> list[str]:
        return ["CPU"]  # simulated devices share one CPU

    def load(self, path: Path, model_format: str, options: LoadOptions, device: str = "CPU") -> LoadedModel:
        files = json.loads((path.parent / "manifest.json").read_bytes())["files"]
        store_root = path.parent.parent.parent.resolve()  # {store}/{name}/{version}/{file}
        faulty = store_root in FAULTY_STORES
        key = (tuple(sorted((f["name"], f["sha256"]) for f in files)), model_format,
               options.precision, faulty)
        with self._lock:  # one compile per key, even when devices load it at once
            shared = self._models.get(key)
            if shared is None:
                shared = self._compile(path, model_format, options, faulty)
                self._models[key] = shared
                self.compiles += 1
        return SharedHandle(shared)

    @staticmethod
    def _compile(path: Path, model_format: str, options: LoadOptions, faulty: bool) -> OpenVINOModel:
        loaded = OpenVINOBackend().load(path, model_format, options)
        if not faulty:
            assert isinstance(loaded, OpenVINOModel)
            return loaded
        loaded.close()
        model = scaled_model(path)
        config = {"INFERENCE_PRECISION_HINT": options.precision, "PERFORMANCE_HINT": options.performance_hint}
        try:
            return OpenVINOModel(lambda: _shared_core().compile_model(model, "CPU", config))
        except RuntimeError as exc:
            raise BackendError(f"openvino cannot load {path.name} (faulty): {exc}") from exc
