"""A pipeline in the daemon: a real video file -> face model -> JSONL results."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from tests.daemon_process import wait_until


def write_moving_face_video(path: Path, frames: int = 40) -> Path:
    """A 640x480 MJPEG video: the astronaut's head and shoulders sliding across a grey frame."""
    portrait = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)[0:300, 100:400]
    face = cv2.resize(portrait, (256, 256))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 480))
    assert writer.isOpened()
    for index in range(frames):
        frame = np.full((480, 640, 3), 90, np.uint8)
        x = 20 + index * 8  # moves 320 pixels over the video
        frame[100:356, x : x + 256] = face
        writer.write(frame)
    writer.release()
    return path


def test_video_file_pipeline_writes_face_detections(start_daemon, sample_store, tmp_path):
    video = write_moving_face_video(tmp_path / "door.avi")
    results = tmp_path / "results" / "door.jsonl"
    daemon = start_daemon(sample_store.root, config={"pipelines": {"door": {
        "model": "face",
        "source": {"uri": str(video)},
        "sinks": [{"path": str(results)}],
    }}})
    with daemon.client() as client:
        def status() -> dict:
            code, _, body = client.request("GET", "/v2/edged/pipelines")
            assert code == 200
            return json.loads(bytes(body))["door"]

        def done(door: dict) -> bool:
            return door["state"] == "finished" and door["processed"] + door["dropped"] >= door["frames"] > 0

        wait_until(lambda: done(status()), 60, lambda: (status(), daemon.output()))
        door = status()
    assert door["frames"] == 40 and door["processed"] >= 1
    assert door["errors"] == 0 and door["last_error"] == ""
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == door["processed"]
    frames_seen = [line["frame"] for line in lines]
    assert frames_seen == sorted(frames_seen)
    with_face = [line for line in lines if len(line["detections"]) == 1]
    assert len(with_face) >= 0.9 * len(lines)
    first = with_face[0]
    assert first["pipeline"] == "door" and first["model"] == "face" and first["version"] == "1"
    box = first["detections"][0]["box"]
    assert 0 <= box[0] < 1 and 0 <= box[1] < 1 and 0 < box[2] < 0.5


def test_a_camera_that_is_missing_is_retried_and_harms_nobody(start_daemon, sample_store, tmp_path):
    daemon = start_daemon(sample_store.root, config={"pipelines": {"cam": {
        "model": "face", "source": {"uri": "/dev/video99", "reopen_backoff_s": 0.1},
    }}})
    with daemon.client() as client:
        # "stopped" until the daemon starts it
        wait_until(lambda: client.status()["pipelines"]["cam"].get("reconnects", 0) >= 2, 30,
                   lambda: client.status()["pipelines"]["cam"])
        cam = client.status()["pipelines"]["cam"]
        assert cam["state"] == "reconnecting"
        assert cam["last_error"] == "cannot open /dev/video99"
        assert client.infer("tiny", {"x": np.zeros((1, 4), np.float32)})["y"].shape == (1, 4)


def test_jsonl_sink_rotates_by_size(tmp_path):
    from edged.config import SinkSettings
    from edged.pipelines.sinks.jsonl import JsonlSink

    sink = JsonlSink(SinkSettings(path=tmp_path / "r.jsonl", max_bytes=4096, backups=2))
    for index in range(200):
        sink.write({"frame": index, "pad": "x" * 40})
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert all((tmp_path / name).stat().st_size <= 4096 for name in files)
    last = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert last[-1]["frame"] == 199


