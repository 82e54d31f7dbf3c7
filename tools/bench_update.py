#!/usr/bin/env python3
"""Update benchmark: a ~50 MB model from the registry to a device through a local Mosquitto.

Measured in one run, against a private broker started here on a free loopback port:
  1. raw:    the same number of bytes, in the same chunk size, published by a plain paho
             client (QoS 1, 8 in flight) and received by another: the broker's ceiling,
             measured before and after the quiet download, and averaged;
  2. quiet:  `edged-registry serve` and a real daemon (`edged run`, updates enabled);
             `edged-registry publish` of version 2 while nobody predicts: download MB/s
             (from the agent's events), the figure to hold against raw;
  3. serving: version 3 while a client predicts on the model non-stop: download MB/s
             with inference competing for the cores, time from the release arriving on
             the broker to version 3 answering, requests failed during the swap, and p99
             latency during the swap against before it.
Targets (issue 5): >= 25 MB/s, >= 60% of raw, 0 failed requests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from bench_mqtt import Broker  # tools/ is sys.path[0] when this script runs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edged.client import Client
from edged.models.store import ModelStore
from tests.daemon_process import DaemonProcess


def build_big_ir(directory: Path, width: int, seed: int) -> list[Path]:
    """y = x @ W with W a width x width float32 constant: width 3584 is 51 MB of weights."""
    import openvino as ov
    from openvino import opset13 as ops

    weights = np.random.default_rng(seed).standard_normal((width, width), dtype=np.float32) / width
    x = ops.parameter([1, width], np.float32, name="x")
    y = ops.matmul(x, ops.constant(weights), False, False)
    y.output(0).get_tensor().set_names({"y"})
    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([y], [x], "big"), str(directory / "big.xml"), compress_to_fp16=False)
    return [directory / "big.xml", directory / "big.bin"]


def raw_rate(port: int, total: int, chunk: int) -> float:
    """MB/s of `total` bytes in `chunk`-byte QoS 1 messages, publisher to subscriber."""
    received = threading.Event()
    count = {"bytes": 0}

    def on_message(client, userdata, message) -> None:
        count["bytes"] += len(message.payload)
        if count["bytes"] >= total:
            received.set()

    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-sub", protocol=mqtt.MQTTv5)
    subscriber.on_message = on_message
    subscriber.connect("127.0.0.1", port)
    subscriber.subscribe("bench/raw", qos=1)
    subscriber.loop_start()
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=mqtt.MQTTv5)
    publisher.max_inflight_messages_set(8)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    time.sleep(0.3)
    payload = bytes(chunk)
    start = time.perf_counter()
    for offset in range(0, total, chunk):
        publisher.publish("bench/raw", payload[: min(chunk, total - offset)], qos=1)
    received.wait(300)
    elapsed = time.perf_counter() - start
    for client in (publisher, subscriber):
        client.disconnect()
        client.loop_stop()
    return total / elapsed / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=3584, help="model is width^2 float32 weights")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="device chunk size")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-update-"))
    broker = Broker(work)
    broker.start()
    procs: list[subprocess.Popen] = []
    daemon: DaemonProcess | None = None
    try:
        versions = {v: build_big_ir(work / f"v{v}", args.width, v) for v in (1, 2, 3)}
        size = sum(p.stat().st_size for p in versions[2])
        raw = raw_rate(broker.port, size, args.chunk_kib << 10)

        mqtt_section = f'host = "127.0.0.1"\nport = {broker.port}\n'
        (work / "registry.toml").write_text(f'root = "{work / "registry"}"\n[mqtt]\n{mqtt_section}')
        registry = [sys.executable, "-m", "edged.registry"]
        config = ["--config", str(work / "registry.toml")]
        keygen = subprocess.run([*registry, "keygen", *config], capture_output=True, text=True, check=True)
        public_key = next(line.split()[-1] for line in keygen.stdout.splitlines() if "public key" in line)
        procs.append(subprocess.Popen([*registry, "serve", *config], stderr=subprocess.DEVNULL))

        store = ModelStore(work / "store")
        store.add("big", versions[1], "1")
        store.activate("big", "1")
        socket_path = work / "edged.sock"
        daemon = DaemonProcess(work, {
            "socket": {"path": str(socket_path)}, "store": {"path": str(store.root)},
            "backends": {"openvino_cache_dir": str(work / "cache")},
            "mqtt": {"enabled": True, "device_id": "bench", "outbox_path": str(work / "outbox.db"),
                     "host": "127.0.0.1", "port": broker.port},
            "updates": {"enabled": True, "public_keys": [public_key], "download_dir": str(work / "downloads"),
                        "chunk_bytes": args.chunk_kib << 10, "probation_s": 2},
        })
        events: list[tuple[float, dict]] = []
        watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-watch", protocol=mqtt.MQTTv5)
        watcher.on_message = lambda c, u, m: events.append((time.monotonic(), {"topic": m.topic, **(
            json.loads(m.payload) if m.topic.endswith("/events") else {})}))
        watcher.connect("127.0.0.1", broker.port)
        watcher.subscribe([("edged/devices/bench/events", 1), ("edged/registry/models/big", 1)])
        watcher.loop_start()
        daemon.wait_ready(120)
        x = np.ones((1, args.width), np.float32)
        np.save(work / "input.npy", x)

        def event_time(kind: str, version: str) -> tuple[float, dict] | None:
            return next(((t, e) for t, e in events if e.get("kind") == kind and e.get("version") == version),
                        None)

        def update_to(version: int) -> tuple[float, dict]:
            """Publish `version`, wait until the device kept it; (when released, its download event)."""
            subprocess.run([*registry, "publish", "big", *map(str, versions[version]), "--version",
                            str(version), "--selftest", str(work / "input.npy"), *config],
                           check=True, capture_output=True)
            until = time.monotonic() + 300
            while time.monotonic() < until and not event_time("update_kept", str(version)) \
                    and not event_time("update_failed", str(version)):
                time.sleep(0.1)
            downloaded = event_time("update_downloaded", str(version))
            if event_time("update_failed", str(version)) or downloaded is None:
                failed = event_time("update_failed", str(version))
                raise SystemExit(f"update to {version} did not finish: {failed}")
            released = [t for t, e in events if e["topic"] == "edged/registry/models/big"][-1]
            return released, downloaded[1]

        time.sleep(2)  # the daemon's start-up work (first health report, store sync) is over
        _released, quiet = update_to(2)
        quiet_rate = size / quiet["seconds"] / 1e6
        raw_after = raw_rate(broker.port, size, args.chunk_kib << 10)  # the same machine, a moment later
        raw_before, raw = raw, (raw + raw_after) / 2

        latencies: list[tuple[float, float, float]] = []  # (time, seconds, first output)
        failures: list[str] = []
        stop = threading.Event()

        def predict() -> None:
            with Client(socket_path, timeout=30) as client:
                while not stop.is_set():
                    start = time.perf_counter()
                    try:
                        y = client.infer("big", {"x": x})["y"]
                        latencies.append((time.monotonic(), time.perf_counter() - start, float(y[0, 0])))
                    except Exception as exc:  # every failure counts
                        failures.append(repr(exc))

        client_thread = threading.Thread(target=predict)
        client_thread.start()
        try:
            time.sleep(3)
            released, serving_download = update_to(3)
            time.sleep(1)
        finally:
            stop.set()
            client_thread.join()
        serving_rate = size / serving_download["seconds"] / 1e6
        first_v2 = latencies[0][2]
        serving = next(t for t, _s, first in latencies if first != first_v2)
        before = sorted(s for t, s, _f in latencies if t < released)
        during = sorted(s for t, s, _f in latencies if released <= t <= serving + 1.0)

        def p(values: list[float], q: float) -> float:
            return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

        print(f"model: {size / 1e6:.1f} MB (OpenVINO IR), chunks of {args.chunk_kib} KiB")
        print(f"raw paho publish -> subscribe, same bytes:  {raw:7.1f} MB/s  "
              f"(mean of {raw_before:.1f} before and {raw_after:.1f} after the quiet download)")
        verdicts = ["PASS" if ok else "FAIL" for ok in (quiet_rate >= 25, quiet_rate >= 0.6 * raw)]
        print(f"registry -> device download, quiet:        {quiet_rate:7.1f} MB/s  "
              f"({quiet_rate / raw:.0%} of raw; targets >= 25 MB/s: {verdicts[0]}, >= 60%: {verdicts[1]})")
        print(f"registry -> device download, serving:      {serving_rate:7.1f} MB/s  "
              f"({serving_rate / raw:.0%} of raw, a client predicting non-stop)")
        print(f"release retained -> version 3 answering:    {serving - released:7.2f} s "
              f"(download {serving_download['seconds']:.2f} s)")
        total = len(latencies) + len(failures)
        print(f"requests failed during the update:          {len(failures)} of {total} "
              f"({'PASS' if not failures else 'FAIL'})")
        print(f"p99 latency before / during the swap:       {p(before, 0.99):.2f} ms / "
              f"{p(during, 0.99):.2f} ms (p50 {p(before, 0.5):.2f} / {p(during, 0.5):.2f} ms; "
              f"{len(before)} / {len(during)} requests)")
        watcher.disconnect()
        watcher.loop_stop()
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
