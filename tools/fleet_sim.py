#!/usr/bin/env python3
"""Fleet simulator: N devices running edged's real update path against a real Mosquitto
and real `edged-registry serve` instances, and what it costs.

    .venv/bin/python tools/fleet_sim.py --devices 500 --model-mb 10 --registries 2 --processes 20
    .venv/bin/python tools/fleet_sim.py ... --registries 2 --kill-at 0.5     # one serve SIGKILLed
    .venv/bin/python tools/fleet_sim.py --devices 200 --processes 8 --rollout 1%,10%,50%,100% --faulty 5

What is real: per device, edged's own store, model manager, control service, outbox
(SQLite on disk), MQTT link with its retained status, state and Last Will, reporter,
commands and update agent with its chunk transfer, signature checks, self-test and
probation (tools/fleet_sim/device.py), N per worker process (worker.py); a private
Mosquitto on a free loopback port; `edged-registry keygen`, `publish --selftest`,
`rollout` and `serve` as the operator runs them. What is cheap: a process's devices share
one compiled OpenVINO model per set of model files (shared_model.py says why and how);
`--faulty N` gives N devices of the rollout's 10% wave a runtime that computes wrong
results, so they fail the release's self-test.

Processes: each device has five threads (paho's loop, the outbox sender, the reporter,
commands, the update agent), and every thread waiting for a process's GIL wakes each
switch interval. With ~80 devices per process (6 processes for 500) the machine spent
three quarters of its CPU in the kernel on those wake-ups, the broker and `serve` were
starved (no chunk served for 25 s) and the devices missed their keepalives. So: ~25
devices per process (`--processes 20` for 500), the workers take the GIL in 50 ms turns
and run at nice 10, leaving the cores to the broker and registry under test first
(worker.py). The simulated devices still share the machine's 2 cores, which real devices
do not: their own work (~0.28 CPU s per 10 MB update) bounds the aggregate rate here, and
the report says how the CPU was spent.

Measured, all in one run: the broker's raw throughput for the same bytes in the same
chunk size with plain paho clients (raw.py) while the devices idle; then from the
release's arrival on the broker until every device's retained state (read as an operator
reads it) says the new version is active: the time, bytes that reached each device
against the model's size, registry CPU seconds (/proc/<pid>/stat of each `serve`) per GB
delivered, broker messages per second ($SYS), failures, refusals and rollbacks (device
events, serve's `busy` count), CPU used by the devices' processes and by the rest of the
machine. Printed as a table; `--json FILE` writes the same figures.

Two forms of the comparison with raw, side by side. `aggregate_over_raw`: wall-clock MB/s,
bounded here by the simulated devices' own CPU on the shared cores. CPU-accounted, per GB
delivered (/proc/<pid>/stat of each process over its window; raw.py): `central_cpu_s_per_gb`
(raw: the publishers + the broker; edged: every `serve` + the broker) and `central_ratio` =
raw / edged, the throughput a central broker + registry host reaches on edged's path per
core relative to the bare broker path when the devices are their own machines; and the
receiving side, raw subscribers against the devices (`cpu_per_gb`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.fleet_sim import infra, raw
from tools.fleet_sim.report import figures, print_table

MODEL = "wide"


class Workers:
    """The worker processes and what they say on stdout."""

    def __init__(self, work: Path, groups: list[list[str]], settings: dict, files: list[Path],
                 faulty: set[str]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.progress: dict[int, dict] = {}
        self.final: dict[str, dict] = {}
        self.ready: list[dict] = []
        self._cond = threading.Condition()
        for index, devices in enumerate(groups):
            config = work / f"worker-{index}.json"
            config.write_text(json.dumps({"devices": devices, "workdir": str(work / "devices"),
                                          "settings": settings, "model": MODEL, "version": "1",
                                          "files": [str(p) for p in files],
                                          "faulty": sorted(faulty & set(devices))}))
            with (work / f"worker-{index}.log").open("ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "tools.fleet_sim.worker", str(config)],
                                        cwd=infra.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log, text=True)
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(index, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            message = json.loads(line)
            with self._cond:
                if "ready" in message:
                    self.ready.append(message)
                elif "progress" in message:
                    self.progress[index] = message["progress"]
                elif "final" in message:
                    self.final.update(message["final"])
                self._cond.notify_all()

    def wait_ready(self, timeout: float) -> list[dict]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.ready) == len(self.procs), timeout):
                raise RuntimeError(f"workers not ready in {timeout} s: {self.ready}")
            return self.ready

    def accepted_bytes(self) -> int:
        with self._cond:
            return sum(p["accepted_bytes"] for p in self.progress.values())

    def stop(self, devices: int, timeout: float = 180) -> dict[str, dict]:
        for proc in self.procs:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        with self._cond:
            self._cond.wait_for(lambda: len(self.final) >= devices, timeout)
        for proc in self.procs:
            proc.wait(timeout=60)
        return self.final


def wait_until(predicate, timeout: float, what: str, every: float = 0.1) -> float:
    """Poll `predicate` until true; the time it became true (monotonic)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return time.monotonic()


