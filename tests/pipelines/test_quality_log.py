"""Issue 10, case 7 (a degraded camera) and side fix (d): real black, still and moving
frames from an image folder and a video file made with OpenCV here. A degraded state is
logged when it starts, when what is wrong changes kind, and when it ends, however many
seconds its reason counts; a video source that comes back after an outage is not taken
for a frozen picture."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np

from edged.config import PipelineSettings, QualitySettings, SourceSettings
from edged.pipelines.runner import Pipeline
from tests.daemon_process import wait_until

QUALITY_LOGGER = "edged.pipelines.quality"


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (120, 160, 3), dtype=np.uint8)


def show(folder: Path, images: list[np.ndarray]) -> None:
    """Make `folder` hold exactly these images, each file replaced whole (the source loops over it)."""
    folder.mkdir(exist_ok=True)
    for index, image in enumerate(images):
        part = folder / f"{index:03}.part.png"
        cv2.imwrite(str(part), image)
        os.replace(part, folder / f"{index:03}.png")
    for path in folder.glob("*.png"):
        if int(path.stem) >= len(images):
            path.unlink()


def quality_lines(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage().split(" ", 2)[2]) for r in caplog.records
            if r.name == QUALITY_LOGGER]


def test_black_frames_are_logged_once_per_change_of_kind(face_manager, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=QUALITY_LOGGER)
    folder = tmp_path / "camera"
    show(folder, [np.zeros((120, 160, 3), np.uint8)] * 3)  # the fault: a camera showing black
    source = SourceSettings(kind="images", uri=str(folder), loop=True)
    settings = PipelineSettings(model="face", source=source,
                                quality=QualitySettings(for_s=0.2, frozen_after_s=2))
    pipeline = Pipeline("door", settings, face_manager)

    def reason_is(prefix: str) -> bool:
        status = pipeline.status()
        return status["state"] == "degraded" and status["degraded_reason"].startswith(prefix)

    pipeline.start()
    try:
        wait_until(lambda: reason_is("black frames for"), what=pipeline.status)
        # Black is also still: after frozen_after_s the reason gains a second kind; its
        # seconds keep counting (6 different reasons over 5 s, one a second, were 6 lines).
        wait_until(lambda: reason_is("frozen picture for 5 s; black frames for 5 s"), what=pipeline.status)
        show(folder, [noise(seed) for seed in range(6)])  # the camera sees again
        wait_until(lambda: pipeline.status()["state"] == "running", what=pipeline.status)
        status = pipeline.status()
    finally:
        pipeline.stop()
    assert status["degraded_reason"] == "" and status["errors"] == 0
    lines = quality_lines(caplog)
    assert [level for level, _ in lines] == ["WARNING", "WARNING", "INFO"], lines
    assert lines[0][1].startswith("degraded: black frames for ")
    assert lines[1][1].startswith("degraded: frozen picture for ") and "; black frames for " in lines[1][1]
    assert lines[2][1] == "input recovered"


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (160, 120))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def test_a_video_source_back_from_an_outage_is_not_a_frozen_picture(face_manager, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=QUALITY_LOGGER)
    # A moving picture whose last frame is its first: the picture before the outage and the
    # one after it are the same, as for a camera on a still scene that drops off the network.
    still = noise(0)
    video = write_video(tmp_path / "camera.avi", [still, *(noise(seed) for seed in range(1, 9)), still])
    settings = PipelineSettings(model="face", source=SourceSettings(uri=str(video), loop=True, realtime=True,
                                                                    reopen_backoff_s=0.2),
                                quality=QualitySettings(frozen_after_s=1))
    pipeline = Pipeline("door", settings, face_manager)
    pipeline.start()
    try:
        wait_until(lambda: pipeline.processed > 20, what=pipeline.status)
        away = tmp_path / "away.avi"
        os.replace(video, away)  # the fault: the source goes away (at the end of this pass)
        wait_until(lambda: pipeline.status()["state"] == "reconnecting", what=pipeline.status)
        gone_at = time.monotonic()
        wait_until(lambda: time.monotonic() > gone_at + 3 * settings.quality.frozen_after_s)  # a long outage
        processed = pipeline.processed
        os.replace(away, video)  # and comes back, showing what it showed before
        wait_until(lambda: pipeline.processed > processed + 20, what=pipeline.status)
        status = pipeline.status()
    finally:
        pipeline.stop()
    assert status["state"] == "running" and status["reconnects"] >= 1
    assert quality_lines(caplog) == []  # no "frozen picture" for the time it was away
