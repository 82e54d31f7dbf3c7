"""Issue 10, side fixes (a) and (c), on the daemon as a real subprocess: a config reload
(SIGHUP) that points a pipeline at a model not in the store, and a camera OpenCV cannot
open, whose own warnings must stay out of the log."""

from __future__ import annotations

import signal

from edged.config import PipelineSettings, SourceSettings
from edged.pipelines.group import Pipelines
from tests.daemon_process import wait_until
from tests.pipelines.test_quality_log import noise, show


def test_a_reload_onto_a_missing_model_shows_the_pipeline_failed(start_daemon, sample_store, tmp_path):
    folder = tmp_path / "camera"
    show(folder, [noise(seed) for seed in range(6)])
    daemon = start_daemon(sample_store.root, config={"pipelines": {"door": {
        "model": "face", "source": {"kind": "images", "uri": str(folder), "loop": True},
    }}})
    with daemon.client() as client:
        def door() -> dict:
            return client.pipelines()["door"]

        wait_until(lambda: door()["state"] == "running" and door()["processed"] > 0, what=daemon.output)
        config = daemon.config_path.read_text()
        daemon.config_path.write_text(config.replace('model = "face"', 'model = "nope"'))
        daemon.proc.send_signal(signal.SIGHUP)  # the fault: a reload onto a model the store lacks
        wait_until(lambda: door()["model"] == "nope" and door()["state"] == "failed", what=daemon.output)
        failed = door()
        daemon.config_path.write_text(config)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: door()["model"] == "face" and door()["state"] == "running", what=daemon.output)
    assert failed["last_error"] == "model 'nope' not found"
    assert "pipeline door: model 'nope' not found" in daemon.output()


def test_opencv_keeps_its_own_warnings_to_itself(start_daemon, tiny_store, monkeypatch):
    monkeypatch.delenv("OPENCV_LOG_LEVEL", raising=False)
    config = {"pipelines": {"usb": {"model": "tiny", "source": {"uri": "9", "reopen_backoff_s": 0.1}}}}
    daemon = start_daemon(tiny_store.root, config=config)  # the fault: /dev/video9 is not there
    with daemon.client() as client:
        wait_until(lambda: client.pipelines()["usb"]["reconnects"] >= 3, what=daemon.output)
    assert "source 9: cannot open 9; reopening" in daemon.output()  # edged's own line, once
    assert daemon.output().count("cannot open 9") == 1
    assert "[ WARN" not in daemon.output() and "VIDEOIO" not in daemon.output()
    daemon.stop()  # it holds the store
    # OpenCV does write them when asked to: the test injects the fault it means to.
    loud = start_daemon(tiny_store.root, config=config, env={"OPENCV_LOG_LEVEL": "WARNING"})
    with loud.client() as client:
        wait_until(lambda: client.pipelines()["usb"]["reconnects"] >= 1, what=loud.output)
    wait_until(lambda: "[ WARN" in loud.output(), what=loud.output)


def test_a_pipeline_started_onto_a_missing_model_counts_as_failed(face_manager, tmp_path, caplog):
    folder = tmp_path / "camera"
    show(folder, [noise(seed) for seed in range(6)])
    source = SourceSettings(kind="images", uri=str(folder), loop=True)
    pipelines = Pipelines({"door": PipelineSettings(model="face", source=source),
                           "yard": PipelineSettings(model="nope", source=source)}, face_manager)
    pipelines.start_enabled()
    try:
        wait_until(lambda: pipelines.status()["door"]["processed"] > 0, what=pipelines.status)
        status, counts = pipelines.status(), pipelines.counts()
    finally:
        pipelines.stop_all()
    assert status["yard"]["state"] == "failed" and status["yard"]["last_error"] == "model 'nope' not found"
    assert counts == (1, 1, 0)
    assert "pipeline yard: model 'nope' not found" in caplog.text
