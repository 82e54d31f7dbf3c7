"""OpenVINO runtime: reads IR, ONNX and TFLite, compiles for the CPU.

Precision is always set explicitly: on CPUs with AVX512_BF16, OpenVINO would
otherwise run bf16 and quietly give different numbers than f32.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import openvino as ov

from edged.backends.base import Backend, LoadedModel, LoadOptions, TensorSpec, WarmPool, first_line
from edged.errors import BackendError

PRECISIONS = frozenset({"f32", "bf16", "f16"})  # OpenVINO's own names for them
_core_lock = threading.Lock()
_core: ov.Core | None = None


def _shared_core() -> ov.Core:
    """One Core per process: it owns the plugin and the compiled-model cache."""
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


def _spec(port: ov.Output, index: int, prefix: str) -> TensorSpec:
    try:
        name = port.get_any_name()
    except RuntimeError:
        name = f"{prefix}{index}"
    shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
    dtype = np.dtype(port.get_element_type().to_dtype())
    return TensorSpec(name, shape, dtype)


class OpenVINOModel(LoadedModel):
    backend = "openvino"

    def __init__(self, compiled: ov.CompiledModel, workers: int) -> None:
        self._compiled = compiled
        self.inputs = [_spec(p, i, "input") for i, p in enumerate(compiled.inputs)]
        self.outputs = [_spec(p, i, "output") for i, p in enumerate(compiled.outputs)]
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        optimal = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.num_requests = max(optimal, workers)
        # Each caller thread borrows one infer request; the pool bounds concurrency.
        build = compiled.create_infer_request
        self._requests = WarmPool([build() for _ in range(self.num_requests)], build)
        self._input_index = {spec.name: i for i, spec in enumerate(self.inputs)}
        self._output_names = list(enumerate(spec.name for spec in self.outputs))

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The tensor API directly: OpenVINO's generic `infer(dict)` dispatch costs more
        # Python time than this small model's whole inference.
        # A request that raised is replaced, never reused: see WarmPool.
        with self._requests.borrow() as request:
            for name, array in inputs.items():
                # Zero-copy where the array may be shared; OpenVINO refuses read-only memory.
                tensor = ov.Tensor(array, shared_memory=array.flags.writeable)
                request.set_input_tensor(self._input_index[name], tensor)
            request.infer()
            # Copies: the request's own output memory is reused by its next inference.
            return {name: request.get_output_tensor(i).data.copy() for i, name in self._output_names}

    def close(self) -> None:
        self._requests.drain()
        del self._compiled


class OpenVINOBackend(Backend):
    name = "openvino"

    def load(self, path: Path, model_format: str, options: LoadOptions) -> LoadedModel:
        if options.precision not in PRECISIONS:
            raise BackendError(f"openvino: unsupported precision {options.precision!r}")
        core = _shared_core()
        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": options.precision,
            "PERFORMANCE_HINT": options.performance_hint,
        }
        if options.threads_per_worker > 0:
            config["INFERENCE_NUM_THREADS"] = options.threads_per_worker
        if options.cache_dir is not None:
            options.cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(options.cache_dir)
        try:
            model = core.read_model(str(path))
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise BackendError(f"openvino cannot load {path.name}: {first_line(exc)}") from exc
        return OpenVINOModel(compiled, options.workers)

