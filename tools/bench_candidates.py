#!/usr/bin/env python3
"""What each (runtime, device) candidate adds to a model's load at start, side by side.

With `backend = "auto"` every candidate is loaded (compiled) and probed (`probe_runs` warm
runs) before the fastest is kept, so each extra candidate costs its load and probe at every
start. Each configuration below runs in a fresh process, as a start does (plugin loading
and `Core.available_devices` included), with an empty OpenVINO cache ("cold") and then the
cache that run filled ("warm"); the configurations take turns, round after round, so a busy
moment of the machine is shared. Shown: the whole selection, what it adds over OpenVINO on
the CPU alone, and each candidate's own share (`load_ms` in the model's status: load +
probe, or the time to find that it cannot run). On a CPU-only machine the GPU and the
delegate are absent: their figures are the cost of finding that out.

    .venv/bin/python tools/bench_candidates.py [--runs 3] [--probe-runs 30] [--model face] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fetch_models import fetch  # tools/ is sys.path[0] when this script runs

ROOT = Path(__file__).resolve().parent.parent
MISSING_DELEGATE = "/nonexistent/libedgetpu.so.1"

# name -> (backend, device, delegate): what [models.X] would say.
CONFIGURATIONS: dict[str, tuple[str, str | None, str | None]] = {
    "openvino/CPU alone": ("openvino", None, None),
    "auto (today's default)": ("auto", None, None),
    "auto, device = AUTO": ("auto", "AUTO", None),
    "auto, device = HETERO:CPU": ("auto", "HETERO:CPU", None),
    "auto, device = GPU (absent)": ("auto", "GPU", None),
    "auto, delegate absent": ("auto", None, MISSING_DELEGATE),
}

# One start's selection, in a fresh process: prints the total and each candidate's figures.
ONE_START = """
import json, sys, time
from pathlib import Path
start = time.perf_counter()
from edged.backends.base import LoadOptions
from edged.backends.selection import select
path, backend, device, delegate, cache, runs = sys.argv[1:7]
options = {"openvino": LoadOptions(device=device or None, cache_dir=Path(cache)),
           "litert": LoadOptions(delegate=delegate or None)}
imported = time.perf_counter()
model, selection = select(Path(path), "tflite", backend, options, int(runs))
done = time.perf_counter()
model.close()
print(json.dumps({"select_ms": (done - imported) * 1000, "chosen": selection.label,
                  "probes": selection.probes}))
"""


# The device list auto asks OpenVINO for, once per process: every plugin is tried.
LIST_DEVICES = """
import json, time
import openvino as ov
core = ov.Core()
start = time.perf_counter()
devices = core.available_devices
first = time.perf_counter()
core.available_devices
print(json.dumps({"first_ms": (first - start) * 1000, "again_ms": (time.perf_counter() - first) * 1000,
                  "devices": devices}))
"""


def run_python(code: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{args}: exited {result.returncode}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_start(model: Path, config: tuple[str, str | None, str | None], cache: Path, probe_runs: int) -> dict:
    backend, device, delegate = config
    return run_python(ONE_START, str(model), backend, device or "", delegate or "", str(cache),
                      str(probe_runs))


def measure(model: Path, runs: int, probe_runs: int) -> dict[str, dict[str, dict]]:
    """{configuration: {"cold"|"warm": {"select_ms": median, "candidates": {label: median load_ms}}}}"""
    figures: dict[str, dict[str, dict]] = {}
    samples = {name: {"cold": [], "warm": []} for name in CONFIGURATIONS}
    for _ in range(runs):  # round after round (see above)
        for name, config in CONFIGURATIONS.items():
            cache = Path(tempfile.mkdtemp(prefix="edged-bench-cache-"))
            try:
                samples[name]["cold"].append(one_start(model, config, cache, probe_runs))
                samples[name]["warm"].append(one_start(model, config, cache, probe_runs))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    for name in CONFIGURATIONS:
        figures[name] = {}
        for state, runs_of in samples[name].items():
            labels = list(runs_of[0]["probes"])
            figures[name][state] = {
                "select_ms": round(statistics.median(r["select_ms"] for r in runs_of), 1),
                "chosen": runs_of[-1]["chosen"],
                "candidates": {label: {
                    "load_ms": round(statistics.median(r["probes"][label]["load_ms"] for r in runs_of), 1),
                    "failed": "error" in runs_of[0]["probes"][label],
                } for label in labels},
            }
    return figures


def list_devices(runs: int) -> dict:
    samples = [run_python(LIST_DEVICES) for _ in range(runs)]
    return {"devices": samples[0]["devices"],
            "first_ms": round(statistics.median(s["first_ms"] for s in samples), 1),
            "again_ms": round(statistics.median(s["again_ms"] for s in samples), 2)}


def report(figures: dict[str, dict[str, dict]], model: str, runs: int, probe_runs: int) -> None:
    print(f"{model}: selection at start, median of {runs} fresh processes each, {probe_runs} probe runs "
          f"per candidate that loads; ms")
    base = figures["openvino/CPU alone"]
    print(f"{'configuration':30} {'cold':>8} {'+cold':>7} {'warm':>8} {'+warm':>7}  chosen; each candidate "
          "(cold / warm ms)")
    for name, states in figures.items():
        cold, warm = states["cold"], states["warm"]
        parts = []
        for label, candidate in cold["candidates"].items():
            warm_ms = warm["candidates"][label]["load_ms"]
            note = " (failed)" if candidate["failed"] else ""
            parts.append(f"{label}{note} {candidate['load_ms']:g} / {warm_ms:g}")
        print(f"{name:30} {cold['select_ms']:8.1f} {cold['select_ms'] - base['cold']['select_ms']:+7.1f} "
              f"{warm['select_ms']:8.1f} {warm['select_ms'] - base['warm']['select_ms']:+7.1f}  "
              f"{warm['chosen']}; {', '.join(parts)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per configuration (median)")
    parser.add_argument("--probe-runs", type=int, default=30, help="[backends] probe_runs (default 30)")
    parser.add_argument("--model", default="face", help="sample model: face or selfie (default face)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    model = fetch()[args.model]
    figures = measure(model, args.runs, args.probe_runs)
    devices = list_devices(args.runs)
    report(figures, args.model, args.runs, args.probe_runs)
    print(f"Core.available_devices ({', '.join(devices['devices'])}), asked once per process under auto: "
          f"{devices['first_ms']:g} ms the first time, {devices['again_ms']:g} ms after")
    if args.json:
        print(json.dumps({"configurations": figures, "available_devices": devices}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
