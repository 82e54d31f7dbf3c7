"""One shutdown path, end to end: real daemon processes, real signals.

A stop asked while a model compiles ends the daemon without waiting for the compile and
without READY=1, and is not remembered as a crash of the backend compiling; with MQTT too;
a stop while the pipelines start says neither `ready in` nor READY=1; signals are caught
before the heavy imports of `edged run`; a config reload during start-up sends no READY=1;
a second SIGTERM or SIGINT while a stop hangs ends it at once; a stop step that fails does
not keep the later steps from running.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest

from edged.models.attempts import DIRECTORY as ATTEMPTS
from edged.models.store import ModelStore
from edged.shutdown import TEST_FAIL_STOP_VARIABLE
from edged.signing import generate_key, public_key_text
from tests.conftest import build_slow_ir, ir_files, wait_until

DEVICE = "cam-1"
TOPICS = f"edged/devices/{DEVICE}"


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


def model_status(daemon, name: str) -> dict:
    try:
        with daemon.client(timeout=5) as client:
            return client.status()["models"].get(name, {})
    except Exception:  # not answering yet
        return {}


def model_state(daemon, name: str) -> str | None:
    return model_status(daemon, name).get("state")


def attempt_records(store: ModelStore) -> list[Path]:
    return sorted((store.root / ATTEMPTS).glob("*.json"))


def wait_compiling(daemon, store: ModelStore) -> None:
    """Until huge is loading and its attempt record is written: the compile has begun."""
    wait_until(lambda: model_state(daemon, "huge") == "loading" and attempt_records(store),
                    120, "huge to be compiling")


@pytest.fixture
def notify_socket(short_dir: Path):
    """A NOTIFY_SOCKET to hand a daemon (env) and `received` to read what it sent."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    yield notify, {"NOTIFY_SOCKET": str(short_dir / "notify")}
    notify.close()


def stop_line(output: str) -> str:
    [line] = re.findall(r"stopped in .*", output)
    return line


def test_a_stop_while_a_model_compiles_exits_0_at_once_never_says_ready_and_is_no_crash(
        start_daemon, huge_store, notify_socket):
    notify, env = notify_socket
    daemon = start_daemon(huge_store.root, env=env, ready=False)
    wait_compiling(daemon, huge_store)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=60) == 0, daemon.output()
    lines = received(notify)
    output = daemon.output()
    assert "huge 1 serving on" not in output  # the stop did not wait for the compile
    assert "ready in" not in output and "READY=1" not in lines
    assert lines[-2:] == ["STOPPING=1", "STATUS=stopping"]
    assert "models are still loading; not waiting for them" in output
    assert not daemon.socket.exists()
    # A stop is not a crash: the record of the abandoned compile went with the process, and
    # the next start compiles huge on openvino again instead of skipping it.
    assert attempt_records(huge_store) == []
    again = start_daemon(huge_store.root, ready=False)
    wait_until(lambda: model_state(again, "huge") in ("ready", "failed"), 300, "huge to load again")
    status = model_status(again, "huge")
    assert status["state"] == "ready" and status["backend"] == "openvino", status
    assert "skipped" not in status and "crashed the daemon" not in again.output()


