"""Honest metrics: the daemon's own inferences (the watchdog's check, an update's self-test)
run the real path on the real model but are counted apart, so `requests`, `errors` and the
latency histogram describe clients only. A real daemon subprocess, a real notify socket."""

from __future__ import annotations

import socket

import numpy as np

from tests.conftest import wait_until

X = np.array([[1, 2, -3, 0.5]], np.float32)
CLIENT_REQUESTS = 5


def sample(metrics: str, name: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(f'{name}{{model="tiny"}} '))
    return float(line.split()[-1])


def test_watchdog_checks_are_counted_apart_from_client_requests(start_daemon, tiny_store, short_dir):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's side, drained below
    notify.bind(str(short_dir / "notify"))
    notify.setblocking(False)
    try:
        daemon = start_daemon(tiny_store.root, env={"NOTIFY_SOCKET": str(short_dir / "notify"),
                                                    "WATCHDOG_USEC": "400000"})  # a check every 0.2 s
        with daemon.client() as client:
            for _ in range(CLIENT_REQUESTS):
                client.infer("tiny", {"x": X})
            wait_until(lambda: client.status()["models"]["tiny"]["internal"]["requests"] >= 10,
                       what="ten watchdog checks")
            tiny = client.status()["models"]["tiny"]
            metrics = client.metrics()
    finally:
        pings = 0
        try:
            while True:
                pings += b"WATCHDOG=1" in notify.recv(4096)
        except BlockingIOError:
            notify.close()
    assert pings > 0  # the checks passed, so the watchdog was pinged
    assert (tiny["requests"], tiny["errors"], tiny["rejected"]) == (CLIENT_REQUESTS, 0, 0)
    assert tiny["internal"]["requests"] >= 10 and tiny["internal"]["errors"] == 0
    assert sample(metrics, "edged_inference_seconds_count") == CLIENT_REQUESTS  # client latencies only
