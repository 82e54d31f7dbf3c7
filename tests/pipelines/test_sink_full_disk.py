"""Issue 10, case 7 (a JSONL results sink on a full disk): a real tmpfs filled to its last
byte (`small_disk`). A sink that cannot write says so once, makes the pipeline `degraded`,
counts what it loses, leaves no cut line in its file, and recovers when space returns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edged.config import PipelineSettings, SinkSettings, SourceSettings
from edged.pipelines.runner import Pipeline
from edged.pipelines.sinks.jsonl import JsonlSink
from tests.daemon_process import wait_until
from tests.pipelines.test_quality_log import noise, show

SINK_LOGGER = "edged.pipelines.sinks.jsonl"


def whole_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, each of which must be whole JSON (ending with a newline)."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def sink_lines(caplog) -> list[str]:
    return [f"{r.levelname} {r.getMessage().split(': ', 2)[2]}" for r in caplog.records
            if r.name == SINK_LOGGER]


def test_a_full_disk_cuts_no_line_and_is_logged_once_per_change(small_disk, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=SINK_LOGGER)
    disk = small_disk(tmp_path / "disk", 1)
    sink = JsonlSink(SinkSettings(path=disk.path / "results.jsonl", max_bytes=1 << 30), "door")
    result = {"detections": [{"box": [0.25, 0.5, 0.125, 0.0625], "score": 0.9}] * 8}
    sink.write({"n": 0, **result})
    disk.fill(leave=0)  # the fault: not a byte left; the file's last page still has some room
    for n in range(1, 301):
        sink.write({"n": n, **result})  # never raises
    lost = sink.failed
    assert 0 < lost <= 300 and sink.problem.endswith("failing: No space left on device")
    disk.free()
    sink.write({"n": 301, **result})
    sink.close()
    numbers = [line["n"] for line in whole_lines(disk.path / "results.jsonl")]
    assert numbers == [*range(301 - lost), 301]  # whole lines only: none cut by the full disk
    assert sink.details() == {"kind": "jsonl", "path": str(disk.path / "results.jsonl"),
                              "written": 302 - lost, "failed": lost, "last_error": "No space left on device"}
    assert sink.problem == ""
    assert sink_lines(caplog) == [
        "WARNING failing, results are lost until it can write: No space left on device",
        f"INFO recovered, writing results again ({lost} lost meanwhile)"]


def test_a_pipeline_whose_sink_fills_its_disk_is_degraded_until_space_returns(
        small_disk, face_manager, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    disk = small_disk(tmp_path / "disk", 1)
    folder = tmp_path / "camera"
    show(folder, [noise(seed) for seed in range(6)])
    results = disk.path / "door.jsonl"
    source = SourceSettings(kind="images", uri=str(folder), loop=True)
    settings = PipelineSettings(model="face", source=source, sinks=[SinkSettings(path=results)])
    pipeline = Pipeline("door", settings, face_manager)
    pipeline.start()
    try:
        wait_until(lambda: pipeline.processed > 10, what=pipeline.status)
        disk.fill(leave=0)  # the fault
        wait_until(lambda: pipeline.status()["sinks"][0]["failed"] >= 300, what=pipeline.status)
        failing = pipeline.status()
        disk.free()
        wait_until(lambda: pipeline.status()["state"] == "running", what=pipeline.status)
        written = pipeline.status()["sinks"][0]["written"]
        wait_until(lambda: pipeline.status()["sinks"][0]["written"] > written + 10, what=pipeline.status)
        status = pipeline.status()
    finally:
        pipeline.stop()
    written = pipeline.sinks[0].details()["written"]  # with what came after the last status
    assert failing["state"] == "degraded"
    assert failing["degraded_reason"] == f"sink {results} failing: No space left on device"
    assert failing["errors"] == 0 and failing["restarts"] == 0
    assert status["state"] == "running" and status["degraded_reason"] == "" and status["errors"] == 0
    sink = status["sinks"][0]
    assert sink["failed"] >= 300 and sink["last_error"] == "No space left on device"
    assert len(whole_lines(results)) == written  # no line cut, none lost but those counted
    assert not [r for r in caplog.records if r.exc_info]  # not one traceback
    assert sink_lines(caplog) == [
        "WARNING failing, results are lost until it can write: No space left on device",
        f"INFO recovered, writing results again ({status['sinks'][0]['failed']} lost meanwhile)"]


def test_frames_are_written_whole_even_with_a_few_bytes_left(small_disk, tmp_path):
    disk = small_disk(tmp_path / "disk", 1)
    sink = JsonlSink(SinkSettings(path=disk.path / "r.jsonl"))
    for leave in (0, 7, 100, 1000, 3000):  # a write the disk cuts short at another place each time
        disk.free()
        sink.write({"leave": leave})
        disk.fill(leave=leave)
        for _ in range(50):
            sink.write({"leave": leave, "pad": "x" * 200, "data": np.arange(20).tolist()})
    disk.free()
    sink.write({"end": True})
    sink.close()
    lines = whole_lines(disk.path / "r.jsonl")
    assert lines[-1] == {"end": True} and len(lines) == sink.written