def test_a_stop_while_a_model_compiles_with_mqtt_exits_0(start_daemon, huge_store, broker, tmp_path):
    # MQTT's parts were started, its link not yet (it connects once the models are loaded):
    # each stops without having started, and the outbox is closed.
    mqtt = {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
            "outbox_path": str(tmp_path / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    updates = {"enabled": True, "public_keys": [public_key_text(generate_key())]}
    daemon = start_daemon(huge_store.root, {"mqtt": mqtt, "updates": updates}, ready=False)
    wait_compiling(daemon, huge_store)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=60) == 0, daemon.output()
    output = daemon.output()
    assert "failed" not in stop_line(output), output
    assert "Traceback" not in output and attempt_records(huge_store) == []


def pipeline_into_fifo(tmp_path: Path) -> tuple[dict, Path]:
    """A pipeline whose JSONL sink is a FIFO: starting it opens the FIFO for writing, which
    holds the daemon's start in `start_enabled` until the test opens it for reading."""
    data, fifo = tmp_path / "sensor.csv", tmp_path / "results.fifo"
    data.write_text("1,2,3,4\n")
    os.mkfifo(fifo)
    return {"sensor": {"model": "tiny", "sinks": [{"kind": "jsonl", "path": str(fifo)}],
                       "source": {"kind": "file", "uri": str(data), "channels": 4, "from_start": True}}}, fifo


def test_a_stop_while_the_pipelines_start_says_neither_ready_in_nor_ready(
        start_daemon, tiny_store, notify_socket, tmp_path):
    notify, env = notify_socket
    pipelines, fifo = pipeline_into_fifo(tmp_path)
    daemon = start_daemon(tiny_store.root, {"pipelines": pipelines}, env, ready=False)
    wait_until(lambda: model_state(daemon, "tiny") == "ready", 60, "tiny to be loaded")
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM received" in daemon.output(), 60, "the stop to be asked")
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the pipeline's start goes on
    try:
        assert daemon.proc.wait(timeout=60) == 0, daemon.output()
    finally:
        os.close(reader)
    output, lines = daemon.output(), received(notify)
    assert "pipeline sensor: " in output  # the stop came while the pipelines started
    assert "ready in" not in output and "READY=1" not in lines
    assert "failed" not in stop_line(output)


def test_signals_are_caught_before_the_heavy_imports(start_daemon, tiny_store):
    daemon = start_daemon(tiny_store.root, ready=False)
    status, maps = Path(f"/proc/{daemon.proc.pid}/status"), Path(f"/proc/{daemon.proc.pid}/maps")

    def sigterm_caught() -> bool:
        [caught] = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:")]
        return bool(int(caught, 16) & 1 << (signal.SIGTERM - 1))

    wait_until(sigterm_caught, 60, "SIGTERM to be caught", interval=0)
    loaded = maps.read_text()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=60) == 0, daemon.output()
    # Caught before numpy or pydantic were imported (their libraries not mapped yet), and
    # the stop ran: no start, a clean stop.
    assert "numpy" not in loaded and "pydantic_core" not in loaded
    output = daemon.output()
    assert "ready in" not in output and "failed" not in stop_line(output), output


def test_a_config_reload_during_start_up_sends_no_ready(
        start_daemon, tiny_store, broker, mqtt_subscriber, notify_socket, tmp_path):
    notify, env = notify_socket
    pipelines, fifo = pipeline_into_fifo(tmp_path)
    mqtt = {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
            "outbox_path": str(tmp_path / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    watcher = mqtt_subscriber(broker, f"{TOPICS}/status")
    daemon = start_daemon(tiny_store.root, {"mqtt": mqtt, "pipelines": pipelines}, env, ready=False)
    # Online: the models are loaded, and the start waits in the pipeline's FIFO.
    watcher.wait_for(lambda m: m.json()["state"] == "online", timeout=60)
    operator = mqtt_subscriber(broker, None)
    reply = operator.request(f"{TOPICS}/cmd", {"command": "config.reload"}, timeout=30)
    assert reply["ok"] and reply["result"] == {"applied": [], "needs_restart": []}, reply
    lines = received(notify)
    assert "READY=1" not in lines and "RELOADING=1" not in lines, lines
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the start goes on: READY=1, once
    try:
        daemon.wait_ready()

        def ready_sent() -> bool:
            lines.extend(received(notify))
            return "READY=1" in lines

        wait_until(ready_sent, 30, "READY=1")
        assert lines.count("READY=1") == 1 and "RELOADING=1" not in lines, lines
        assert daemon.stop(timeout=60) == 0
    finally:
        os.close(reader)


@pytest.mark.parametrize("mqtt", [False, True])
def test_the_status_sections_keep_their_order(start_daemon, tiny_store, broker, tmp_path, mqtt):
    config = {"mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "device_id": DEVICE,
                       "outbox_path": str(tmp_path / "outbox.db")}} if mqtt else {}
    daemon = start_daemon(tiny_store.root, config)
    with daemon.client() as client:
        keys = list(client.status())
    expected = ["pipelines", "api", "commands", "updates", "mqtt", "watchdog"] if mqtt else \
        ["pipelines", "api", "mqtt", "watchdog"]
    assert [key for key in keys if key in expected] == expected, keys


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
        wait_until(lambda: "edged: stopping" in daemon.output(), 60, "the stop to begin")
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
