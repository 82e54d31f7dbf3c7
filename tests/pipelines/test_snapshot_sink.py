"""The snapshot sink in a running pipeline: the face detector on the astronaut, real JPEG files,
and real faults (a tmpfs filled to its last byte, remounted read-only)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from edged.config import ConfigError, PipelineSettings, SinkSettings, SourceSettings, load_settings
from edged.pipelines.group import Pipelines
from edged.pipelines.runner import Pipeline
from edged.pipelines.sinks import build_sinks
from edged.pipelines.sinks.snapshot_files import HISTORY_NAME, SnapshotFiles
from tests.daemon_process import wait_until
from tests.pipelines.test_mqtt_pipelines import portrait, write_image

SINK_LOGGER = "edged.pipelines.sinks.snapshot"


def camera(folder: Path) -> SourceSettings:
    """A looping folder: the astronaut's face on grey, then a grey frame with no face."""
    folder.mkdir()
    write_image(folder / "a.png", portrait())
    write_image(folder / "b.png", np.full((480, 640, 3), 90, np.uint8))
    return SourceSettings(kind="images", uri=str(folder), loop=True)


def snapshot_sink(path: Path, **keys: object) -> SinkSettings:
    return SinkSettings(kind="snapshot", path=path, **{"min_interval_s": 0.1, "max_side": 320, **keys})


def decoded(data: bytes) -> np.ndarray:
    picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None, "not a whole JPEG"
    return picture


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != ".filler")


def sink_lines(caplog) -> list[str]:
    return [f"{r.levelname} {r.getMessage().split(': ', 1)[1]}" for r in caplog.records
            if r.name == SINK_LOGGER]


def test_faces_make_annotated_snapshots_a_bounded_history_and_nothing_else(face_manager, tmp_path):
    snaps = tmp_path / "snaps"
    (snaps / "sub").mkdir(parents=True)
    (snaps / ".latest.jpg.x1y2.tmp").write_bytes(b"half a JPEG a crash left")
    settings = PipelineSettings(model="face", source=camera(tmp_path / "camera"), sinks=[
        SinkSettings(path=tmp_path / "all.jsonl"), snapshot_sink(snaps, history=3)])
    pipeline = Pipeline("door", settings, face_manager)
    pipeline.start()
    try:
        assert leftovers(snaps) == []  # what a crash left is removed at start
        wait_until(lambda: pipeline.status()["sinks"][1]["taken"] >= 6, what=pipeline.status)
    finally:
        pipeline.stop()
    status = pipeline.status()
    sink = status["sinks"][1]
    results = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    with_faces = {r["frame"] for r in results if r["detections"]}
    assert 0 < len(with_faces) < len(results)  # the grey frames have no face
    assert sink["taken"] == sink["written"] and sink["failed"] == 0 and sink["last_error"] == ""
    assert sink["taken"] + sink["rate_limited"] == len(with_faces)  # every frame with a face, none without
    assert sink["published"] == 0 and status["state"] != "degraded"
    history = sorted(p for p in snaps.iterdir() if HISTORY_NAME.fullmatch(p.name))
    assert len(history) == 3
    assert {p.name for p in snaps.iterdir()} == {"latest.jpg", "sub", *(p.name for p in history)}
    assert {int(p.stem.rsplit("-", 1)[1]) for p in history} <= with_faces
    newest = (snaps / "latest.jpg").read_bytes()
    assert newest == history[-1].read_bytes() and len(newest) == sink["last_bytes"]
    picture = decoded(newest)
    assert picture.shape == (240, 320, 3)  # 640x480 bounded to 320 on its longer side
    original = cv2.resize(portrait(), (320, 240), interpolation=cv2.INTER_AREA)
    drawn = np.abs(picture.astype(int) - original).max(axis=2) > 60  # what was drawn, beyond JPEG noise
    ys, xs = np.nonzero(drawn)
    assert drawn.mean() > 0.005 and 40 <= xs.min() and xs.max() <= 190 and ys.max() <= 190  # on the face


