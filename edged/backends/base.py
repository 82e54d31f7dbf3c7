"""The small contract every inference runtime implements.

A backend turns a model file into a `LoadedModel`; a loaded model describes
its tensors, runs one request at a time per caller thread, and is closed once.
Everything else (selection, fallback, hot swap) lives above this line.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (-1 marks a dynamic dimension) and numpy dtype of a tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        return f"{self.name}{list(self.shape)} {self.dtype}"


@dataclass(frozen=True)
class LoadOptions:
    """How a backend should compile a model; filled from the config."""

    precision: str = "f32"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads_per_worker: int = 0  # 0: the runtime decides (LiteRT: 1)
    cache_dir: Path | None = None
    performance_hint: str = "LATENCY"


class LoadedModel(abc.ABC):
    """A model compiled by one backend, safe to call from several threads."""

    backend: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abc.abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request. Inputs are already validated against `inputs`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's memory; no call may follow."""


class Backend(abc.ABC):
    name: str
    formats: frozenset[str]

    @abc.abstractmethod
    def load(self, path: Path, model_format: str, options: LoadOptions) -> LoadedModel:
        """Compile `path`; raise BackendError with the runtime's reason on failure."""
