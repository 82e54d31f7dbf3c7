#!/usr/bin/env python3
"""What one model update costs the daemon, before and after issue 12's "hash once", in one run.

For each variant, on this machine and this .venv: a private Mosquitto on a free loopback
port (tests/broker.py), `edged-registry serve` and `edged run` (tests/daemon_process.py),
a store holding version 1 of a ~50 MB OpenVINO IR (one matmul with a constant weight);
then the registry publishes a signed version 2 with a self-test and the daemon downloads,
stages, tests, activates and watches it through a short probation. Measured on the daemon
process from /proc/<pid>, sampled just before the publish and when `update_kept` arrives
(probation over): `rchar`, the bytes it read with read(2) and its kin (model files,
manifests, /proc); utime+stime. `rchar` does not count recv(2), which is how Python reads
a socket, so the model's bytes arriving over MQTT are shown apart: the update agent's
`bytes_received` (its status section). And the seconds from the publish command, and
from `update_started` (the release arrived), to `update_activated` (the new version
serves).

BEFORE is `git worktree add` of --before (default 1f539dd, the tree issue 12 was filed
against) run with PYTHONPATH pointing at it; AFTER is this checkout. Same Python, same
packages, same model files, one after the other.

    .venv/bin/python tools/bench_update_io.py [--size-mb 50] [--probation 10] [--before 1f539dd]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edged.models.store import ModelStore  # noqa: E402
from tests.broker import Broker, Subscriber  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

DEVICE = "bench-1"
EVENTS = f"edged/devices/{DEVICE}/events"
TICKS = os.sysconf("SC_CLK_TCK")


def build_ir(directory: Path, seed: int, width: int) -> list[Path]:
    """y = x @ W with W a width x width float32 constant: a model of width² x 4 bytes that
    runs in milliseconds. Its .xml and .bin."""
    import openvino as ov
    from openvino import opset13 as ops

    weights = np.random.default_rng(seed).standard_normal((width, width), dtype=np.float32) / width
    x = ops.parameter([1, width], np.float32, name="x")
    y = ops.matmul(x, ops.constant(weights), False, False)
    y.output(0).get_tensor().set_names({"y"})
    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([y], [x], "wide"), str(directory / "wide.xml"), compress_to_fp16=False)
    return [directory / "wide.xml", directory / "wide.bin"]


def proc_sample(pid: int) -> tuple[int, float]:
    """(rchar bytes, user+system CPU seconds) of process `pid` so far."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(io["rchar"]), (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


@dataclass
class Result:
    variant: str
    read_bytes: int
    received_bytes: int
    cpu_s: float
    publish_to_serving_s: float
    release_to_serving_s: float


class Registry:
    """`python -m edged.registry` of one variant, with its own store and key, on `broker`."""

    def __init__(self, workdir: Path, broker: Broker, env: dict[str, str]) -> None:
        self.env = env
        self.config = workdir / "registry.toml"
        self.config.write_text(f'root = "{workdir / "registry"}"\nreload_interval_s = 0.2\n'
                               f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n')
        out = self.run("keygen")
        self.public_key = next(line.split()[-1] for line in out.splitlines() if "public key" in line)
        self.log = (workdir / "registry.log").open("wb")
        self.server = subprocess.Popen([sys.executable, "-m", "edged.registry", "serve", "--config",
                                        str(self.config)], stdout=self.log, stderr=subprocess.STDOUT,
                                       env=env, cwd=workdir)

    def run(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "edged.registry", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=300, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"edged-registry {args[0]} failed: {done.stderr}")
        return done.stdout

    def stop(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=30)
        self.log.close()


def event(events: Subscriber, kind: str, timeout: float) -> float:
    """When (monotonic) the daemon reported `kind`; fails on an update that failed."""
    bad = ("update_failed", "update_refused", "update_rolled_back")
    message = events.wait_for(lambda m: m.json()["kind"] in (kind, *bad), timeout=timeout)
    if message.json()["kind"] != kind:
        raise RuntimeError(f"the update did not succeed: {message.payload.decode()}")
    return message.received_at


def run_variant(variant: str, source: Path, workdir: Path, v1: list[Path], v2: list[Path],
                selftest: Path, size: int, probation_s: float) -> Result:
    env = {**os.environ, "PYTHONPATH": str(source)}
    workdir.mkdir(parents=True)
    broker = Broker(workdir / "broker").start()
    registry = daemon = events = None
    try:
        registry = Registry(workdir, broker, env)
        store = ModelStore(workdir / "store")
        store.add("wide", v1, "1")
        store.activate("wide", "1")
        settings = {
            "socket": {"path": str(workdir / "edged.sock")},
            "store": {"path": str(store.root)},
            "backends": {"openvino_cache_dir": str(workdir / "cache")},
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                     "outbox_path": str(workdir / "outbox.db")},
            "updates": {"enabled": True, "public_keys": [registry.public_key], "probation_s": probation_s,
                        "download_dir": str(workdir / "downloads"), "max_model_bytes": 4 * size},
        }
        daemon = DaemonProcess(workdir, settings, {"PYTHONPATH": str(source)}).wait_ready(300)
        events = Subscriber(broker, EVENTS)
        time.sleep(2.0)  # past start-up: the MQTT link up, the first reports sent
        read_before, cpu_before = proc_sample(daemon.proc.pid)
        published = time.monotonic()
        registry.run("publish", "wide", *map(str, v2), "--version", "2", "--selftest", str(selftest))
        started = event(events, "update_started", 300)
        activated = event(events, "update_activated", 600)
        event(events, "update_kept", 600 + probation_s)
        read_after, cpu_after = proc_sample(daemon.proc.pid)
        with daemon.client() as client:
            status = client.status()
        if (served := status["models"]["wide"]["version"]) != "2":
            raise RuntimeError(f"{variant}: version {served} serves after the update")
        return Result(variant, read_after - read_before, status["updates"]["bytes_received"],
                      cpu_after - cpu_before, activated - published, activated - started)
    except BaseException:
        if daemon is not None:
            print(f"--- {variant} daemon log ---\n{daemon.output()[-4000:]}", file=sys.stderr)
        raise
    finally:
        for part in (events.close if events else None, daemon.stop if daemon else None,
                     registry.stop if registry else None, broker.stop):
            if part is not None:
                try:
                    part()
                except Exception as exc:  # one part failing to stop must not keep the others running
                    print(f"stopping: {exc}", file=sys.stderr)


