"""Pipelines under abuse: overlapping control calls, odd frames, odd names, a vanishing sink."""

from __future__ import annotations

import threading

import numpy as np

from edged.config import PipelineSettings, SinkSettings, SourceSettings, load_settings
from edged.models.manager import ModelManager
from edged.pipelines.group import Pipelines
from edged.pipelines.opencv import as_bgr
from edged.pipelines.sinks.jsonl import JsonlSink
from edged.pipelines.sources.camera import CameraSource
from tests.daemon_process import wait_until
from tests.pipelines.test_pipeline_e2e import write_moving_face_video


def test_overlapping_restarts_leave_exactly_one_pipeline(sample_store, tmp_path):
    video = write_moving_face_video(tmp_path / "v.avi", frames=5)
    settings = load_settings(None, store={"path": str(sample_store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "c"), "probe_runs": 2})
    manager = ModelManager(sample_store, settings)
    manager.load_all()
    pipelines = Pipelines({"p": PipelineSettings(model="face", source=SourceSettings(uri=str(video),
                                                                                     loop=True))}, manager)
    before = threading.active_count()
    pipelines.start_enabled()
    workers = [threading.Thread(target=pipelines.restart, args=("p",)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert list(pipelines.running) == ["p"]
    pipelines.stop_all()
    wait_until(lambda: threading.active_count() <= before)
    manager.close()


def test_grey_and_bgra_frames_become_bgr():
    assert as_bgr(np.zeros((4, 6), np.uint8)).shape == (4, 6, 3)
    assert as_bgr(np.zeros((4, 6, 1), np.uint8)).shape == (4, 6, 3)
    assert as_bgr(np.zeros((4, 6, 4), np.uint8)).shape == (4, 6, 3)


def test_a_name_opencv_refuses_is_reported_not_fatal():
    source = CameraSource(SourceSettings(uri="\u00b2", reopen_backoff_s=0.05))
    source.start()
    try:
        wait_until(lambda: source.reconnects >= 2)
        assert source.state == "reconnecting" and source.last_error.startswith("cannot open")
    finally:
        source.stop()


def test_the_sink_comes_back_when_its_directory_does(tmp_path):
    results = tmp_path / "results"
    sink = JsonlSink(SinkSettings(path=results / "r.jsonl", max_bytes=4096, backups=1))
    sink.write({"n": 0})
    for path in results.iterdir():
        path.unlink()
    results.rmdir()
    try:
        for n in range(200):  # a rotation fails while the directory is gone
            sink.write({"n": n, "pad": "x" * 50})
    except OSError:
        pass
    sink.write({"n": "again"})  # reopens
    sink.close()
    assert (results / "r.jsonl").read_text().splitlines()[-1] == '{"n":"again"}'
