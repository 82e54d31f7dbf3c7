"""Input quality: frozen, black and saturated pictures make a pipeline degraded, and it recovers."""

from __future__ import annotations

import numpy as np

from edged.config import QualitySettings
from edged.pipelines.quality import QualityMonitor
from tests.daemon_process import wait_until
from tests.pipelines.test_pipeline_e2e import write_moving_face_video

SETTINGS = QualitySettings(frozen_after_s=5, for_s=2)


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (48, 64, 3), dtype=np.uint8)


def test_a_frozen_picture_is_degraded_until_it_moves():
    monitor = QualityMonitor(SETTINGS)
    still = noise(1)
    assert monitor.check(still, 0.0) == ""
    assert monitor.check(still.copy(), 4.9) == ""
    assert monitor.check(still.copy(), 6.0) == "frozen picture for 6 s"
    assert monitor.check(noise(2), 6.1) == ""


def test_black_and_saturated_frames_after_a_while():
    monitor = QualityMonitor(QualitySettings(frozen_after_s=100, for_s=2))
    black = np.zeros((48, 64, 3), np.uint8)
    assert monitor.check(black, 0.0) == ""
    assert monitor.check(black, 2.5).startswith("black frames for 2 s")
    white = np.full((48, 64, 3), 255, np.uint8)
    assert monitor.check(white, 3.0) == ""
    assert monitor.check(white, 5.5).startswith("saturated frames for 2 s")
    assert monitor.check(noise(3), 6.0) == ""


def test_pipeline_reports_a_frozen_camera(start_daemon, sample_store, tmp_path):
    video = write_moving_face_video(tmp_path / "still.avi", frames=1)  # one frame, looped forever
    daemon = start_daemon(sample_store.root, config={"pipelines": {"still": {
        "model": "face", "source": {"uri": str(video), "loop": True},
        "quality": {"frozen_after_s": 0.5},
    }}})
    with daemon.client() as client:
        wait_until(lambda: client.status()["pipelines"]["still"]["state"] == "degraded", 30,
                   lambda: client.status()["pipelines"]["still"])
        still = client.status()["pipelines"]["still"]
    assert still["degraded_reason"].startswith("frozen picture for")
    assert still["processed"] > 0
