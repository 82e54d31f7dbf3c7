"""The small contract every inference runtime implements.

A backend turns a model file into a `LoadedModel`; a loaded model describes
its tensors, runs one request at a time per caller thread, and is closed once.
Everything else (selection, fallback, hot swap) lives above this line.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
log = logging.getLogger(__name__)
# A C++ source location that OpenVINO puts on lines of its own ("... reshape.cpp:77:").
_LOCATION = re.compile(r"\.(?:cpp|hpp|cc|h):\d+:$")


def first_line(exc: BaseException) -> str:
    """The line of a runtime's error that says why, for a caller who gets one line.

    OpenVINO errors are C++ context ("Exception from src/...:224:", "Check '...' failed
    at src/...:77:", "FrontEnd API failed with ...:") narrowing down to the sentence that
    explains, last; LiteRT's are one line. The whole text is for the debug log.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if not (line.startswith(("Exception from", "Check ")) or _LOCATION.search(line)):
            return line
    return lines[-1] if lines else type(exc).__name__


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
    device: str | None = None  # OpenVINO: the configured device; None: CPU, or each one present under auto
    delegate: str | None = None  # LiteRT: a delegate library, one more device to run on
    delegate_options: Mapping[str, str] = field(default_factory=dict)


class WarmPool(Generic[T]):
    """Runtimes (infer requests, interpreters) lent to one caller at a time, last returned first.

    Last-in-first-out keeps a lone caller on one runtime whose memory is still in the
    CPU cache; a FIFO would rotate through all of them (measured: LiteRT 1.9 ms against
    1.3 ms per face inference when requests alternate between two interpreters).

    A runtime that raised is never lent again: `borrow` drops it and builds a fresh one
    with `build`, as what a runtime keeps after an error is unknown (a LiteRT interpreter
    that raised adds its old errors to every later one; OpenVINO's state is shared wider,
    see `OpenVINOModel`). A slot whose rebuild fails stays empty (`None`) and is built
    again when next lent, so a failed rebuild never shrinks the pool.
    """

    def __init__(self, items: list[T], build: Callable[[], T]) -> None:
        self._items: list[T | None] = list(items)
        self._build = build
        self._lock = threading.Lock()
        self._available = threading.Semaphore(len(self._items))

    @contextmanager
    def borrow(self) -> Iterator[T]:
        """Lend one runtime; returned to the pool when the block ends, replaced if it raised."""
        item = self.get()
        try:
            yield item
        except BaseException:
            self._return(self._rebuild())
            raise
        self.put(item)

    def get(self) -> T:
        self._available.acquire()
        with self._lock:
            item = self._items.pop()
        if item is None:  # its rebuild failed earlier: try again for this caller
            try:
                item = self._build()
            except BaseException:
                self._return(None)
                raise
        return item

    def put(self, item: T) -> None:
        self._return(item)

    def _return(self, item: T | None) -> None:
        with self._lock:
            self._items.append(item)
        self._available.release()

    def _rebuild(self) -> T | None:
        try:
            return self._build()
        except Exception as exc:
            log.warning("cannot rebuild a runtime after an error (%s); tried again when lent",
                        first_line(exc))
            log.debug("the rebuild error in full:\n%s", exc)
            return None

    def drain(self) -> list[T]:
        with self._lock:
            items, self._items = self._items, []
        return [item for item in items if item is not None]

    def __len__(self) -> int:
        return len(self._items)


class LoadedModel(abc.ABC):
    """A model compiled by one backend, safe to call from several threads."""

    backend: str
    device: str = "CPU"  # as asked: CPU, GPU, AUTO, a delegate library
    runs_on: str = "CPU"  # what runs it, where the runtime says (AUTO -> CPU)
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abc.abstractmethod
    def infer(
        self, inputs: dict[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request. Inputs are already validated against `inputs`.

        `into`: arrays the caller would like some outputs in (a client's shared memory). A
        runtime that can write there itself does, and returns those very arrays, saving two
        copies of each; one that cannot (or an array that does not fit) returns its own and
        the caller copies. Either way the caller gets outputs by name.

        A runtime error propagates as the runtime raised it, and the runtime that raised
        has been replaced (`WarmPool.borrow`), so no later call sees its state.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime's memory; no call may follow."""


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def devices(self, options: LoadOptions, auto: bool) -> list[str]:
        """The devices to try a model on, preferred first on a tie: what `options` asks for,
        or under `backend = "auto"` (`auto`) every one that may run it here."""

    @abc.abstractmethod
    def load(self, path: Path, model_format: str, options: LoadOptions, device: str = "CPU") -> LoadedModel:
        """Compile `path` for `device` (one of `devices`); raise BackendError with the
        runtime's reason on failure, an absent device included."""
