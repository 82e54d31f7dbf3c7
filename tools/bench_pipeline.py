#!/usr/bin/env python3
"""Pipeline benchmark: face detection on a 640x480 video file, measured in one run.

Side by side: how fast the video decodes alone, how fast the face model runs alone
(sequentially, as a pipeline calls it), and how fast the whole pipeline goes
(decode -> preprocess -> infer -> decode -> JSONL sink), with per-stage times and
the share of CPU time spent outside inference.
Targets: pipeline fps >= 85% of min(decode fps, model throughput); CPU outside
inference <= 25% of the total.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from fetch_models import ROOT, add_sample, fetch  # tools/ is sys.path[0] when this script runs

sys.path.insert(0, str(ROOT))
from edged.config import load_settings
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.pipelines.preprocess import image_to_tensor
from edged.pipelines.runner import Pipeline


def write_video(path: Path, frames: int) -> None:
    import skimage.data

    portrait = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)[0:300, 100:400]
    face = cv2.resize(portrait, (256, 256))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (640, 480))
    for index in range(frames):
        frame = np.full((480, 640, 3), 90, np.uint8)
        x = 20 + (index * 4) % 360
        frame[100:356, x : x + 256] = face
        writer.write(frame)
    writer.release()


def decode_fps(path: Path) -> float:
    capture = cv2.VideoCapture(str(path))
    count, start = 0, time.perf_counter()
    while capture.read()[0]:
        count += 1
    capture.release()
    return count / (time.perf_counter() - start)


def model_alone(manager: ModelManager, frame: np.ndarray, runs: int) -> tuple[float, float]:
    """Sequential inferences per second, and CPU seconds per inference."""
    served = manager.get("face")
    spec = served.loaded.inputs[0]
    tensor, _ = image_to_tensor(frame, spec.shape, spec.dtype, served.manifest.preprocessing)
    for _ in range(20):
        manager.infer("face", {spec.name: tensor})
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(runs):
        manager.infer("face", {spec.name: tensor})
    return runs / (time.perf_counter() - start), (time.process_time() - cpu) / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=600, help="frames in the test video")
    parser.add_argument("--backend", default="auto", choices=["auto", "openvino", "litert"])
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edged-bench-pipeline-"))
    try:
        video = root / "video.mp4"
        write_video(video, args.frames)
        store = ModelStore(root / "store")
        add_sample(store, "face", fetch()["face"])
        store.activate("face", "1")
        settings = load_settings(None, store={"path": str(store.root)},
                                 backends={"openvino_cache_dir": str(root / "cache")},
                                 models={"face": {"backend": args.backend}},
                                 pipelines={"bench": {"model": "face", "source": {"uri": str(video)},
                                                      "sinks": [{"path": str(root / "out.jsonl")}]}})
        manager = ModelManager(store, settings)
        manager.load_all()
        first = cv2.VideoCapture(str(video)).read()[1]
        fig: dict = {"frames": args.frames, "backend": manager.get("face").selection.backend}
        fig["decode_fps"] = decode_fps(video)
        fig["model_fps"], infer_cpu = model_alone(manager, first, 300)
        pipeline = Pipeline("bench", settings.pipelines["bench"], manager)
        cpu, start = time.process_time(), time.perf_counter()
        pipeline.start()
        while not pipeline.finished:
            time.sleep(0.005)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        pipeline.stop()
        status = pipeline.status()
        fig["pipeline_fps"] = status["processed"] / elapsed
        fig["processed"], fig["dropped"] = status["processed"], status["dropped"]
        fig["stages_ms"] = {k: v["p50_ms"] for k, v in status["latency"].items()}
        fig["decode_ms"] = 1000 / fig["decode_fps"]
        fig["cpu_total_s"] = cpu
        fig["cpu_inference_s"] = infer_cpu * status["processed"]
        fig["cpu_outside_share"] = max(0.0, 1 - fig["cpu_inference_s"] / cpu)
        manager.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bound = min(fig["decode_fps"], fig["model_fps"])
    ratio = fig["pipeline_fps"] / bound
    print(f"face detection on a 640x480 video ({args.frames} frames), backend {fig['backend']}")
    print(f"  video decode alone   {fig['decode_fps']:8.1f} fps  ({fig['decode_ms']:.2f} ms/frame)")
    print(f"  model alone          {fig['model_fps']:8.1f} inf/s")
    print(f"  pipeline             {fig['pipeline_fps']:8.1f} fps  ({fig['processed']} processed, "
          f"{fig['dropped']} dropped)")
    stages = "  ".join(f"{k} {v} ms" for k, v in fig["stages_ms"].items())
    print(f"  per stage (p50)      decode {fig['decode_ms']:.2f} ms  {stages}")
    print(f"  CPU                  {fig['cpu_total_s']:.2f} s in all, {fig['cpu_inference_s']:.2f} s "
          f"in inference: {fig['cpu_outside_share']:.0%} outside")
    print(f"  {'PASS' if ratio >= 0.85 else 'FAIL'}  pipeline / min(decode, model) = {ratio:.2f} >= 0.85")
    print(f"  {'PASS' if fig['cpu_outside_share'] <= 0.25 else 'FAIL'}  CPU outside inference "
          f"{fig['cpu_outside_share']:.0%} <= 25%")
    if args.json:
        print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
