"""Fixtures for sensor pipelines: a real OpenVINO IR that reads a window of samples, a
store holding it, and a model manager serving that store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edged.config import PipelineSettings, SinkSettings, SourceSettings, load_settings
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.pipelines.runner import Pipeline
from tests.pipelines.sensor_support import build_window_ir


@pytest.fixture(scope="session")
def window_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_window_ir(tmp_path_factory.mktemp("window-ir"))


@pytest.fixture
def window_store(tmp_path: Path, window_ir: Path) -> ModelStore:
    """"win" (the IR with a classification decoder: labels "low" and "high" for channels 0
    and 1) and "winraw" (the same IR, raw outputs), version 1 active."""
    store = ModelStore(tmp_path / "store")
    files = [window_ir, window_ir.with_suffix(".bin")]
    store.add("win", files, "1", labels=["low", "high"], decoder={"type": "classification", "top_k": 1})
    store.add("winraw", files, "1")
    store.activate("win", "1")
    store.activate("winraw", "1")
    return store


@pytest.fixture
def window_manager(window_store: ModelStore, tmp_path: Path) -> Iterator[ModelManager]:
    settings = load_settings(None, store={"path": str(window_store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "ov-cache"), "probe_runs": 2})
    manager = ModelManager(window_store, settings)
    manager.load_all()
    yield manager
    manager.close()


@pytest.fixture
def run_pipeline(window_manager: ModelManager, tmp_path: Path) -> Callable:
    """run_pipeline(source, model="win", **pipeline_keys) -> a started Pipeline writing
    tmp_path/"results.jsonl", stopped when the `with` block ends."""

    @contextmanager
    def run(source: SourceSettings, model: str = "win", **keys) -> Iterator[Pipeline]:
        settings = PipelineSettings(model=model, source=source,
                                    sinks=[SinkSettings(path=tmp_path / "results.jsonl")], **keys)
        pipeline = Pipeline("sensor", settings, window_manager)
        pipeline.start()
        try:
            yield pipeline
        finally:
            pipeline.stop()

    return run



@pytest.fixture
def face_manager(sample_store: ModelStore, tmp_path: Path) -> Iterator[ModelManager]:
    """A model manager serving the sample store (face, selfie, tiny), for picture pipelines."""
    settings = load_settings(None, store={"path": str(sample_store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "ov-cache"), "probe_runs": 2})
    manager = ModelManager(sample_store, settings)
    manager.load_all()
    yield manager
    manager.close()
