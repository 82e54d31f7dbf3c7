"""Inference runtimes behind one interface, chosen by name through one table.

A backend module is imported only when a model asks for it, so a device
without OpenVINO (or without LiteRT) still serves what the other can run, and
says why the missing one was skipped.
"""

from __future__ import annotations

import importlib

from edged.backends.base import Backend, LoadedModel, LoadOptions, TensorSpec
from edged.errors import BackendError

BACKENDS: dict[str, str] = {
    "openvino": "edged.backends.openvino:OpenVINOBackend",
    "litert": "edged.backends.litert:LiteRTBackend",
}

# Which model formats each backend can read, known without importing it.
READS: dict[str, frozenset[str]] = {
    "openvino": frozenset({"openvino", "onnx", "tflite"}),
    "litert": frozenset({"tflite"}),
}

_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """Return the (shared) backend called `name`, or raise BackendError saying why not."""
    if name in _instances:
        return _instances[name]
    target = BACKENDS.get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"{name} backend unavailable: {exc}") from exc
    backend = getattr(module, class_name)()
    _instances[name] = backend
    return backend


def candidates_for(model_format: str) -> list[str]:
    """Backends able to read `model_format`, in the order they are preferred on a tie."""
    return [name for name in BACKENDS if model_format in READS.get(name, ())]


__all__ = [
    "BACKENDS",
    "READS",
    "Backend",
    "LoadOptions",
    "LoadedModel",
    "TensorSpec",
    "candidates_for",
    "get_backend",
]
