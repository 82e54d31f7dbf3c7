"""LiteRT (TensorFlow Lite) runtime for .tflite models, on the CPU or through a delegate.

LiteRT comes from `ai-edge-litert`; the older `tflite_runtime` wheel is
accepted when that is what a device has. An interpreter is not thread-safe,
so a model holds a small pool of them, one per concurrent caller, each with a
delegate of its own when the model runs on one (a Coral Edge TPU: libedgetpu.so.1).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter, load_delegate
except ImportError:  # pragma: no cover - depends on what the device has installed
    from tflite_runtime.interpreter import Interpreter, load_delegate  # type: ignore[no-redef]

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


# What LiteRT's external delegate interface asks of a library (external_delegate_interface.h).
DELEGATE_SYMBOLS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")


def check_delegate_library(library: str) -> None:
    """BackendError in one line unless `library` loads and is a LiteRT delegate. Checked
    before LiteRT's own `load_delegate`, whose wrapper raises from its destructor too
    when the library is missing or is not a delegate."""
    try:
        handle = ctypes.CDLL(library)
    except OSError as exc:
        raise BackendError(f"litert: delegate {library} cannot be loaded: {exc}") from None
    missing = [symbol for symbol in DELEGATE_SYMBOLS if not hasattr(handle, symbol)]
    if missing:
        raise BackendError(f"litert: {library} is not a LiteRT delegate (no {', '.join(missing)})")


class _Instance:
    """One interpreter (with its delegate, if any) and its tensor indices looked up once."""

    def __init__(self, content: bytes, threads: int, delegate: tuple[str, Mapping[str, str]] | None) -> None:
        # The delegate must outlive its interpreter: kept with it.
        self.delegates = [_load_delegate(*delegate)] if delegate else []
        self.interpreter = Interpreter(model_content=content, num_threads=threads,
                                       experimental_delegates=self.delegates or None)
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


def _load_delegate(library: str, options: Mapping[str, str]) -> object:
    try:
        return load_delegate(library, dict(options))
    except ValueError as exc:  # the library's own refusal, e.g. no Edge TPU plugged in
        raise BackendError(f"litert: delegate {library} did not start: {first_line(exc)}") from None


class LiteRTModel(LoadedModel):
    backend = "litert"
    precision = "f32"  # LiteRT runs a float model in its own precision; it never downcasts

    def __init__(self, content: bytes, options: LoadOptions, delegate: str | None = None) -> None:
        threads = options.threads_per_worker or 1
        with_delegate = (delegate, options.delegate_options) if delegate else None
        first = _Instance(content, threads, with_delegate)
        self.inputs = _specs(first.input_details)
        self.outputs = _specs(first.output_details)
        if delegate:
            self.device = self.runs_on = delegate
            self.precision = "the delegate's"  # an Edge TPU runs int8, a GPU delegate f16 or f32

        def build() -> _Instance:
            return _Instance(content, threads, with_delegate)

        # One interpreter on a delegate: the accelerator runs one inference at a time, and each
        # interpreter would hold its own copy of the parameters (an Edge TPU caches 8 MB).
        count = 1 if delegate else max(1, options.workers)
        others = [build() for _ in range(count - 1)]
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

    def devices(self, options: LoadOptions, auto: bool) -> list[str]:
        """The delegate when one is configured, and under auto the CPU as well."""
        if options.delegate is None:
            return ["CPU"]
        return [options.delegate, "CPU"] if auto else [options.delegate]

    def load(self, path: Path, model_format: str, options: LoadOptions, device: str = "CPU") -> LoadedModel:
        if model_format not in READS[self.name]:
            raise BackendError(f"litert cannot read {model_format!r} models")
        if device not in ("CPU", options.delegate):
            raise BackendError(f"litert: no delegate {device!r} configured")
        delegate = None if device == "CPU" else device
        if delegate is not None:
            check_delegate_library(delegate)
        try:
            content = path.read_bytes()
            return LiteRTModel(content, options, delegate)
        except (ValueError, RuntimeError) as exc:
            where = f" with {delegate}" if delegate else ""
            raise BackendError(f"litert cannot load {path.name}{where}: {first_line(exc)}") from exc
