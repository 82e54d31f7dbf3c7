"""A pipeline whose source reached its end counts as finished on `systemctl status`, not as
running: a real daemon reads two sensor lines from its stdin, which then ends (under
systemd stdin is /dev/null), and its STATUS= on a real NOTIFY_SOCKET says so."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

from tests.conftest import wait_until

LINES = "1,2,3,4\\n5,6,7,8\\n"


def status_lines(sock: socket.socket) -> list[str]:
    found = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return found
        found += [line for line in data.decode().splitlines() if line.startswith("STATUS=")]


def test_a_pipeline_at_the_end_of_its_input_counts_as_finished(start_daemon, tiny_store, short_dir: Path):
    address = short_dir / "notify"
    results = short_dir / "results.jsonl"
    config = {"pipelines": {"input": {"model": "tiny", "source": {"kind": "stdin", "channels": 4},
                                      "sinks": [{"kind": "jsonl", "path": str(results)}]}}}
    # What runs `-m edged run ...`: a shell that gives it two lines on stdin, then its end.
    launcher = ["sh", "-c", f'printf "{LINES}" | exec "$0" "$@"', sys.executable]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(address))
        notify.setblocking(False)
        daemon = start_daemon(tiny_store.root, config, {"NOTIFY_SOCKET": str(address)}, launcher=launcher)
        with daemon.client() as client:
            wait_until(lambda: client.pipelines()["input"]["state"] == "finished", what="the end of stdin")
        last = json.loads(results.read_text().splitlines()[-1])
        assert last["outputs"]["y"]["data"] == [11.0, 13.0, 15.0, 17.0]  # relu(2x + 1) of the last line
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while not any("pipelines" in line for line in seen[-1:]) or "finished" not in seen[-1]:
            assert time.monotonic() < deadline, f"no status line with the finished pipeline: {seen}"
            seen += status_lines(notify)
            time.sleep(0.05)
    assert seen[-1] == "STATUS=serving 1 model (tiny 1 openvino); 0 of 1 pipelines running, 1 finished"