def report(results: list[Result], size: int) -> None:
    mb = 1e6
    print(f"\nmodel: {size / mb:.1f} MB; the daemon, from just before the publish to update_kept "
          f"(probation over)")
    print(f"{'variant':<10} {'read MB':>8} {'x model':>8} {'received MB':>12} {'CPU s':>6} "
          f"{'publish->serving s':>19} {'release->serving s':>19}")
    rows = list(results)
    runs = len(results) // 2
    if runs > 1:  # one line per run, then the medians
        rows += [median_of([r for r in results if r.variant == v], f"{v} med") for v in ("before", "after")]
    for r in rows:
        print(f"{r.variant:<10} {r.read_bytes / mb:>8.1f} {r.read_bytes / size:>8.2f} "
              f"{r.received_bytes / mb:>12.1f} {r.cpu_s:>6.2f} {r.publish_to_serving_s:>19.2f} "
              f"{r.release_to_serving_s:>19.2f}")
    before, after = rows[-2:] if runs > 1 else rows
    which = " (medians)" if runs > 1 else ""
    print(f"after/before{which}: bytes read {after.read_bytes / before.read_bytes:.3f}, "
          f"CPU {after.cpu_s / before.cpu_s:.3f}, "
          f"publish->serving {after.publish_to_serving_s / before.publish_to_serving_s:.3f}, "
          f"release->serving {after.release_to_serving_s / before.release_to_serving_s:.3f}")


def median_of(results: list[Result], label: str) -> Result:
    def mid(field: str) -> float:
        return statistics.median(getattr(r, field) for r in results)

    return Result(label, int(mid("read_bytes")), int(mid("received_bytes")), mid("cpu_s"),
                  mid("publish_to_serving_s"), mid("release_to_serving_s"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=50.0, help="model size (the weight) in MB")
    parser.add_argument("--probation", type=float, default=10.0, help="probation_s of the update")
    parser.add_argument("--before", default="1f539dd", help="the commit measured as BEFORE")
    parser.add_argument("--runs", type=int, default=1, help="before/after pairs, alternating (medians shown)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-io-"))  # short: socket paths live under it
    worktree = work / "before-tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                   check=True, capture_output=True)
    try:
        width = int((args.size_mb * 1e6 / 4) ** 0.5)
        v1 = build_ir(work / "v1", seed=1, width=width)
        v2 = build_ir(work / "v2", seed=2, width=width)
        selftest = work / "input.npy"
        np.save(selftest, np.ones((1, width), np.float32))
        size = sum(p.stat().st_size for p in v2)
        results = []
        for run in range(args.runs):
            for variant, source in (("before", worktree), ("after", REPO)):
                print(f"{variant} (run {run + 1}): {source} ...", flush=True)
                results.append(run_variant(variant, source, work / f"{variant}-{run + 1}", v1, v2, selftest,
                                           size, args.probation))
        report(results, size)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                       capture_output=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
