"""One shutdown path, end to end: real daemon processes, real signals.

A stop asked while a model compiles ends the daemon without waiting for the compile and
without READY=1; a second SIGTERM or SIGINT while a stop hangs ends it at once; a stop
step that fails does not keep the later steps from running.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from edged.models.store import ModelStore
from edged.shutdown import TEST_FAIL_STOP_VARIABLE
from tests.conftest import build_slow_ir, ir_files, wait_until

DEVICE = "cam-1"


@pytest.fixture(scope="module")
def huge_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An IR OpenVINO takes many seconds to compile (2048 MatMuls: 9 to 14 s on a loaded
    2-core machine), far longer than a stop takes."""
    return build_slow_ir(tmp_path_factory.mktemp("huge-ir"), layers=2048)


@pytest.fixture
def huge_store(tiny_store: ModelStore, huge_ir: Path) -> ModelStore:
    tiny_store.add("huge", ir_files(huge_ir), "1")
    tiny_store.activate("huge", "1")
    return tiny_store


def received(notify: socket.socket) -> list[str]:
    """Every line sent to the NOTIFY_SOCKET so far."""
    notify.setblocking(False)
    lines = []
    while True:
        try:
            lines += notify.recv(4096).decode().splitlines()
        except BlockingIOError:
            return lines


def model_state(daemon, name: str) -> str | None:
    try:
        with daemon.client(timeout=5) as client:
            return client.status()["models"].get(name, {}).get("state")
    except Exception:  # not answering yet
        return None


def test_a_stop_while_a_model_compiles_exits_0_at_once_and_never_says_ready(
        start_daemon, huge_store, short_dir):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    try:
        daemon = start_daemon(huge_store.root, env={"NOTIFY_SOCKET": str(short_dir / "notify")},
                              ready=False)
        wait_until(lambda: model_state(daemon, "huge") == "loading", 120, "huge to be loading")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=60) == 0, daemon.output()
        lines = received(notify)
    finally:
        notify.close()
    output = daemon.output()
    assert "huge 1 serving on" not in output  # the stop did not wait for the compile
    assert "ready in" not in output and "READY=1" not in lines
    assert lines[-2:] == ["STOPPING=1", "STATUS=stopping"]
    assert "models are still loading; not waiting for them" in output
    assert not daemon.socket.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_a_stop_that_hangs(start_daemon, tiny_store, signum):
    # A client that sent the first line of a request and nothing more: the stop waits for
    # it up to request_timeout_s, an hour here.
    daemon = start_daemon(tiny_store.root, {"socket": {"request_timeout_s": 3600}})
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        slow.connect(str(daemon.socket))
        slow.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\n")
        daemon.proc.send_signal(signum)
        wait_until(lambda: "stopping" in daemon.output(), 60, "the stop to begin")
        daemon.proc.send_signal(signum)
        assert daemon.proc.wait(timeout=30) == 128 + signum, daemon.output()
    finally:
        slow.close()
    output = daemon.output()
    assert f"second {signal.Signals(signum).name} while stopping: exiting now" in output
    assert "stopped in" not in output  # the stop was still waiting for the client


@pytest.mark.parametrize("failing", ["pipelines", "socket"])
def test_a_failing_stop_step_does_not_skip_the_others(
        start_daemon, tiny_store, broker, mqtt_subscriber, tmp_path, failing):
    watcher = mqtt_subscriber(broker, f"edged/devices/{DEVICE}/status")
    mqtt = {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
            "outbox_path": str(tmp_path / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    daemon = start_daemon(tiny_store.root, {"mqtt": mqtt}, {TEST_FAIL_STOP_VARIABLE: failing})
    watcher.wait_for(lambda m: m.json()["state"] == "online", timeout=20)
    assert daemon.stop(timeout=60) == 1  # a failed step is an error
    output = daemon.output()
    assert f"stopping: {failing} failed, going on: RuntimeError: {TEST_FAIL_STOP_VARIABLE}" in output
    # The steps after it ran: MQTT said offline itself (no Last Will), the socket was removed
    # (unless that was the failing step), and the stop ended with its summary.
    assert watcher.wait_for(lambda m: m.json()["state"] == "offline").json()["reason"] == "shutdown"
    assert daemon.socket.exists() == (failing == "socket")
    assert f"; failed: {failing}" in output
