"""The simulator's surroundings, all real: a private Mosquitto (tests/broker.py, on a free
loopback port, `$SYS` every second), `edged-registry` commands and `serve` processes over
one registry store, the models to publish, an operator's view of the fleet (a paho
client on the devices' retained state and events, the release topics and `$SYS`), and
CPU seconds from /proc.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from tests.broker import Broker

TICK = os.sysconf("SC_CLK_TCK")
PREFIX = "edged"
ROOT = Path(__file__).resolve().parents[2]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_broker(directory: Path) -> Broker:
    directory.mkdir(parents=True, exist_ok=True)
    return Broker(directory, extra_config="sys_interval 1\nmax_connections -1").start()


def build_models(directory: Path, model_mb: float) -> dict[str, Any]:
    """Version 1 (a small IR the devices start with) and version 2 (y = x @ W, W a width x
    width float32 constant: `model_mb` MB), both taking x of shape [1, width], and the
    self-test input."""
    import openvino as ov
    from openvino import opset13 as ops

    width = max(16, round(math.sqrt(model_mb * 1e6 / 4)))

    def build(name: str, out: int, seed: int) -> list[Path]:
        weights = np.random.default_rng(seed).standard_normal((width, out), dtype=np.float32) / width
        x = ops.parameter([1, width], np.float32, name="x")
        y = ops.matmul(x, ops.constant(weights), False, False)
        y.output(0).get_tensor().set_names({"y"})
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.Model([y], [x], "wide"), str(target / "wide.xml"), compress_to_fp16=False)
        return [target / "wide.xml", target / "wide.bin"]

    directory.mkdir(parents=True, exist_ok=True)
    selftest = directory / "selftest-input.npy"
    np.save(selftest, np.random.default_rng(3).standard_normal((1, width), dtype=np.float32))
    v2 = build("v2", width, 2)
    return {"width": width, "v1": build("v1", 16, 1), "v2": v2, "selftest": selftest,
            "v2_bytes": sum(p.stat().st_size for p in v2)}


class Registry:
    """One registry store, its commands, and any number of `serve` over it."""

    def __init__(self, workdir: Path, broker: Broker, settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "registry.toml"
        lines = [f'root = "{workdir / "root"}"', "reload_interval_s = 0.5"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in (settings or {}).items()]
        lines += ["[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}"]
        self.config.write_text("\n".join(lines) + "\n")
        self.serves: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        out = self.run("keygen")
        self.public_key = next(line.split()[-1] for line in out.splitlines() if line.startswith("public key"))

    def run(self, *args: str | Path, timeout: float = 300) -> str:
        done = subprocess.run([sys.executable, "-m", "edged.registry", *map(str, args), "--config",
                               str(self.config)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"edged-registry {' '.join(map(str, args))}: exit {done.returncode}\n"
                               f"{done.stderr}")
        return done.stdout

    def serve(self) -> subprocess.Popen:
        log = self.workdir / f"serve-{len(self.serves)}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "edged.registry", "serve", "--config",
                                     str(self.config)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.serves.append(proc)
        self.logs.append(log)
        return proc

    def live(self) -> list[subprocess.Popen]:
        return [p for p in self.serves if p.poll() is None]

    def stop(self) -> list[str]:
        """SIGTERM every live `serve`; the last line of each one's log (`stopped: served ...`)."""
        for proc in self.live():
            proc.terminate()
        for proc in self.serves:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [next((line for line in reversed(log.read_text().splitlines()) if "stopped: served" in line),
                     "(no final line: killed)") for log in self.logs]


class Observer:
    """What an operator sees: every device's retained state and events, the releases, the
    registry's status and the broker's `$SYS` counters (each with its arrival time)."""

    def __init__(self, broker: Broker, model: str) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.active: dict[str, str | None] = {}  # device -> active version of `model`
        self.failure: dict[str, Any] = {}  # device -> the state's `failure` of `model`, when set
        self.active_at: dict[tuple[str, str], float] = {}  # (device, version) -> first seen active
        self.events: list[tuple[float, str, dict]] = []  # (time, device, event)
        self.kinds: Counter[str] = Counter()
        self.sys: dict[str, tuple[float, str]] = {}
        self.sys_received = 0  # $SYS messages sent to this observer: the broker counts them too
        self.releases: list[tuple[float, str]] = []  # (time, topic) of non-empty release messages
        self.registry_online: set[str] = set()
        self.problems: list[str] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleet-sim-observer",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        topics = [f"{PREFIX}/devices/+/state", f"{PREFIX}/devices/+/events", f"{PREFIX}/registry/models/#",
                  f"{PREFIX}/registry/devices/+/models/#", f"{PREFIX}/registry/status", "$SYS/broker/#"]
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1 if t[0] != "$" else 0) for t in topics])
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the observer got no SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self._record(message)
        except Exception as exc:  # an odd message must not end paho's thread (and the observer)
            self.problems.append(f"{message.topic}: {exc!r}")
            print(f"observer: {message.topic}: {exc!r}", file=sys.stderr)

    def _record(self, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = message.topic
        with self.lock:
            if topic.startswith("$SYS/"):
                self.sys[topic] = (now, message.payload.decode(errors="replace"))
                self.sys_received += 1
                return
            if "/registry/" in topic:
                if topic.endswith("/registry/status"):
                    status = json.loads(message.payload or b"{}")
                    if status.get("state") == "online":
                        self.registry_online.add(status.get("instance", ""))
                elif message.payload:
                    self.releases.append((now, topic))
                return
            device = topic.split("/")[-2]
            document = json.loads(message.payload)
            if topic.endswith("/events"):
                self.events.append((now, device, document))
                self.kinds[document.get("kind", "?")] += 1
                return
            entry = document.get("models", {}).get(self.model, {})
            self.active[device] = entry.get("active")
            if entry.get("failure"):
                self.failure[device] = entry["failure"]
            if entry.get("active"):
                self.active_at.setdefault((device, entry["active"]), now)

    def count(self, version: str) -> int:
        with self.lock:
            return sum(v == version for v in self.active.values())

    def sys_value(self, name: str) -> float:
        with self.lock:
            return float(self.sys.get(f"$SYS/broker/{name}", (0, "0"))[1].split()[0])

    def sys_time(self, name: str) -> float:
        """When `$SYS/broker/{name}` last arrived (monotonic; 0 if never)."""
        with self.lock:
            return self.sys.get(f"$SYS/broker/{name}", (0.0, ""))[0]

    def sys_counts(self) -> tuple[int, int]:
        """$SYS messages received so far, and $SYS topics (each retained by the broker)."""
        with self.lock:
            return self.sys_received, len(self.sys)

    def device_events(self, kind: str, version: str | None = None) -> list[tuple[float, str, dict]]:
        with self.lock:
            return [e for e in self.events if e[2].get("kind") == kind
                    and (version is None or e[2].get("version") == version)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