def rollout_plan(args: argparse.Namespace, ids: list[str]) -> tuple[list[list[str]], set[str]]:
    """The rollout's waves as the registry will plan them, and the faulty devices: the
    first `--faulty` of the second wave."""
    from edged.registry.rollout import parse_waves, plan_waves

    waves = plan_waves(parse_waves(args.rollout), MODEL, "2", dict.fromkeys(ids))
    return waves, set(waves[1][: args.faulty]) if len(waves) > 1 else set()


def run(args: argparse.Namespace, work: Path) -> dict:
    ids = [f"sim-{i:04d}" for i in range(args.devices)]
    waves, faulty = rollout_plan(args, ids) if args.rollout else ([], set())
    models = infra.build_models(work / "models", args.model_mb)
    broker = infra.start_broker(work / "broker")
    observer = infra.Observer(broker, MODEL)
    registry = infra.Registry(work / "registry", broker, {"rollout_tick_s": 0.5} if args.rollout else None)
    workers = None
    try:
        for _ in range(args.registries):
            registry.serve()
        wait_until(lambda: len(observer.registry_online) >= args.registries, 60, "serve online")
        settings = {
            "backends": {"probe_runs": 1},
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port,
                     "reconnect_min_s": 0.5, "reconnect_max_s": 5.0,
                     "health_interval_s": args.health_interval_s},
            "updates": {"enabled": True, "public_keys": [registry.public_key],
                        "chunk_bytes": args.chunk_kib << 10,
                        "window": args.window, "chunk_timeout_s": args.chunk_timeout_s,
                        "probation_s": args.probation_s, "retry_min_s": 5.0, "retry_max_s": 60.0},
        }
        per = math.ceil(len(ids) / args.processes)
        groups = [ids[i:i + per] for i in range(0, len(ids), per)]
        # Before the devices start: with them idle beside it, the baseline's processes took the
        # CPU their MQTT threads need to keep their connections alive (keepalive timeouts).
        baseline = raw.measure(broker.port, args.devices * models["v2_bytes"], args.chunk_kib << 10,
                               publishers=args.registries, subscribers=len(groups),
                               broker_pid=broker.proc.pid)
        started = time.monotonic()
        workers = Workers(work, groups, settings, models["v1"], faulty)
        ready = workers.wait_ready(600)
        try:
            wait_until(lambda: observer.count("1") == len(ids), 300, "every device's state: version 1 active")
        except RuntimeError as exc:
            missing = sorted(d for d in ids if observer.active.get(d) != "1")
            raise RuntimeError(f"{exc}: {len(missing)} not: {missing[:10]} {observer.problems[:5]}") from None
        start_s = time.monotonic() - started

        idle = measure_idle(observer, args.idle_s)

        pids = {"workers": [p.pid for p in workers.procs], "serves": [p.pid for p in registry.serves],
                "broker": [broker.proc.pid]}
        before = snapshot(observer, pids)
        run_publish(args, registry, models)
        wait_until(lambda: bool(observer.releases), 180, "the release on the broker")
        t0 = observer.releases[0][0]  # when the broker passed it on, not when `publish` started
        killed = None

        def done() -> bool:
            nonlocal killed
            if args.kill_at and killed is None and \
                    workers.accepted_bytes() >= args.kill_at * len(ids) * models["v2_bytes"]:
                victim = registry.serves[-1]
                killed = {"pid": victim.pid, "cpu_s": infra.cpu_seconds(victim.pid),
                          "at_s": time.monotonic() - t0, "accepted_bytes": workers.accepted_bytes()}
                victim.send_signal(signal.SIGKILL)
                victim.wait()
            if args.rollout:
                return rollout_settled(registry)
            return observer.count("2") == len(ids)

        converged = wait_until(done, args.timeout_s, "every device on version 2", every=0.05)
        # $SYS counts once a second: the broker's figures are read from a round after this.
        wait_until(lambda: observer.sys_time("bytes/sent") > converged, 10, "the broker's next $SYS round")
        after = snapshot(observer, pids, killed)
        memory = {"workers_peak_rss_mib": [round(infra.peak_rss_mib(p.pid)) for p in workers.procs],
                  "serves_peak_rss_mib": [round(infra.peak_rss_mib(p.pid)) for p in registry.live()]}
        if not args.rollout:  # probation's end, so no device is mid-update at the stop
            wait_until(lambda: len(observer.device_events("update_kept", "2")) >= len(ids),
                       120 + args.probation_s, "every device keeping version 2")
        else:  # a halt does not stop the updates its waves started: let them end first
            wait_until(lambda: updates_ended(observer), 120 + args.probation_s,
                       "every started update kept or failed")
        final = workers.stop(len(ids))
        serve_lines = registry.stop()
        return figures(args=args, models=models, ids=ids, ready=ready, start_s=start_s, idle=idle,
                       baseline=baseline, before=before, after=after, t0=t0, converged=converged,
                       observer=observer, final=final, serve_lines=serve_lines, killed=killed,
                       waves=waves, faulty=faulty, registry=registry, memory=memory)
    finally:
        if workers is not None:
            for proc in workers.procs:
                if proc.poll() is None:
                    proc.kill()
        for proc in registry.live():
            proc.kill()
        observer.close()
        broker.stop()


