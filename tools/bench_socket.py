#!/usr/bin/env python3
"""Socket benchmark: models in-process against the same models behind `edged run`, over binary
HTTP and over system shared memory, with the daemon's CPU per request read from /proc.

For each model (face, pose, and a 1080p uint8 frame model built here: a resize and a small
convolution), one run gives, side by side:
- p50/p99 of sequential calls, in alternating blocks (raw, binary HTTP, shared memory), so
  that drift in the machine's speed hits every side of a ratio alike;
- CPU per request: the raw runtime's (this process, during the raw blocks) and the daemon's
  (its threads' run time from /proc/<pid>/task/*/schedstat, in ns, during the socket blocks);
  their difference is the daemon's overhead, which stays meaningful on a noisy 2-core machine
  where wall time does not;
- what that overhead is made of: the raw runtime paced as a client paces the daemon (idle for
  the time a request spends outside the runtime, between inferences: what waking costs it,
  OpenVINO's threads spinning included), the raw CPU spread between blocks (the noise a
  figure is read against), and two floors taken on the server's side: a bare Python server
  (one recv, one fixed reply) and edged's cheapest route (GET /v2/health/live);
- throughput with 4 clients: 4 threads in-process, and 4 client processes over each path.
Shared memory, two ways: a /dev/shm region (Triton's extension: the daemon reads it with one
kernel copy) and a sealed memfd passed over the socket (edged's: mapped, read and written in
place). Each client writes its input there once, as a camera process that decodes frames
into it would, and reads outputs where the daemon wrote them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fetch_models import ROOT, fetch  # tools/ is sys.path[0] when this script runs

from edged.api.tensors import ShmRef, ShmTensor
from edged.backends import get_backend
from edged.client import Client
from edged.config import BackendSettings, ModelSettings, Settings
from edged.models.manager import ModelManager
from edged.models.store import ModelStore

sys.path.insert(0, str(ROOT))  # for tests.daemon_process
from tests.daemon_process import DaemonProcess

MODELS = ("face", "pose", "frame")
PATHS = ("raw", "http", "shm", "memfd")
CLIENTS = 4
WARMUP = 30
BLOCKS = 12  # latency blocks, rotating raw / http / shm / memfd
TARGETS = {"http_overhead_ms": 0.15, "shm_overhead_ms": 0.05, "pose_shm_p50_ratio": 1.2,
           "frame_shm_p50_ratio": 1.2}


def build_frame_ir(directory: Path) -> Path:
    """A 1080p camera frame model: uint8 [1, 1080, 1920, 3] -> float, resized to 270x480,
    then a 3x3 convolution to 8 channels and a ReLU (6.2 MB in, 4.1 MB out)."""
    import openvino as ov
    from openvino import opset13 as ops

    frame = ops.parameter([1, 1080, 1920, 3], np.uint8, name="frame")
    x = ops.transpose(ops.convert(frame, np.float32), np.array([0, 3, 1, 2], np.int64))
    x = ops.interpolate(x, np.array([270, 480], np.int64), "linear", "sizes",
                        axes=np.array([2, 3], np.int64))
    weights = np.random.default_rng(0).normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32)
    y = ops.relu(ops.convolution(x, weights, [1, 1], [1, 1], [1, 1], [1, 1]))
    y.output(0).get_tensor().set_names({"features"})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "frame.xml"
    ov.save_model(ov.Model([y], [frame], "frame"), str(path), compress_to_fp16=False)
    return path


def model_input(name: str, spec) -> np.ndarray:
    rng = np.random.default_rng(0)
    if spec.dtype == np.uint8:
        return rng.integers(0, 256, spec.shape, dtype=np.uint8)
    return rng.uniform(-1, 1, spec.shape).astype(spec.dtype)


SHM = Path("/dev/shm")  # noqa: S108 (segments are created O_EXCL, mode 0600)


class Segment:
    """A /dev/shm segment this process creates, maps and removes (its client's side)."""

    def __init__(self, size: int) -> None:
        self.key = f"/edged-bench-{os.getpid()}-{id(self)}"
        fd = os.open(SHM / self.key[1:], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def close(self) -> None:
        self.map.close()
        (SHM / self.key[1:]).unlink(missing_ok=True)


class ShmCaller:
    """One client's shared-memory path: input and output regions registered once."""

    def __init__(self, client: Client, model: str, inputs: dict[str, np.ndarray], outputs: dict) -> None:
        self.client, self.model = client, model
        self.segments = []
        self.inputs: dict[str, ShmTensor] = {}
        self.outputs: dict[str, ShmRef] = {}
        tag = f"{os.getpid()}-{threading.get_ident() % 10000}"
        for name, array in inputs.items():
            segment = self._segment(f"in-{name}-{tag}", array.nbytes)
            np.frombuffer(segment.map, array.dtype).reshape(array.shape)[...] = array  # written once
            self.inputs[name] = ShmTensor.at(f"in-{name}-{tag}", array.dtype, array.shape)
        for name, (dtype, shape) in outputs.items():
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self._segment(f"out-{name}-{tag}", size)
            self.outputs[name] = ShmRef(f"out-{name}-{tag}", size)

    def _segment(self, region: str, size: int) -> Segment:
        segment = Segment(size)
        self.segments.append(segment)
        self.client.register_system_shared_memory(region, segment.key, size)
        return segment

    def __call__(self) -> dict:
        return self.client.infer(self.model, self.inputs, outputs=self.outputs)

    def close(self) -> None:
        regions = [t.ref.region for t in self.inputs.values()] + [r.region for r in self.outputs.values()]
        for region in regions:  # by name: the other clients' regions are this uid's too
            self.client.unregister_system_shared_memory(region)
        for segment in self.segments:
            segment.close()


class MemfdCaller:
    """One client's zero-copy path: one sealed memfd holding its input and output places,
    passed to the daemon over the socket and mapped there."""

    def __init__(self, client: Client, model: str, inputs: dict[str, np.ndarray], outputs: dict) -> None:
        self.client, self.model = client, model
        sizes = [a.nbytes for a in inputs.values()]
        sizes += [int(np.prod(shape)) * np.dtype(dtype).itemsize for dtype, shape in outputs.values()]
        self.fd = os.memfd_create("edged-bench", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.fd, sum(sizes))
        self.map = mmap.mmap(self.fd, sum(sizes))
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.region = f"memfd-{os.getpid()}-{threading.get_ident() % 10000}"
        client.register_memfd(self.region, self.fd, sum(sizes))
        self.inputs, self.outputs, offset = {}, {}, 0
        for name, array in inputs.items():
            np.frombuffer(self.map, array.dtype, array.size, offset).reshape(array.shape)[...] = array
            self.inputs[name] = ShmTensor.at(self.region, array.dtype, array.shape, offset)
            offset += array.nbytes
        for name, (dtype, shape) in outputs.items():
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self.outputs[name] = ShmRef(self.region, size, offset)
            offset += size

    def __call__(self) -> dict:
        return self.client.infer(self.model, self.inputs, outputs=self.outputs)

    def close(self) -> None:
        self.client.unregister_system_shared_memory(self.region)
        self.map.close()
        os.close(self.fd)


class Daemon(DaemonProcess):
    """`edged run` on one store, every model on OpenVINO; its CPU time read from /proc."""

    def __init__(self, workdir: Path, store: Path, cache: Path, models: list[str], threads: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, {
            "socket": {"path": str(workdir / "edged.sock"), "max_body_bytes": 64 << 20},
            "store": {"path": str(store)},
            "backends": {"openvino_cache_dir": str(cache), "openvino_threads": threads},
            "models": {name: {"backend": "openvino"} for name in models}})

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.proc.pid)

    def page_faults(self) -> int:
        """Minor faults: pages the kernel had to find (and zero) for the daemon."""
        return int(Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def cpu_seconds_of(pid: int) -> float:
    """CPU time of a process's threads to the nanosecond (schedstat's run time), where
    /proc/<pid>/stat counts in 10 ms ticks. Threads that ended are not counted: the daemon's
    serving threads live as long as it does."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


def bare_server(path: str, ready) -> None:
    """The least a Python server can do per request: one blocking recv, one fixed reply."""
    import socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    ready.set()
    conn, _ = listener.accept()
    reply = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"live":true}'
    while conn.recv(65536):
        conn.sendall(reply)


def floors(daemon: Daemon, seconds: float) -> dict:
    """CPU per request (ms) of a bare Python socket server and of edged's cheapest route
    (GET /v2/health/live), each measured on the server's side for `seconds`."""
    import socket
    ctx = mp.get_context("spawn")
    path = str(daemon.workdir / "bare.sock")
    ready = ctx.Event()
    server = ctx.Process(target=bare_server, args=(path, ready), daemon=True)
    server.start()
    try:
        ready.wait(60)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            head = b"GET /v2/health/live HTTP/1.1\r\nHost: edged\r\n\r\n"

            def bare() -> None:
                sock.sendall(head)
                sock.recv(65536)

            bare_ms = server_cpu_ms(bare, server.pid, seconds)
    finally:
        server.terminate()
        server.join()
        Path(path).unlink(missing_ok=True)
    with Client(daemon.socket) as client:
        live_ms = server_cpu_ms(lambda: client.request("GET", "/v2/health/live"), daemon.proc.pid, seconds)
    return {"bare_ms": round(bare_ms, 4), "live_ms": round(live_ms, 4)}


def server_cpu_ms(call, pid: int, seconds: float) -> float:
    for _ in range(WARMUP * 10):
        call()
    before = cpu_seconds_of(pid)
    count, _ = run_for(call, seconds)
    return (cpu_seconds_of(pid) - before) * 1000 / count


def client_gap(calls: dict) -> float:
    """What a request through the socket adds to the runtime's time (s): memfd's median
    minus raw's, over short runs; the paced raw path sleeps this long between inferences."""
    def median(call) -> float:
        times = []
        for _ in range(WARMUP * 2):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return float(np.median(times))
    return max(0.0, median(calls["memfd"]) - median(calls["raw"]))


def sequential(calls: dict, requests: int, daemon: Daemon) -> dict:
    """p50/p99 (ms) and CPU ms per call of each path, in rotating blocks."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu = dict.fromkeys(calls, 0.0)
    faults = dict.fromkeys(calls, 0)
    blocks: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    order = list(calls)
    per_block = max(1, requests // BLOCKS)
    for block in range(BLOCKS):
        for name in order[block % len(order):] + order[:block % len(order)]:
            call = calls[name]
            in_process = name in ("raw", "paced")
            before = time.process_time() if in_process else daemon.cpu_seconds()
            faulted = daemon.page_faults()
            for _ in range(per_block):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
            spent = (time.process_time() if in_process else daemon.cpu_seconds()) - before
            cpu[name] += spent
            blocks[name].append(spent * 1000 / per_block)
            faults[name] += daemon.page_faults() - faulted
    figures = {}
    for name, values in times.items():
        p50, p99 = np.percentile(values, [50, 99]) * 1000
        figures[name] = {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
                         "cpu_ms": round(cpu[name] * 1000 / len(values), 4),
                         "daemon_faults": round(faults[name] / len(values), 1),
                         "cpu_ms_blocks": [round(b, 4) for b in blocks[name]]}
    return figures


def run_for(call, seconds: float) -> tuple[int, float]:
    start = time.monotonic()
    deadline, count = start + seconds, 0
    while time.monotonic() < deadline:
        call()
        count += 1
    return count, time.monotonic() - start


def raw_throughput(model, inputs: dict, seconds: float) -> float:
    barrier = threading.Barrier(CLIENTS, timeout=60)

    def work(_: int) -> tuple[int, float]:
        barrier.wait()
        return run_for(lambda: model.infer(inputs), seconds)

    with ThreadPoolExecutor(CLIENTS) as pool:
        return sum(c / e for c, e in pool.map(work, range(CLIENTS)))


def client_process(socket_path: str, model: str, path: str, seconds: float, barrier, results) -> None:
    """One client process with its own connection (and regions): requests back to back."""
    with Client(socket_path) as client:
        meta = client.metadata(model)
        inputs = {t["name"]: _array_for(t) for t in meta["inputs"]}
        if path in ("shm", "memfd"):
            outputs = {t["name"]: (_dtype(t["datatype"]), t["shape"]) for t in meta["outputs"]}
            call = (ShmCaller if path == "shm" else MemfdCaller)(client, model, inputs, outputs)
        else:
            call = lambda: client.infer(model, inputs)  # noqa: E731
        try:
            for _ in range(WARMUP):
                call()
            barrier.wait()
            results.put(run_for(call, seconds))
        finally:
            if path in ("shm", "memfd"):
                call.close()


def _dtype(datatype: str) -> np.dtype:
    from edged.api.tensors import DATATYPES
    return DATATYPES[datatype]


def _array_for(tensor: dict) -> np.ndarray:
    dtype, rng = _dtype(tensor["datatype"]), np.random.default_rng(0)
    if dtype == np.uint8:
        return rng.integers(0, 256, tensor["shape"], dtype=np.uint8)
    return rng.uniform(-1, 1, tensor["shape"]).astype(dtype)


def socket_throughput(daemon: Daemon, model: str, path: str, seconds: float) -> dict:
    ctx = mp.get_context("spawn")  # never fork a process that has run OpenVINO threads
    barrier, results = ctx.Barrier(CLIENTS + 1, timeout=300), ctx.Queue()
    procs = [ctx.Process(target=client_process, args=(str(daemon.socket), model, path, seconds, barrier,
                                                      results)) for _ in range(CLIENTS)]
    try:
        for p in procs:
            p.start()
        barrier.wait()
        cpu = daemon.cpu_seconds()
        done = [results.get(timeout=seconds + 120) for _ in procs]
        cpu = daemon.cpu_seconds() - cpu
    finally:
        for p in procs:
            if p.pid is not None:
                p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    count = sum(c for c, _ in done)
    return {"throughput": round(sum(c / e for c, e in done), 1), "cpu_ms": round(cpu * 1000 / count, 4)}


def measure(name: str, path: Path, model_format: str, store: ModelStore, daemon: Daemon, args) -> dict:
    settings = Settings(backends=BackendSettings(openvino_cache_dir=daemon.workdir / "ov-raw",
                                                 openvino_threads=args.threads))
    options = ModelManager(ModelStore(daemon.workdir / "unused"), settings).load_options(
        ModelSettings(backend="openvino"), store.manifest(name, "1"))["openvino"]
    model = get_backend("openvino").load(path, model_format, options)
    try:
        inputs = {spec.name: model_input(name, spec) for spec in model.inputs}
        outputs = {spec.name: (spec.dtype, spec.shape) for spec in model.outputs}
        requests = args.requests if name != "frame" else max(BLOCKS * 3, args.requests // 10)
        with Client(daemon.socket) as http, Client(daemon.socket) as shm_client, \
                Client(daemon.socket) as memfd_client:
            shm = ShmCaller(shm_client, name, inputs, outputs)
            memfd = MemfdCaller(memfd_client, name, inputs, outputs)
            try:
                calls = {"raw": lambda: model.infer(inputs), "http": lambda: http.infer(name, inputs),
                         "shm": shm, "memfd": memfd}
                gap = client_gap(calls)

                def paced() -> None:  # the runtime at a client's pace: idle between inferences
                    model.infer(inputs)
                    time.sleep(gap)

                calls["paced"] = paced
                seq = sequential(calls, requests, daemon)
            finally:
                shm.close()
                memfd.close()
        tput = {"raw": raw_throughput(model, inputs, args.seconds / 2)}
        for p in ("http", "shm", "memfd"):
            tput[p] = socket_throughput(daemon, name, p, args.seconds)
        tput["raw"] = round((tput["raw"] + raw_throughput(model, inputs, args.seconds / 2)) / 2, 1)
    finally:
        model.close()
    return {"sequential": seq, "throughput": tput, "gap_ms": round(gap * 1000, 3),
            "input_bytes": sum(a.nbytes for a in inputs.values()), "requests": requests}


def report(fig: dict) -> None:
    def check(ok: bool, text: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")

    print(f"\nOpenVINO on {os.cpu_count()} CPUs; sequential blocks rotating raw/http/shm/memfd; throughput "
          f"{fig['seconds']} s per phase with {CLIENTS} clients")
    head = ("model", "path", "p50 ms", "p99 ms", "p50/raw", "CPU ms/req", "overhead", f"{CLIENTS}c inf/s",
            "tput/raw")
    print("".join(f"{h:>12}" for h in head))
    for name in fig["models"]:
        m = fig["models"][name]
        seq, tput = m["sequential"], m["throughput"]
        raw = seq["raw"]
        for p in PATHS:
            s = seq[p]
            t = tput[p] if p == "raw" else tput[p]["throughput"]
            overhead = "" if p == "raw" else f"{s['cpu_ms'] - raw['cpu_ms']:+.3f}"
            row = (name if p == "raw" else "", p, f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}",
                   f"{s['p50_ms'] / raw['p50_ms']:.2f}", f"{s['cpu_ms']:.3f}", overhead, f"{t:.0f}",
                   f"{t / tput['raw']:.2f}")
            print("".join(f"{c:>12}" for c in row))
        cpu4 = ", ".join(f"{p} {tput[p]['cpu_ms']:.3f}" for p in PATHS[1:])
        faults = ", ".join(f"{p} {seq[p]['daemon_faults']:.0f}" for p in PATHS[1:])
        print(f"{'':>24}input {m['input_bytes'] / 1e6:.2f} MB; {m['requests']} sequential requests per path; "
              f"daemon CPU ms/req with {CLIENTS} clients: {cpu4}; daemon page faults per request: {faults}")
        paced, blocks = seq["paced"]["cpu_ms"], raw["cpu_ms_blocks"]
        wake = paced - raw["cpu_ms"]
        print(f"{'':>24}raw CPU ms per inference across blocks {min(blocks):.3f}-{max(blocks):.3f}; "
              f"paced at the client's rate (idle {m['gap_ms']:.3f} ms between) {paced:.3f} ({wake:+.3f})")
        if "floors" in fig:
            bare = fig["floors"]["bare_ms"]
            net = ", ".join(f"{p} {seq[p]['cpu_ms'] - paced - bare:+.3f}" for p in PATHS[1:])
            print(f"{'':>24}overhead beyond the paced runtime and the bare socket floor: {net}")
    if "floors" in fig:
        f = fig["floors"]
        print(f"\nFloors, daemon-side CPU per request: a bare Python server (one recv, one fixed reply) "
              f"{f['bare_ms']:.3f} ms; edged's GET /v2/health/live {f['live_ms']:.3f} ms")
    print("\nTargets (overhead: daemon CPU per sequential request minus the raw runtime's CPU per inference;"
          "\nshared memory: /dev/shm regions (shm, one kernel copy) and sealed memfds (memfd, in place))")
    t = TARGETS
    for name in [n for n in ("face", "pose") if n in fig["models"]]:
        seq = fig["models"][name]["sequential"]
        for p, limit in (("http", t["http_overhead_ms"]), ("shm", t["shm_overhead_ms"]),
                         ("memfd", t["shm_overhead_ms"])):
            over = seq[p]["cpu_ms"] - seq["raw"]["cpu_ms"]
            check(over <= limit, f"{name}: {p} overhead {over:.3f} ms CPU per request <= {limit}")
    for name, key in (("pose", "pose_shm_p50_ratio"), ("frame", "frame_shm_p50_ratio")):
        if name not in fig["models"]:
            continue
        seq = fig["models"][name]["sequential"]
        http = seq["http"]["p50_ms"] / seq["raw"]["p50_ms"]
        for p in ("shm", "memfd"):
            ratio = seq[p]["p50_ms"] / seq["raw"]["p50_ms"]
            check(ratio <= t[key], f"{name}: {p} sequential p50 {ratio:.2f}x raw <= {t[key]} "
                  f"(binary HTTP in the same run: {http:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput phase")
    parser.add_argument("--requests", type=int, default=1500, help="sequential requests per path")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--threads", type=int, default=0,
                        help="backends.openvino_threads on both sides (0: OpenVINO decides)")
    parser.add_argument("--models", default=",".join(MODELS), help="which of face,pose,frame")
    args = parser.parse_args()
    samples = fetch(benchmark=True)
    for key in [k for k in os.environ if k.startswith("EDGED_")]:
        del os.environ[key]  # raw phase and daemon alike run on the plain defaults
    root = Path(tempfile.mkdtemp(prefix="edged-bench-", dir="/tmp"))  # short: socket paths
    daemon = None
    fig: dict = {"seconds": args.seconds, "models": {}}
    try:
        store = ModelStore(root / "store")
        frame_xml = build_frame_ir(root / "frame-ir")
        files = {"face": [samples["face"]], "pose": [samples["pose"]],
                 "frame": [frame_xml, frame_xml.with_suffix(".bin")]}
        for name in MODELS:
            store.add(name, files[name], "1")
            store.activate(name, "1")
        daemon = Daemon(root / "daemon", store.root, root / "ov-daemon", list(MODELS), args.threads)
        daemon.wait_ready(300)
        fig["floors"] = floors(daemon, args.seconds)
        for name in args.models.split(","):
            print(f"{name}: raw in-process, binary HTTP and shared memory through edged run ...", flush=True)
            path, model_format = (files[name][0], "tflite") if name != "frame" else (frame_xml, "openvino")
            fig["models"][name] = measure(name, path, model_format, store, daemon, args)
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    report(fig)
    if args.json:
        print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
