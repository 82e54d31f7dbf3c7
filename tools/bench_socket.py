#!/usr/bin/env python3
"""Socket overhead benchmark: the face model in-process against the same model behind `edged run`.

One run gives every figure, raw (edged's backends, the daemon's default LoadOptions) beside socket
(`edged run`, edged.client with binary tensors, 4 client processes for throughput), interleaved so
that drift in machine speed hits both sides of a ratio alike; then idle RSS and warm-cache start time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fetch_models import ROOT, fetch  # tools/ is sys.path[0] when this script runs

from edged.backends import LoadOptions, get_backend
from edged.client import Client
from edged.config import BackendSettings, ModelSettings, Settings
from edged.models.manager import ModelManager
from edged.models.store import ModelStore

sys.path.insert(0, str(ROOT))  # for tests.daemon_process
from tests.daemon_process import DaemonProcess

BACKENDS = ("openvino", "litert")
CLIENTS = 4
TARGETS = {"p50_ratio": 1.5, "throughput_ratio": 0.80, "idle_rss_mb": 200.0, "warm_start_s": 2.0}
WARMUP = 50
BLOCKS = 10  # latency blocks, alternating raw / socket


def face_input() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)}


def latency_ms(calls: dict, requests: int) -> dict[str, dict[str, float]]:
    """p50/p99 in ms of about `requests` sequential calls of each callable, in alternating blocks."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    order = list(calls.items())
    for block in range(BLOCKS):
        for name, call in order if block % 2 == 0 else order[::-1]:
            for _ in range(max(1, requests // BLOCKS)):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    ms = {name: np.percentile(values, [50, 99]) * 1000 for name, values in times.items()}
    return {name: {"p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4)}
            for name, (p50, p99) in ms.items()}


def run_for(call, seconds: float) -> tuple[int, float]:
    """Call back to back for `seconds`: (calls completed, seconds elapsed)."""
    start = time.monotonic()
    deadline, count = start + seconds, 0
    while time.monotonic() < deadline:
        call()
        count += 1
    return count, time.monotonic() - start


def raw_throughput(model, threads: int, seconds: float) -> tuple[float, float]:
    """Inferences/s with `threads` concurrent callers in-process, and process CPU ms per inference."""
    inputs, barrier = face_input(), threading.Barrier(threads, timeout=60)

    def work(_: int) -> tuple[int, float]:
        barrier.wait()
        return run_for(lambda: model.infer(inputs), seconds)

    cpu = time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(work, range(threads)))
    cpu = time.process_time() - cpu
    return sum(c / e for c, e in done), cpu * 1000 / sum(c for c, _ in done)


# --- the daemon ------------------------------------------------------------------------------
class Daemon(DaemonProcess):
    """`edged run` on one store with each named model on its backend (the rest on auto), its
    socket and log in `workdir`; its memory and CPU time read from /proc."""

    def __init__(self, workdir: Path, store: Path, cache: Path, models: dict[str, str],
                 backend_settings: dict | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        settings: dict = {"socket": {"path": str(workdir / "edged.sock")}, "store": {"path": str(store)},
                          "backends": {"openvino_cache_dir": str(cache), **(backend_settings or {})}}
        if models:
            settings["models"] = {name: {"backend": backend} for name, backend in models.items()}
        super().__init__(workdir, settings)

    def memory_mb(self) -> dict[str, float]:
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k[:2] == "Vm"}
        return {"idle_rss_mb": round(kb["VmRSS"] / 1024, 1), "peak_rss_mb": round(kb["VmHWM"] / 1024, 1)}

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def client_worker(socket_path: str, seconds: float, barrier, results) -> None:
    """One client process with its own connection: requests back to back for `seconds`."""
    inputs = face_input()
    with Client(socket_path) as client:
        for _ in range(WARMUP):
            client.infer("face", inputs)
        barrier.wait()
        before = resource.getrusage(resource.RUSAGE_SELF)
        count, elapsed = run_for(lambda: client.infer("face", inputs), seconds)
        after = resource.getrusage(resource.RUSAGE_SELF)
    results.put((count, elapsed, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))


def socket_throughput(daemon: Daemon, seconds: float) -> dict:
    ctx = mp.get_context("spawn")  # never fork a process that has run OpenVINO threads
    barrier, results = ctx.Barrier(CLIENTS + 1, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=client_worker, args=(str(daemon.socket), seconds, barrier, results))
             for _ in range(CLIENTS)]
    try:
        for p in procs:
            p.start()
        barrier.wait()
        daemon_cpu = daemon.cpu_seconds()
        done = [results.get(timeout=seconds + 60) for _ in procs]
        daemon_cpu = daemon.cpu_seconds() - daemon_cpu
    finally:
        for p in procs:
            if p.pid is not None:  # started
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
    count = sum(c for c, _, _ in done)
    return {"throughput": round(sum(c / e for c, e, _ in done), 1), "clients": CLIENTS,
            "daemon_cpu_ms_per_req": round(daemon_cpu * 1000 / count, 3),
            "client_cpu_ms_per_req": round(sum(u for _, _, u in done) * 1000 / count, 3)}


def compare(backend: str, face: Path, options: LoadOptions, daemon: Daemon, args) -> tuple[dict, dict]:
    """Raw and socket figures for one backend, measured side by side."""
    model = get_backend(backend).load(face, "tflite", options)
    try:
        daemon.wait_ready(120)
        inputs = face_input()
        with Client(daemon.socket) as client:
            lat = latency_ms({"raw": lambda: model.infer(inputs),
                              "socket": lambda: client.infer("face", inputs)}, args.requests)
        threads = options.workers  # as many callers as the daemon's clients (LiteRT: one per interpreter)
        before = raw_throughput(model, threads, args.seconds / 2)
        sock = socket_throughput(daemon, args.seconds)
        after = raw_throughput(model, threads, args.seconds / 2)
    finally:
        model.close()
        daemon.stop()
    raw = {"throughput": round((before[0] + after[0]) / 2, 1), "threads": threads,
           "cpu_ms_per_req": round((before[1] + after[1]) / 2, 3)}
    return lat["raw"] | raw, lat["socket"] | sock


def make_store(root: Path, models: dict[str, Path]) -> Path:
    store = ModelStore(root)
    for name, path in models.items():
        store.add(name, [path], "1")
        store.activate(name, "1")
    return root


# --- report ------------------------------------------------------------------------------------
def report(fig: dict) -> None:
    def check(ok: bool, text: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")

    print(f"\nface_detection_short_range.tflite on {os.cpu_count()} CPUs; latency: {fig['requests']} "
          f"sequential requests; throughput: {fig['seconds']} s per phase")
    head = ("backend", "raw p50", "socket p50", "p50 ratio", "raw inf/s", f"sock {CLIENTS}c inf/s",
            "tput ratio")
    print("".join(f"{h:>15}" for h in head))
    for b in BACKENDS:
        raw, sock, ratio = fig["raw"][b], fig["socket"][b], fig["ratios"][b]
        row = (b, f"{raw['p50_ms']:.3f} ms", f"{sock['p50_ms']:.3f} ms", f"{ratio['p50']:.2f}",
               f"{raw['throughput']:.0f}", f"{sock['throughput']:.0f}", f"{ratio['throughput']:.2f}")
        print("".join(f"{c:>15}" for c in row))
    print("\np99 (ms) raw / socket, and CPU ms per inference: raw / daemon / all clients")
    for b in BACKENDS:
        raw, sock = fig["raw"][b], fig["socket"][b]
        print(f"  {b:9} p99 {raw['p99_ms']:.3f} / {sock['p99_ms']:.3f}    cpu {raw['cpu_ms_per_req']:.3f}"
              f" / {sock['daemon_cpu_ms_per_req']:.3f} / {sock['client_cpu_ms_per_req']:.3f}"
              f"    (raw throughput with {raw['threads']} threads)")
    print("\nTargets")
    t, mem, start = TARGETS, fig["memory"], fig["start_s"]
    for b in BACKENDS:
        r = fig["ratios"][b]
        check(r["p50"] <= t["p50_ratio"], f"{b}: socket/raw p50 {r['p50']:.2f} <= {t['p50_ratio']}")
        check(r["throughput"] >= t["throughput_ratio"], f"{b}: socket {CLIENTS}-client/raw throughput "
              f"{r['throughput']:.2f} >= {t['throughput_ratio']}")
    check(mem["idle_rss_mb"] <= t["idle_rss_mb"], f"idle RSS, face + selfie (auto): {mem['idle_rss_mb']:.1f}"
          f" MB <= {t['idle_rss_mb']:.0f} MB (peak {mem['peak_rss_mb']:.1f} MB)")
    check(start["warm"] <= t["warm_start_s"], f"spawn to ready, warm OpenVINO cache: {start['warm']:.2f} s"
          f" <= {t['warm_start_s']:.0f} s (cold cache: {start['cold']:.2f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput phase")
    parser.add_argument("--requests", type=int, default=2000, help="requests per latency phase")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [backends] setting for both sides, e.g. openvino_performance_hint=THROUGHPUT")
    args = parser.parse_args()
    tuned: dict = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            tuned[key] = json.loads(value)
        except ValueError:
            tuned[key] = value
    samples = fetch()
    for key in [k for k in os.environ if k.startswith("EDGED_")]:
        del os.environ[key]  # raw phase and daemons alike run on the plain defaults
    root = Path(tempfile.mkdtemp(prefix="edged-bench-", dir="/tmp"))  # short: socket paths
    daemons: list[Daemon] = []
    fig: dict = {"requests": args.requests, "seconds": args.seconds, "raw": {}, "socket": {}, "ratios": {}}
    try:
        settings = Settings(backends=BackendSettings(openvino_cache_dir=root / "ov-raw", **tuned))
        fig["backends"] = tuned
        options = ModelManager(ModelStore(root / "unused"), settings).load_options(ModelSettings())
        face_store = make_store(root / "store-face", {"face": samples["face"]})
        for b in BACKENDS:
            print(f"face on {b}: raw in-process and through edged run ...", flush=True)
            daemons.append(Daemon(root / f"d-{b}", face_store, root / "ov-face", {"face": b}, tuned))
            raw, sock = compare(b, samples["face"], options[b], daemons[-1], args)
            fig["raw"][b], fig["socket"][b] = raw, sock
            fig["ratios"][b] = {"p50": round(sock["p50_ms"] / raw["p50_ms"], 3),
                                "throughput": round(sock["throughput"] / raw["throughput"], 3)}
        print("edged run with face + selfie: idle RSS, start time ...", flush=True)
        both, fig["start_s"] = make_store(root / "store-both", samples), {}
        for run in ("cold", "warm"):  # the same cache dir: the cold start fills it
            daemons.append(Daemon(root / f"d-{run}", both, root / "ov-both", {}, tuned))
            fig["start_s"][run] = round(daemons[-1].wait_ready(120).ready_s, 3)
            if run == "cold":
                time.sleep(1.0)
                fig["memory"] = daemons[-1].memory_mb()
            daemons[-1].stop()
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    report(fig)
    if args.json:
        print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
