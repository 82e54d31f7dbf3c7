"""The central side alone: `edged-registry serve` + the broker answering a fleet's chunk
requests, against the bare broker path (raw.py) for the same bytes, in one run, on a
machine the simulated devices do not share.

    .venv/bin/python -m tools.fleet_sim.central [--devices 500] [--gb 2] [--registries 1] [--rounds 3]

Why: in fleet_sim.py the raw baseline runs before the devices start (beside them it starved
their keepalives), while `serve` and the broker are measured with 20 worker processes busy
on the same 2 cores; CPU seconds per GB grow with that contention, so the central ratio
there mixes edged's cost with the simulator's. Here both paths run on the same quiet
machine, alternately, `--rounds` times: the raw publishers and subscribers of raw.py, then
real `serve` instances over a real registry store holding a published 10 MB release,
asked by one load client (plain paho) for its chunks exactly as devices ask (JSON request,
each device's own response topic and correlation data, `--window` requests in flight per
device, so `serve`'s per-device fair queues see `--devices` requesters). What the load
client does with a reply is not measured: only `serve` and the broker are, from
/proc/<pid>/stat over the window. Prints both paths' CPU s/GB and `central_ratio` = raw /
edged per round, and the medians. The wall-clock ratio is printed too, but means little
here: the raw path's 4 subscriber processes (raw.py needs more than one: a single slow
subscriber lets 2 publishers overrun Mosquitto's per-client queue, which drops QoS 1
messages) share the cores with what is measured, the load client is one process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.daemon_process import wait_until
from tools.fleet_sim import infra, raw

CHUNK = 1 << 20


class LoadClient:
    """`devices` requesters in one paho client: each asks for the release's chunks in turn,
    `window` at a time, until `chunks` full chunks have come back `ok`."""

    def __init__(self, port: int, files: list[tuple[str, int]], devices: int, window: int) -> None:
        self.plan = [(sha, offset, min(CHUNK, size - offset))
                     for sha, size in files for offset in range(0, size, CHUNK)]
        self.devices, self.window = devices, window
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._next = [0] * devices
        self.wanted = self.asked = self.got = self.bytes = self.refused = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="central-load",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(devices * window)
        subscribed = threading.Event()
        self.client.on_message = self._on_reply
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe(f"{infra.PREFIX}/devices/+/fetch", qos=1)
        self.client.connect(raw.HOST, port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the load client got no SUBACK")

    def run(self, chunks: int, timeout: float = 600) -> None:
        with self._lock:
            self.wanted, self.asked, self.got, self.bytes, self._done = chunks, 0, 0, 0, threading.Event()
        for device in range(self.devices):
            for _ in range(self.window):
                self._ask(device)
        if not self._done.wait(timeout):
            raise RuntimeError(f"only {self.got} of {chunks} chunks came back in {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _ask(self, device: int) -> None:
        with self._lock:
            if self.asked >= self.wanted:
                return
            self.asked += 1
            sha256, offset, length = self.plan[self._next[device] % len(self.plan)]
            self._next[device] += 1
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{infra.PREFIX}/devices/load-{device}/fetch"
        props.CorrelationData = device.to_bytes(4, "big")
        request = json.dumps({"sha256": sha256, "offset": offset, "length": length}).encode()
        self.client.publish(f"{infra.PREFIX}/registry/fetch", request, qos=1, properties=props)

    def _on_reply(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        device = int.from_bytes(message.properties.CorrelationData, "big")
        ok = dict(message.properties.UserProperty).get("status") == "ok"
        with self._lock:
            if ok:
                self.got += 1
                self.bytes += len(message.payload)
            else:  # `busy` or another refusal: asked again, never counted as delivered
                self.refused += 1
                self.asked -= 1
            if self.got >= self.wanted:
                self._done.set()
        self._ask(device)


def measure_edged(load: LoadClient, serves: list, broker_pid: int, gb: float) -> dict[str, float]:
    chunks = round(gb * 1e9 / CHUNK)
    serve_before = [infra.cpu_seconds(p.pid) for p in serves]
    broker_before = infra.cpu_seconds(broker_pid)
    started = time.monotonic()
    load.run(chunks)
    seconds = time.monotonic() - started
    serve_cpu = sum(infra.cpu_seconds(p.pid) - before for p, before in zip(serves, serve_before, strict=True))
    broker_cpu = infra.cpu_seconds(broker_pid) - broker_before
    delivered = load.bytes / 1e9
    return {"gb": delivered, "seconds": seconds, "mb_per_s": delivered * 1e3 / seconds,
            "serve_cpu_s_per_gb": serve_cpu / delivered, "broker_cpu_s_per_gb": broker_cpu / delivered}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500, help="requesters (response topics)")
    parser.add_argument("--window", type=int, default=2, help="requests in flight per requester")
    parser.add_argument("--gb", type=float, default=2.0, help="bytes per path per round")
    parser.add_argument("--registries", type=int, default=1, help="`serve` instances over the store")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-central-", dir="/dev/shm"))
    broker = infra.start_broker(work / "broker")
    registry = None
    rows = []
    try:
        models = infra.build_models(work / "models", 10.0)
        registry = infra.Registry(work / "registry", broker)
        registry.run("publish", "wide", *models["v2"], "--version", "2")
        files = [(hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in models["v2"]]
        serves = [registry.serve() for _ in range(args.registries)]
        observer = infra.Observer(broker, "wide")  # online means subscribed: no request is lost
        wait_until(lambda: len(observer.registry_online) >= args.registries, 60, "every `serve` online")
        observer.close()
        load = LoadClient(broker.port, files, args.devices, args.window)
        load.run(args.devices * args.window, timeout=60)  # every file index read
        for _ in range(args.rounds):
            bare = raw.measure(broker.port, round(args.gb * 1e9), CHUNK, publishers=args.registries,
                               subscribers=4, window=args.window * 10, broker_pid=broker.proc.pid)
            edged = measure_edged(load, serves, broker.proc.pid, args.gb)
            raw_central = bare["publishers_cpu_s_per_gb"] + bare["broker_cpu_s_per_gb"]
            edged_central = edged["serve_cpu_s_per_gb"] + edged["broker_cpu_s_per_gb"]
            rows.append({"raw": bare, "edged": edged,
                         "central_ratio": raw_central / edged_central if edged_central else float("nan"),
                         "wall_ratio": edged["mb_per_s"] / bare["mb_per_s"]})
            print(f"raw: pub {bare['publishers_cpu_s_per_gb']:.2f} + broker "
                  f"{bare['broker_cpu_s_per_gb']:.2f} = {raw_central:.2f} CPU s/GB, "
                  f"{bare['mb_per_s']:.0f} MB/s | edged: serve "
                  f"{edged['serve_cpu_s_per_gb']:.2f} + broker {edged['broker_cpu_s_per_gb']:.2f} = "
                  f"{edged_central:.2f} CPU s/GB, {edged['mb_per_s']:.0f} MB/s | central raw/edged "
                  f"{rows[-1]['central_ratio']:.3f}, wall {rows[-1]['wall_ratio']:.3f}", flush=True)
        load.close()
        print(f"{args.devices} requesters x {args.window}, {args.registries} serve, {args.gb:g} GB per path "
              f"per round, refusals {load.refused}: median central raw/edged (target >= 0.50) "
              f"{statistics.median(r['central_ratio'] for r in rows):.3f}, wall "
              f"{statistics.median(r['wall_ratio'] for r in rows):.3f}")
        registry.stop()
    finally:
        for proc in registry.live() if registry is not None else []:
            proc.kill()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