def test_a_full_disk_costs_snapshots_not_the_pipeline_and_leaves_no_partial_file(
        small_disk, face_manager, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    disk = small_disk(tmp_path / "disk", 1)
    snaps = disk.path / "snaps"
    settings = PipelineSettings(model="face", source=camera(tmp_path / "camera"),
                                sinks=[snapshot_sink(snaps, history=1000)])
    pipeline = Pipeline("door", settings, face_manager)
    pipeline.start()
    try:
        wait_until(lambda: pipeline.status()["sinks"][0]["written"] >= 2, what=pipeline.status)
        disk.fill(leave=0)  # the fault
        wait_until(lambda: pipeline.status()["sinks"][0]["failed"] >= 3, what=pipeline.status)
        failing = pipeline.status()
        kept = decoded((snaps / "latest.jpg").read_bytes())  # the last whole one, still whole
        assert leftovers(snaps) == []
        disk.free()
        wait_until(lambda: pipeline.status()["state"] == "running", what=pipeline.status)
        written = pipeline.status()["sinks"][0]["written"]
        wait_until(lambda: pipeline.status()["sinks"][0]["written"] > written + 2, what=pipeline.status)
        recovered = pipeline.status()
    finally:
        pipeline.stop()
    assert failing["state"] == "degraded" and failing["errors"] == 0 and failing["restarts"] == 0
    assert failing["degraded_reason"] == "snapshot file failing: No space left on device"
    assert failing["sinks"][0]["last_error"] == "No space left on device"
    assert kept.shape == (240, 320, 3) and leftovers(snaps) == []
    assert recovered["degraded_reason"] == "" and recovered["errors"] == 0
    assert not [r for r in caplog.records if r.exc_info]
    assert sink_lines(caplog) == [
        "WARNING snapshot file failing, snapshots are lost until it works: No space left on device",
        "INFO snapshot file works again"]


def test_a_read_only_directory_is_refused_at_start_and_said_when_it_turns_read_only(
        small_disk, face_manager, tmp_path):
    disk = small_disk(tmp_path / "disk", 1)
    (disk.path / "snaps").mkdir()
    settings = PipelineSettings(model="face", source=camera(tmp_path / "camera"),
                                sinks=[snapshot_sink(disk.path / "snaps")])
    disk.read_only()
    group = Pipelines({"door": settings}, face_manager)
    group.start_enabled()
    refused = f"pipeline 'door' cannot start: Read-only file system: {disk.path / 'snaps'}"
    assert group.failures == {"door": refused}
    disk.read_only(False)
    group.start("door")
    try:
        pipeline = group.running["door"]
        wait_until(lambda: pipeline.status()["sinks"][0]["written"] >= 1, what=pipeline.status)
        disk.read_only()  # the fault, while it runs
        wait_until(lambda: pipeline.status()["state"] == "degraded", what=pipeline.status)
        failing = pipeline.status()
        disk.read_only(False)
        wait_until(lambda: pipeline.status()["state"] == "running", what=pipeline.status)
    finally:
        group.stop_all()
    assert failing["degraded_reason"].startswith("snapshot file failing: Read-only file system")
    assert leftovers(disk.path / "snaps") == []


def test_snapshot_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="a sink of kind = 'snapshot' draws on pictures"):
        PipelineSettings(model="m", source=SourceSettings(kind="stdin"), sinks=[snapshot_sink(tmp_path)])
    with pytest.raises(ValueError, match="max_bytes: not for kind = 'snapshot'"):
        SinkSettings(kind="snapshot", path=tmp_path, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="min_interval_s: only for kind = 'snapshot'"):
        SinkSettings(path=tmp_path / "r.jsonl", min_interval_s=5)
    with pytest.raises(ValueError, match="max_jpeg_bytes"):
        SinkSettings(kind="snapshot", path=tmp_path, max_jpeg_bytes=1000)  # under 16 KiB
    both = {"model": "face", "source": {"kind": "images", "uri": str(tmp_path)},
            "sinks": [{"kind": "snapshot", "path": str(tmp_path / "snaps")}]}
    with pytest.raises(ConfigError, match="both keep snapshots in"):
        load_settings(None, pipelines={"a": both, "b": both})
    mqtt_only = {**both, "sinks": [{"kind": "snapshot"}]}
    with pytest.raises(ConfigError, match="a snapshot sink without a path publishes over MQTT only"):
        load_settings(None, pipelines={"a": mqtt_only})
    with pytest.raises(ValueError, match=r"needs a path, or mqtt\.enabled"):
        build_sinks([SinkSettings(kind="snapshot")], "a", None)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        build_sinks([snapshot_sink(tmp_path / "file")], "a", None)
    assert not os.path.exists(tmp_path / "file" / "latest.jpg")


def test_the_directory_keeps_only_latest_without_history_and_prunes_to_a_smaller_history(tmp_path):
    jpegs = [cv2.imencode(".jpg", np.full((64, 64, 3), grey, np.uint8))[1].tobytes()
             for grey in (10, 120, 240)]
    only_latest = SnapshotFiles(tmp_path / "a", history=0)
    for number, jpeg in enumerate(jpegs):
        only_latest.write(jpeg, 1_764_827_112.345 + number, number)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["latest.jpg"]
    assert (tmp_path / "a" / "latest.jpg").read_bytes() == jpegs[-1]
    kept = SnapshotFiles(tmp_path / "b", history=3)
    for number, jpeg in enumerate(jpegs):
        kept.write(jpeg, 1_764_827_112.345 + number, number)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "20251204T054512.345Z-000000.jpg", "20251204T054513.345Z-000001.jpg",
        "20251204T054514.345Z-000002.jpg", "latest.jpg"]
    newest = tmp_path / "b" / "20251204T054514.345Z-000002.jpg"
    assert os.stat(tmp_path / "b" / "latest.jpg").st_ino == os.stat(newest).st_ino  # written once
    SnapshotFiles(tmp_path / "b", history=1)  # restarted with a smaller history: the oldest go
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["20251204T054514.345Z-000002.jpg",
                                                                  "latest.jpg"]
    assert (tmp_path / "b" / "latest.jpg").read_bytes() == jpegs[-1]
