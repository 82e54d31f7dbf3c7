"""LiteRT (TensorFlow Lite) runtime for .tflite models.

LiteRT comes from `ai-edge-litert`; the older `tflite_runtime` wheel is
accepted when that is what a device has. An interpreter is not thread-safe,
so a model holds a small pool of them, one per concurrent caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - depends on what the device has installed
    from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

from edged.backends import READS
from edged.backends.base import Backend, LoadedModel, LoadOptions, TensorSpec, WarmPool, first_line
from edged.errors import BackendError


def _specs(details: list[dict]) -> list[TensorSpec]:
    specs = []
    for detail in details:
        signature = detail.get("shape_signature", detail["shape"])
        shape = tuple(int(d) for d in signature)
        specs.append(TensorSpec(detail["name"], shape, np.dtype(detail["dtype"])))
    return specs


class _Instance:
    """One interpreter with its tensor indices looked up once."""

    def __init__(self, content: bytes, threads: int) -> None:
        self.interpreter = Interpreter(model_content=content, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input_details = self.interpreter.get_input_details()
        self.output_details = self.interpreter.get_output_details()
        self.input_index = {d["name"]: d["index"] for d in self.input_details}
        self.shapes = {d["name"]: tuple(d["shape"]) for d in self.input_details}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        changed = {name: a.shape for name, a in inputs.items() if self.shapes[name] != a.shape}
        if changed:
            for name, shape in changed.items():
                self.interpreter.resize_tensor_input(self.input_index[name], shape)
            self.interpreter.allocate_tensors()
            self.shapes.update(changed)  # only once the interpreter accepted them
        for name, array in inputs.items():
            self.interpreter.set_tensor(self.input_index[name], array)
        self.interpreter.invoke()
        # get_tensor returns a copy, so the result outlives the next invoke.
        return {d["name"]: self.interpreter.get_tensor(d["index"]) for d in self.output_details}


class LiteRTModel(LoadedModel):
    backend = "litert"
    precision = "f32"  # LiteRT runs a float model in its own precision; it never downcasts

    def __init__(self, content: bytes, options: LoadOptions) -> None:
        threads = options.threads_per_worker or 1
        first = _Instance(content, threads)
        self.inputs = _specs(first.input_details)
        self.outputs = _specs(first.output_details)

        def build() -> _Instance:
            return _Instance(content, threads)

        others = [build() for _ in range(max(1, options.workers) - 1)]
        self._pool = WarmPool([first, *others], build)

    def infer(
        self, inputs: dict[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        # `into` is not used: LiteRT's outputs live in its own arena, the caller copies them.
        # An interpreter that raised is replaced, never reused: see WarmPool.
        with self._pool.borrow() as instance:
            return instance.run(inputs)

    def close(self) -> None:
        self._pool.drain()


class LiteRTBackend(Backend):
    name = "litert"

    def load(self, path: Path, model_format: str, options: LoadOptions) -> LoadedModel:
        if model_format not in READS[self.name]:
            raise BackendError(f"litert cannot read {model_format!r} models")
        try:
            content = path.read_bytes()
            return LiteRTModel(content, options)
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"litert cannot load {path.name}: {first_line(exc)}") from exc