def test_pipelines_are_controlled_at_run_time(start_daemon, sample_store, tmp_path):
    import subprocess
    import sys

    video = write_moving_face_video(tmp_path / "loop.avi", frames=10)
    daemon = start_daemon(sample_store.root, config={"pipelines": {
        "loop": {"model": "face", "source": {"uri": str(video), "loop": True}},
        "spare": {"model": "face", "source": {"uri": str(video)}, "enabled": False},
    }})

    def edged(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edged", "pipelines", *args, "--socket",
                               str(daemon.socket)], capture_output=True, text=True, timeout=60)

    with daemon.client() as client:
        # the file opens in the background
        wait_until(lambda: client.pipelines()["loop"]["state"] == "running", 20, "loop running")
    listing = edged("list").stdout.splitlines()
    assert listing[0].split()[:3] == ["loop", "running", "face"]
    assert listing[1].split()[:3] == ["spare", "stopped", "face"]
    assert edged("stop", "loop").stdout.strip() == "pipeline loop: stop done"
    assert json.loads(edged("status", "--json").stdout)["loop"]["state"] == "stopped"
    refused = edged("stop", "loop")
    assert refused.returncode == 1 and "is not running" in refused.stderr
    assert edged("start", "loop").returncode == 0
    assert edged("restart", "loop").returncode == 0
    missing = edged("start", "nosuch")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    with daemon.client() as client:
        wait_until(lambda: client.pipelines()["loop"]["processed"] >= 3, 20, "3 frames processed")
    status = edged("status").stdout
    assert "loop" in status and "infer p50" in status


def test_a_pipeline_that_cannot_start_is_reported_and_others_run(start_daemon, sample_store, tmp_path):
    video = write_moving_face_video(tmp_path / "ok.avi", frames=5)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the sink wants a directory")
    daemon = start_daemon(sample_store.root, config={"pipelines": {
        "broken": {"model": "face", "source": {"uri": str(video)},
                   "sinks": [{"path": str(blocker / "out.jsonl")}]},
        "fine": {"model": "face", "source": {"uri": str(video)}},
    }})
    with daemon.client() as client:
        pipelines = client.pipelines()
    assert pipelines["broken"]["state"] == "failed"
    assert "cannot start" in pipelines["broken"]["last_error"]
    assert pipelines["fine"]["state"] in ("starting", "running", "finished")


def test_an_image_folder_feeds_a_pipeline_and_bad_files_are_skipped(start_daemon, sample_store, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    portrait = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(folder / "a.jpg"), portrait)
    (folder / "b.png").write_bytes(b"not a picture")
    cv2.imwrite(str(folder / "c.png"), cv2.cvtColor(skimage.data.coffee(), cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("ignored")
    results = tmp_path / "shots.jsonl"
    daemon = start_daemon(sample_store.root, config={"pipelines": {"shots": {
        "model": "face", "source": {"kind": "images", "uri": str(folder)},
        "sinks": [{"path": str(results)}],
    }}})
    with daemon.client() as client:
        wait_until(lambda: client.pipelines()["shots"]["state"] == "finished", 30, "shots finished")
        shots = client.pipelines()["shots"]
    assert shots["frames"] == 2 and shots["processed"] == 2
    assert shots["last_error"] == "b.png: not a readable image (skipped)"
    faces = [len(json.loads(line)["detections"]) for line in results.read_text().splitlines()]
    assert faces == [1, 0]  # the astronaut, then the coffee


def test_results_stream_over_the_socket_and_a_slow_reader_slows_nothing(start_daemon, sample_store,
                                                                        tmp_path):
    import socket as socket_module

    video = write_moving_face_video(tmp_path / "s.avi", frames=10)
    daemon = start_daemon(sample_store.root, config={"pipelines": {
        "s": {"model": "face", "source": {"uri": str(video), "loop": True}}}})

    def subscribe() -> socket_module.socket:
        sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(str(daemon.socket))
        sock.sendall(b"GET /v2/edged/pipelines/s/events HTTP/1.1\r\n\r\n")
        return sock

    slow = subscribe()  # never reads
    reader = subscribe()
    data = b""
    while data.count(b'"pipeline":"s"') < 5:
        data += reader.recv(65536)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"Transfer-Encoding: chunked" in head and b"application/x-ndjson" in head
    line = next(part for part in data.split(b"\r\n") if part.startswith(b'{"pipeline"'))
    assert json.loads(line)["model"] == "face"
    with daemon.client() as client:  # the reader that never reads holds nothing up
        before = client.pipelines()["s"]["processed"]
        wait_until(lambda: client.pipelines()["s"]["processed"] >= before + 100, 60,
                   lambda: f"100 more frames processed: {client.pipelines()['s']}")
    reader.close()
    slow.close()
    with daemon.client() as client:
        assert client.request("GET", "/v2/edged/pipelines/nosuch/events")[0] == 404
