"""OpenVINO runtime: reads IR, ONNX and TFLite, compiles for a device (CPU, GPU, NPU, AUTO, HETERO).

Precision is always set explicitly: on CPUs with AVX512_BF16, OpenVINO would
otherwise run bf16 and quietly give different numbers than f32. It is a property of
each device: AUTO and HETERO are given it per device (DEVICE_PROPERTIES), for those of
their devices that take it, and say what they run in through DEVICE_PROPERTIES too
(the compiled AUTO model does not answer INFERENCE_PRECISION_HINT itself).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import openvino as ov

from edged.backends.base import Backend, LoadedModel, LoadOptions, TensorSpec, first_line
from edged.config.devices import OpenVINODevice, parse_device
from edged.errors import BackendError

PRECISIONS = frozenset({"f32", "bf16", "f16"})  # OpenVINO's own names for them
log = logging.getLogger(__name__)
_core_lock = threading.Lock()
_CANNOT_LOAD = re.compile(r'Cannot load library "[^"]*": (.+)')
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
    """One compiled model and one infer request, used by one caller at a time.

    The CPU plugin runs every infer request of a compiled model on one graph per stream,
    and that graph keeps state between inferences: after an error, a data-dependent node
    (a Reshape whose shape is an input) answers the next identical call with the shape of
    the last good one, whichever infer request makes it (measured on OpenVINO 2026.4; a
    new infer request does not help, a new compiled model does). So an inference holds
    the model's lock, and an error compiles the model afresh (from the compiled-model
    cache: ~50 ms for the face model) before the lock is released: no call ever runs on a
    graph that failed. With the default LATENCY hint there is one stream, so OpenVINO ran
    one inference at a time anyway; with THROUGHPUT, streams no longer run in parallel.
    """

    backend = "openvino"

    def __init__(self, compile_model: Callable[[], ov.CompiledModel], device: str = "CPU") -> None:
        self._compile_model = compile_model
        self.device = device
        self._compiled: ov.CompiledModel | None = None
        self._request: ov.InferRequest | None = None
        self._own_outputs: list[ov.Tensor] = []  # the request's output memory, put back after a caller's
        self._rebuild()
        self._lock = threading.Lock()
        self.inputs = [_spec(p, i, "input") for i, p in enumerate(self._compiled.inputs)]
        self.outputs = [_spec(p, i, "output") for i, p in enumerate(self._compiled.outputs)]
        self.precision = _precision(self._compiled)
        self.runs_on = ",".join(self._compiled.get_property("EXECUTION_DEVICES")) or device
        self._input_index = {spec.name: i for i, spec in enumerate(self.inputs)}
        self._output_names = list(enumerate(spec.name for spec in self.outputs))

    def infer(
        self, inputs: dict[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        # The tensor API directly: OpenVINO's generic `infer(dict)` dispatch costs more
        # Python time than this small model's whole inference.
        with self._lock:
            if self._request is None:  # the rebuild after the last error failed: again
                self._rebuild()
            request = self._request
            placed: dict[int, np.ndarray] = {}
            try:
                for name, array in inputs.items():
                    # Zero-copy where the array may be shared; OpenVINO refuses read-only memory.
                    tensor = ov.Tensor(array, shared_memory=array.flags.writeable)
                    request.set_input_tensor(self._input_index[name], tensor)
                if into:
                    placed = self._place_outputs(request, into)
                request.infer()
                # Copies of the rest: the request's own output memory is reused by its next inference.
                return {name: placed[i] if i in placed else request.get_output_tensor(i).data.copy()
                        for i, name in self._output_names}
            except BaseException:
                self._compiled = self._request = None  # never run on that graph again
                placed = {}
                try:
                    self._rebuild()
                except Exception as exc:
                    log.warning("cannot compile the model again after an error (%s); tried again next call",
                                first_line(exc))
                    log.debug("the compile error in full:\n%s", exc)
                raise
            finally:
                for i in placed:  # the next caller's outputs go to the request's memory again
                    request.set_output_tensor(i, self._own_outputs[i])

    def _place_outputs(
        self, request: ov.InferRequest, into: Mapping[str, np.ndarray]
    ) -> dict[int, np.ndarray]:
        """Point the request's outputs at the caller's arrays that fit them exactly (static
        shape, dtype, contiguous, writable): the runtime then writes there, no copy after."""
        placed = {}
        for i, spec in enumerate(self.outputs):
            array = into.get(spec.name)
            if (array is not None and array.shape == spec.shape and array.dtype == spec.dtype
                    and array.flags.c_contiguous and array.flags.writeable):
                request.set_output_tensor(i, ov.Tensor(array, shared_memory=True))
                placed[i] = array
        return placed

    def _rebuild(self) -> None:
        self._compiled = self._compile_model()
        self._request = self._compiled.create_infer_request()
        self._own_outputs = [self._request.get_output_tensor(i) for i in range(len(self._compiled.outputs))]

    def close(self) -> None:
        with self._lock:
            self._compiled = self._request = None


def _precision(compiled: ov.CompiledModel) -> str:
    """What the compiled model computes in: "f32", or per device ("CPU f32, GPU f16")."""
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    except RuntimeError:  # AUTO, HETERO: each device has its own
        pass
    per_device = {}
    for name, properties in compiled.get_property("DEVICE_PROPERTIES").items():
        hint = properties.get("INFERENCE_PRECISION_HINT")
        if hint is not None:
            per_device[name] = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    if len(set(per_device.values())) == 1:
        return next(iter(per_device.values()))
    return ", ".join(f"{name} {hint}" for name, hint in per_device.items()) or "unknown"


def _present(wanted: str, available: list[str]) -> bool:
    """Whether the physical device `wanted` (GPU, GPU.1) is among `available`, where a lone
    GPU is listed as "GPU" and several as "GPU.0", "GPU.1"."""
    base, _, index = wanted.partition(".")
    if index:
        return wanted in available or (index == "0" and base in available)
    return any(name.partition(".")[0] == base for name in available)


def _plugin_problems(core: ov.Core, absent: list[str]) -> list[str]:
    """Why the plugin of each absent device kind did not load, if it did not: a GPU plugin
    without an OpenCL runtime (libOpenCL.so.1) tells nothing from a machine without a GPU."""
    problems = []
    for kind in dict.fromkeys(name.partition(".")[0] for name in absent):
        try:
            core.get_versions(kind)
        except RuntimeError as exc:
            why = first_line(exc)
            loading = _CANNOT_LOAD.search(why)
            problems.append(f"its {kind} plugin does not load: {loading[1] if loading else why}")
    return problems


class OpenVINOBackend(Backend):
    name = "openvino"

    def devices(self, options: LoadOptions, auto: bool) -> list[str]:
        if options.device is not None:
            return [options.device]
        if not auto:
            return ["CPU"]
        available = list(_shared_core().available_devices)  # CPU first: the tie goes to it
        return sorted(available, key=lambda name: (name != "CPU", available.index(name)))

    def load(self, path: Path, model_format: str, options: LoadOptions, device: str = "CPU") -> LoadedModel:
        if options.precision not in PRECISIONS:
            raise BackendError(f"openvino: unsupported precision {options.precision!r}")
        core = _shared_core()
        try:
            target = self._target(core, parse_device(device))
        except ValueError as exc:
            raise BackendError(f"openvino: {device}: {exc}") from None
        config = self._config(core, target, options)
        if options.cache_dir is not None:
            options.cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(options.cache_dir)

        def compile_model() -> ov.CompiledModel:
            # From the path, so that a compile after an error finds the cache entry.
            return core.compile_model(str(path), target.text, config)

        try:
            return OpenVINOModel(compile_model, device)
        except RuntimeError as exc:
            raise BackendError(f"openvino cannot load {path.name} on {device}: {first_line(exc)}") from exc

    @staticmethod
    def _target(core: ov.Core, device: OpenVINODevice) -> OpenVINODevice:
        """`device` if what it names is present; AUTO keeps those of its list that are (AUTO
        is for "the best of what is here"); else BackendError in one line. OpenVINO's own
        error for an absent GPU is a plugin library failing to load (libOpenCL.so.1 missing)."""
        available = list(core.available_devices)
        absent = [name for name in device.devices if not _present(name, available)]
        if not absent:
            return device
        here = f"OpenVINO finds {', '.join(available) or 'no device'} on this machine"
        here += "".join(f"; {problem}" for problem in _plugin_problems(core, absent))
        kept = [name for name in device.devices if name not in absent]
        if device.kind == "AUTO" and kept:
            log.info("%s: %s not present, AUTO chooses among %s (%s)", device.text, ", ".join(absent),
                     ", ".join(kept), here)
            return OpenVINODevice(f"AUTO:{','.join(kept)}", "AUTO", tuple(kept))
        what = "device" if len(absent) == 1 else "devices"
        raise BackendError(f"openvino: {what} {', '.join(absent)} of {device.text} not present ({here})"
                           if device.virtual else f"openvino: device {device.text} not present ({here})")

    @staticmethod
    def _config(core: ov.Core, device: OpenVINODevice, options: LoadOptions) -> dict[str, object]:
        """The compile properties: the precision and threads for each device that takes them
        (a physical device directly, AUTO and HETERO through DEVICE_PROPERTIES)."""
        config: dict[str, object] = {"PERFORMANCE_HINT": options.performance_hint}
        per_device: dict[str, dict[str, object]] = {}
        for name in device.devices or tuple(core.available_devices):
            try:
                supported = core.get_property(name, "SUPPORTED_PROPERTIES")
            except RuntimeError:  # a plugin that cannot say: compiled with its own defaults
                supported = {}
            properties: dict[str, object] = {}
            if "INFERENCE_PRECISION_HINT" in supported:
                properties["INFERENCE_PRECISION_HINT"] = options.precision
            if options.threads_per_worker > 0 and "INFERENCE_NUM_THREADS" in supported:
                properties["INFERENCE_NUM_THREADS"] = options.threads_per_worker
            per_device[name] = properties
        if not device.virtual:
            return {**per_device[device.text], **config}
        if device.kind == "AUTO":  # the probe times the device AUTO chose, not the CPU standing in
            config["ENABLE_STARTUP_FALLBACK"] = False
        config["DEVICE_PROPERTIES"] = {name: props for name, props in per_device.items() if props}
        return config
