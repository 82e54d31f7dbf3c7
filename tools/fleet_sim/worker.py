"""A worker process of the fleet simulator: N devices (device.py) in one process.

    python -m tools.fleet_sim.worker CONFIG.json     (from the repository's root)

CONFIG: {"devices": [ids], "workdir", "settings": the daemon settings tree shared by
all, "model": name, "version", "files": [paths of version 1], "faulty": [ids]}.

It talks to the coordinator in JSON lines: on stdout `{"ready": n}` once every device
loaded its model and connected, then `{"progress": {...}}` every half second (bytes the
devices' transfers accepted, for the coordinator's kill-at-50%), and `{"final": {...}}`
per device figures after the stop; it stops when stdin says `stop` or closes.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.fleet_sim import shared_model
from tools.fleet_sim.device import SimDevice

PROGRESS_S = 0.5
SWITCH_INTERVAL_S = 0.05
NICE = 10


def emit(document: dict) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def main(config_path: str) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack
    # A few hundred threads share this process's GIL, and each one waiting for it wakes every
    # switch interval (5 ms by default): with ~80 devices per process that was most of the
    # machine's CPU in the kernel's futex calls, and the broker and registry starved. Real
    # devices have a CPU each; here their threads take the GIL in longer turns, and the
    # devices yield the cores to the broker and registry under test.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    os.nice(NICE)
    config = json.loads(Path(config_path).read_text())
    workdir = Path(config["workdir"])
    shared_model.install()
    shared_model.FAULTY_STORES.update((workdir / d / "store").resolve() for d in config["faulty"])
    devices = []
    for device_id in config["devices"]:
        device = SimDevice(device_id, workdir / device_id, config["settings"])
        device.add_model(config["model"], [Path(p) for p in config["files"]], config["version"])
        devices.append(device)
    for device in devices:
        device.start()
    deadline = time.monotonic() + 120
    while not all(d.pipe.link.connected.is_set() for d in devices) and time.monotonic() < deadline:
        time.sleep(0.1)
    emit({"ready": sum(d.pipe.link.connected.is_set() for d in devices),
          "loaded": sum(bool(d.manager.served()) for d in devices)})

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    while not stop.wait(PROGRESS_S):
        emit({"progress": {"accepted_bytes": sum(d.figures()["accepted_bytes"] for d in devices),
                           "delivered_bytes": sum(d.delivered_bytes for d in devices)}})
    figures = {d.device_id: d.figures() for d in devices}  # before the stop closes the models
    with ThreadPoolExecutor(16) as pool:  # each stop flushes its outbox: in parallel
        failed = list(pool.map(lambda d: d.stop(), devices))
    emit({"final": figures,
          "stop_failures": sum(bool(f) for f in failed)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
