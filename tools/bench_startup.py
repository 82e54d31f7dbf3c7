#!/usr/bin/env python3
"""Start-up time: from spawning `edged run` to its READY=1, with a cold and a warm OpenVINO cache.

READY=1 is read from a datagram socket the benchmark binds as NOTIFY_SOCKET, as systemd
does, so the figure is what `systemctl start edged` waits for. "Cold" is an empty
compiled-model cache (files and Python modules are in the page cache either way); "warm"
is the next start with the cache the cold one filled. The store is the sample models
(face, selfie), or --store.

    .venv/bin/python tools/bench_startup.py [--runs 3] [--store DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fetch_models import add_sample, fetch  # tools/ is sys.path[0] when this script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edged.models.store import ModelStore  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402


def start_to_ready(store: Path, cache: Path, workdir: Path) -> tuple[float, float]:
    """Seconds from spawn to READY=1 for one `edged run` (which is then stopped), and of
    those, the daemon's own "ready in" (from `Daemon.run`: the models loaded and probed)."""
    workdir.mkdir(parents=True)
    settings = {"socket": {"path": str(workdir / "edged.sock")}, "store": {"path": str(store)},
                "backends": {"openvino_cache_dir": str(cache)}}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(workdir / "notify"))
        notify.settimeout(600)
        with DaemonProcess(workdir, settings, {"NOTIFY_SOCKET": str(workdir / "notify")}) as daemon:
            while True:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    raise SystemExit(f"no READY=1 in 600 s:\n{daemon.output()[-2000:]}") from None
                if "READY=1" in message.split("\n"):
                    total = time.monotonic() - daemon.started
                    break
    loading = re.search(r"ready in ([0-9.]+) s", daemon.output())
    return total, float(loading[1]) if loading else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="cold/warm pairs (default 3); medians shown")
    parser.add_argument("--store", type=Path, help="model store to start with (default: the samples)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edged-bench-", dir="/tmp"))
    try:
        store = args.store
        if store is None:
            samples = ModelStore(root / "store")
            for name, path in fetch().items():
                add_sample(samples, name, path)
                samples.activate(name, "1")
            store = samples.root
        names = ", ".join(ModelStore(store).names())
        times: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
        for run in range(args.runs):
            cache = root / f"cache-{run}"
            for kind in ("cold", "warm"):  # the same cache: the cold start fills it
                times[kind].append(start_to_ready(store, cache, root / f"run-{run}-{kind}"))
                total, loading = times[kind][-1]
                print(f"run {run + 1}: {kind:4} {total:.2f} s (loading {loading:.2f} s)", flush=True)
        figures = {kind: {"ready_s": round(statistics.median(t for t, _ in values), 3),
                          "loading_s": round(statistics.median(lo for _, lo in values), 3)}
                   for kind, values in times.items()}
        print(f"\nspawn to READY=1 ({names}; median of {args.runs}, {os.cpu_count()} CPUs)")
        print("                       READY=1   of which loading the models")
        for kind in ("cold", "warm"):
            print(f"  {kind} OpenVINO cache  {figures[kind]['ready_s']:6.2f} s  "
                  f"{figures[kind]['loading_s']:6.2f} s")
        if args.json:
            print(json.dumps({"models": names, "runs": times, "median": figures}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
