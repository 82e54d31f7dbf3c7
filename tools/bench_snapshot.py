#!/usr/bin/env python3
"""Snapshot benchmark: the snapshot sink's CPU per annotated frame against the pipeline's CPU
per frame, side by side in one run, for the face detector and the selfie segmenter.

For each model, on a 640x480 video of the astronaut's head moving across a grey frame:
  pipeline alone      the pipeline with a JSONL sink only: process CPU per frame
  with snapshots      the same pipeline and a snapshot sink (min_interval_s 0.1, history 10):
                      process CPU per frame, and the sink's own CPU (the worker thread's
                      `thread_time` inside `write_frame`) per snapshot taken and per frame
                      it only looked at (nothing detected, or within the interval)
  one snapshot        annotate, encode and write alone on one decoded frame, repeated:
                      CPU per step (`process_time`; fsync's wait is not CPU)
The snapshot directory is a temporary one unless `--dir` names one (put it on the disk the
device will use: an SD card's fsync takes longer, though not more CPU).
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
from bench_pipeline import write_video
from fetch_models import ROOT, add_sample, fetch  # tools/ is sys.path[0] when this script runs

sys.path.insert(0, str(ROOT))
from edged.config import load_settings
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.pipelines.annotate import Seen, annotate, encode_jpeg
from edged.pipelines.decoders import build_decoder
from edged.pipelines.preprocess import Preprocessing, image_to_tensor
from edged.pipelines.runner import Pipeline
from edged.pipelines.sinks.snapshot import SnapshotSink
from edged.pipelines.sinks.snapshot_files import SnapshotFiles


def run_pipeline(manager: ModelManager, settings, frames: int) -> tuple[Pipeline, float, float]:
    """Play the video through a pipeline; (the stopped pipeline, process CPU seconds, seconds)."""
    pipeline = Pipeline("bench", settings, manager)
    snapshot = next((s for s in pipeline.sinks if isinstance(s, SnapshotSink)), None)
    if snapshot is not None:  # the sink's own CPU, measured on the thread that calls it
        write_frame = snapshot.write_frame
        snapshot.cpu = {"taken": 0.0, "looked": 0.0}

        def timed(result: dict, seen: Seen) -> None:
            before, start = snapshot.taken, time.thread_time()
            write_frame(result, seen)
            snapshot.cpu["taken" if snapshot.taken > before else "looked"] += time.thread_time() - start

        snapshot.write_frame = timed  # looked up on the instance at every call
    cpu, start = time.process_time(), time.perf_counter()
    pipeline.start()
    while not pipeline.finished:
        time.sleep(0.001 if pipeline.processed >= frames - 30 else 0.02)
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - start
    pipeline.stop()
    return pipeline, cpu, elapsed


def one_snapshot(manager: ModelManager, model: str, frame: np.ndarray, directory: Path, runs: int) -> dict:
    """CPU per step of one snapshot, on one frame, outside any pipeline."""
    served = manager.get(model)
    spec = served.loaded.inputs[0]
    decoder = build_decoder(served.manifest.decoder, served.manifest.labels)
    tensor, placement = image_to_tensor(frame, spec.shape, spec.dtype,
                                        Preprocessing.parse(served.manifest.preprocessing))
    outputs = manager.infer(model, {spec.name: tensor}).outputs
    result = decoder.decode(outputs, placement, frame.shape[1], frame.shape[0])
    seen = Seen(frame, outputs, placement, decoder)
    files = SnapshotFiles(directory, 10)
    steps = {"annotate": 0.0, "encode": 0.0, "write": 0.0}
    size = 0
    for number in range(runs):
        start = time.process_time()
        picture = annotate(result, seen, 1280)
        drawn = time.process_time()
        jpeg = encode_jpeg(picture, 85, 512 << 10)
        encoded = time.process_time()
        files.write(jpeg, time.time(), number)
        steps["annotate"] += drawn - start
        steps["encode"] += encoded - drawn
        steps["write"] += time.process_time() - encoded
        size = len(jpeg)
    return {step: 1000 * cpu / runs for step, cpu in steps.items()} | {"jpeg_bytes": size}


def bench(model: str, root: Path, snaps: Path, manager: ModelManager, video: Path, frames: int,
          runs: int, rounds: int) -> dict:
    source = {"uri": str(video)}
    base = load_settings(None, pipelines={"plain": {
        "model": model, "source": source, "sinks": [{"path": str(root / f"{model}.jsonl")}]}}).pipelines
    with_snaps = load_settings(None, pipelines={"snap": {"model": model, "source": source, "sinks": [
        {"path": str(root / f"{model}-snap.jsonl")},
        {"kind": "snapshot", "path": str(snaps / model), "min_interval_s": 0.1, "history": 10}]}}).pipelines
    run_pipeline(manager, base["plain"], frames)  # warm-up: first calls, caches, the OS's page cache
    plain = {"cpu": 0.0, "s": 0.0, "frames": 0}
    snap = {"cpu": 0.0, "s": 0.0, "frames": 0, "taken": 0, "rate_limited": 0, "taken_cpu": 0.0,
            "looked_cpu": 0.0}
    for _ in range(rounds):  # alternately, so a machine that gets busier moves both alike
        pipeline, cpu, elapsed = run_pipeline(manager, base["plain"], frames)
        plain["cpu"], plain["s"], plain["frames"] = (plain["cpu"] + cpu, plain["s"] + elapsed,
                                                     plain["frames"] + pipeline.processed)
        pipeline, cpu, elapsed = run_pipeline(manager, with_snaps["snap"], frames)
        sink = pipeline.sinks[1]
        snap["cpu"], snap["s"], snap["frames"] = (snap["cpu"] + cpu, snap["s"] + elapsed,
                                                  snap["frames"] + pipeline.processed)
        snap["taken"] += sink.taken
        snap["rate_limited"] += sink.rate_limited
        snap["taken_cpu"] += sink.cpu["taken"]
        snap["looked_cpu"] += sink.cpu["looked"]
    looked = snap["frames"] - snap["taken"]
    first = cv2.VideoCapture(str(video)).read()[1]
    return {
        "model": model, "rounds": rounds,
        "pipeline_cpu_per_frame_ms": 1000 * plain["cpu"] / plain["frames"],
        "pipeline_fps": plain["frames"] / plain["s"],
        "with_snapshots_cpu_per_frame_ms": 1000 * snap["cpu"] / snap["frames"],
        "with_snapshots_fps": snap["frames"] / snap["s"],
        "frames": snap["frames"], "snapshots": snap["taken"], "rate_limited": snap["rate_limited"],
        "sink_cpu_per_snapshot_ms": 1000 * snap["taken_cpu"] / max(snap["taken"], 1),
        "sink_cpu_per_other_frame_ms": 1000 * snap["looked_cpu"] / max(looked, 1),
        "sink_cpu_per_frame_ms": 1000 * (snap["taken_cpu"] + snap["looked_cpu"]) / snap["frames"],
        "one_snapshot_ms": one_snapshot(manager, model, first, snaps / f"{model}-alone", runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=600, help="frames in the test video")
    parser.add_argument("--runs", type=int, default=100, help="snapshots taken alone, per model")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each pipeline, alternately")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where snapshots are written (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edged-bench-snapshot-"))
    snaps = args.dir or root / "snaps"
    figures = []
    try:
        video = root / "video.mp4"
        write_video(video, args.frames)
        store = ModelStore(root / "store")
        models = fetch()
        for name in ("face", "selfie"):
            add_sample(store, name, models[name])
            store.activate(name, "1")
        settings = load_settings(None, store={"path": str(store.root)},
                                 backends={"openvino_cache_dir": str(root / "cache")})
        manager = ModelManager(store, settings)
        manager.load_all()
        figures = [bench(model, root, snaps, manager, video, args.frames, args.runs, args.rounds)
                   for model in ("face", "selfie")]
        manager.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.dir is not None:
            for model in ("face", "selfie"):
                for sub in (model, f"{model}-alone"):
                    shutil.rmtree(args.dir / sub, ignore_errors=True)
    print(f"snapshots of a 640x480 video ({args.frames} frames, {args.rounds} rounds of each pipeline), "
          f"written to {args.dir or 'a temp dir'}")
    for f in figures:
        one = f["one_snapshot_ms"]
        per_snapshot = one["annotate"] + one["encode"] + one["write"]
        print(f"  {f['model']}")
        print(f"    pipeline alone        {f['pipeline_cpu_per_frame_ms']:7.3f} ms CPU per frame "
              f"({f['pipeline_fps']:.0f} fps)")
        print(f"    with snapshots        {f['with_snapshots_cpu_per_frame_ms']:7.3f} ms CPU per frame "
              f"({f['with_snapshots_fps']:.0f} fps; {f['snapshots']} snapshots of {f['frames']} frames, "
              f"{f['rate_limited']} within min_interval_s)")
        print(f"    snapshot sink         {f['sink_cpu_per_snapshot_ms']:7.3f} ms CPU per snapshot taken, "
              f"{f['sink_cpu_per_other_frame_ms']:.4f} ms per other frame, "
              f"{f['sink_cpu_per_frame_ms']:.3f} ms per frame on average")
        print(f"    one snapshot alone    {per_snapshot:7.3f} ms CPU: annotate {one['annotate']:.3f}, "
              f"encode {one['encode']:.3f}, write {one['write']:.3f} ({one['jpeg_bytes']} bytes)")
        print(f"    => a snapshot costs {per_snapshot / f['pipeline_cpu_per_frame_ms']:.1f} frames' CPU; "
              f"at one a second and {f['pipeline_fps']:.0f} fps, "
              f"{per_snapshot / (f['pipeline_cpu_per_frame_ms'] * max(f['pipeline_fps'], 1)):.1%} more CPU")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