def measure_idle(observer: infra.Observer, seconds: float) -> dict:
    """The broker's PUBLISH rate while the devices only report (health, state)."""
    time.sleep(2.5)  # two $SYS rounds
    first = snapshot(observer, {})
    time.sleep(seconds)
    last = snapshot(observer, {})
    elapsed = last["time"] - first["time"]
    received, sent = (last["sys"][k] - first["sys"][k] for k in ("publish/messages/received",
                                                                  "publish/messages/sent"))
    bytes_in = last["sys"]["bytes/received"] - first["sys"]["bytes/received"]
    return {"seconds": elapsed, "publish_in_per_s": received / elapsed, "bytes_in_per_s": bytes_in / elapsed,
            "publish_out_per_s": (sent - (last["sys_seen"] - first["sys_seen"])) / elapsed,
            "retained": last["sys"]["retained messages/count"] - last["sys_topics"]}


def snapshot(observer: infra.Observer, pids: dict[str, list[int]], killed: dict | None = None) -> dict:
    """CPU seconds of each process group, the machine's, and the broker's counters, now."""
    def cpu(pid: int) -> float:
        if killed and pid == killed["pid"]:
            return killed["cpu_s"]
        try:
            return infra.cpu_seconds(pid)
        except FileNotFoundError:
            return 0.0

    names = ["messages/received", "messages/sent", "publish/messages/received", "publish/messages/sent",
             "bytes/received", "bytes/sent", "retained messages/count", "clients/connected"]
    seen, topics = observer.sys_counts()
    return {"time": time.monotonic(), "machine_cpu_s": infra.machine_cpu_seconds(),
            "sys_seen": seen, "sys_topics": topics,
            "cpu_s": {group: [cpu(pid) for pid in group_pids] for group, group_pids in pids.items()},
            "sys": {name: observer.sys_value(name) for name in names}}


def run_publish(args: argparse.Namespace, registry: infra.Registry, models: dict) -> None:
    files = [*models["v2"]]
    if args.rollout:
        registry.run("publish", MODEL, *files, "--version", "2", "--selftest", models["selftest"], "--hold")
        registry.run("rollout", MODEL, "2", "--waves", args.rollout, "--soak-s", str(args.soak_s),
                     "--max-failures", "0")
    else:
        registry.run("publish", MODEL, *files, "--version", "2", "--selftest", models["selftest"])


def updates_ended(observer: infra.Observer) -> bool:
    """Every device that started the update has kept it or given it up (its events)."""
    started = {d for _t, d, _e in observer.device_events("update_started", "2")}
    ended = {d for kind in ("update_kept", "update_failed", "update_refused", "update_rolled_back")
             for _t, d, _e in observer.device_events(kind, "2")}
    return started <= ended


def rollout_settled(registry: infra.Registry) -> bool:
    """The rollout's own record (the file `serve` keeps) says it is over: halted or done."""
    path = registry.workdir / "root" / "rollouts" / f"{MODEL}.json"
    try:
        state = json.loads(path.read_text()).get("state")
    except (OSError, ValueError):
        return False
    return state in ("halted", "completed", "aborted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--model-mb", type=float, default=10.0, help="size of the published model")
    parser.add_argument("--registries", type=int, default=1, help="`serve` instances over one store")
    parser.add_argument("--kill-at", type=float, default=0.0,
                        help="SIGKILL the last serve once this fraction of the bytes reached the devices")
    parser.add_argument("--processes", type=int, default=12,
                        help="worker processes the devices run in (~40 devices each at most: see docstring)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="devices' chunk_bytes, and the raw chunk")
    parser.add_argument("--window", type=int, default=2, help="devices' chunk requests in flight")
    parser.add_argument("--chunk-timeout-s", type=float, default=30.0)
    parser.add_argument("--probation-s", type=float, default=5.0)
    parser.add_argument("--health-interval-s", type=float, default=30.0)
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle window for the reporting rate")
    parser.add_argument("--rollout", help="waves, e.g. 1%%,10%%,50%%,100%%: `edged-registry rollout`")
    parser.add_argument("--faulty", type=int, default=0,
                        help="devices of the second wave failing the self-test")
    parser.add_argument("--soak-s", type=float, default=10.0, help="rollout --soak-s")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--workdir", type=Path, help="default: a new directory in /dev/shm (tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    shm = Path("/dev/shm")  # noqa: S108 (a private directory made in it by mkdtemp)
    base = args.workdir or (shm if shm.is_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=base))
    print(f"work directory: {work}", file=sys.stderr)
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
