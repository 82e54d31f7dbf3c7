"""edged under systemd, as systemd drives it: a real datagram socket as NOTIFY_SOCKET, a
listening socket passed as fd 3 with LISTEN_FDS, real signals, the daemon as a subprocess.

No journald runs in the test container, so the journal is tested up to the socket: the
decision (JOURNAL_STREAM against the real stderr of a real process), the fields built from
real log records, and the daemon falling back to plain lines when the journal is away.
Sending to a real journald is tested only where one runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest

from edged.client import Client, ClientError
from edged.config import Settings
from edged.errors import EdgedError
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.systemd import JOURNAL_SOCKET, JournalHandler
from tests.broker import Broker
from tests.conftest import (
    DaemonProcess,
    build_slow_ir,
    build_tiny_ir,
    daemon_settings,
    ir_files,
    to_toml,
    wait_until,
)

X = np.array([[1, 2, -3, 0.5]], np.float32)
WATCHDOG_USEC = 2_000_000  # WatchdogSec=2s: a ping every second, a check must finish in 0.5 s
# What systemd does between fork and exec: the socket on fd 3, LISTEN_PID = the daemon's own pid.
ACTIVATE = (
    "import os, sys; fd = int(sys.argv[1])\n"
    "if fd != 3:\n    os.dup2(fd, 3); os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


class Notifications:
    """The datagram socket NOTIFY_SOCKET names, bound by the test as systemd binds its own,
    and read all the time as systemd reads it (a full queue would slow the daemon down)."""

    def __init__(self, address: str) -> None:  # a path, or "@name" for an abstract socket
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[list[str]] = []  # each datagram's lines, in order of arrival
        self.daemon: DaemonProcess | None = None
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()

    def _read(self) -> None:
        while not self._closed.is_set():
            if select.select([self.sock], [], [], 0.05)[0]:
                self.drain()

    def drain(self) -> list[list[str]]:
        """Whatever arrived since the last look: a datagram is in the queue once sent."""
        with self._lock:
            start = len(self.messages)
            while True:
                try:
                    data = self.sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return self.messages[start:]
                self.messages.append(data.decode().split("\n"))

    def wait_for(self, prefix: str, after: int = 0, timeout: float = 90.0) -> int:
        """The index of the first message from `after` on with a line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        looked = after
        while True:
            self.drain()
            for index in range(looked, len(self.messages)):
                if any(line.startswith(prefix) for line in self.messages[index]):
                    return index
            looked = len(self.messages)
            daemon = self.daemon
            if daemon is not None and daemon.proc.poll() is not None:
                self.drain()
                raise AssertionError(f"the daemon exited with {daemon.proc.returncode} before {prefix!r}; "
                                     f"got {self.messages}\n{daemon.output()}")
            assert time.monotonic() < deadline, f"no {prefix!r} in {timeout} s; got {self.messages[after:]}"
            time.sleep(0.02)

    def mark(self) -> int:
        """The index the next message will have: everything sent until now is before it."""
        with self._lock:
            self.drain()
            return len(self.messages)

    def lines(self, start: int = 0, end: int | None = None) -> list[str]:
        return [line for message in self.messages[start:end] for line in message]


@pytest.fixture
def notifications(short_dir: Path):
    made: list[Notifications] = []

    def make(abstract: bool = False) -> Notifications:
        address = f"@edged-test-{uuid.uuid4().hex[:16]}" if abstract else str(short_dir / f"n{len(made)}")
        made.append(Notifications(address))
        return made[-1]

    yield make
    for n in made:
        n.close()


def start_notified(start_daemon, notify: Notifications, store: Path, config: dict | None = None,
                   env: dict | None = None, **spawn) -> DaemonProcess:
    daemon = start_daemon(store, config, {"NOTIFY_SOCKET": notify.address, **(env or {})}, ready=False,
                          **spawn)
    notify.daemon = daemon
    return daemon


@pytest.fixture(scope="module")
def slow_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_slow_ir(tmp_path_factory.mktemp("slow-ir"))


@pytest.fixture
def slow_store(tiny_store: ModelStore, slow_ir: Path) -> ModelStore:
    """tiny and slow, version 1 of each active."""
    tiny_store.add("slow", ir_files(slow_ir), "1")
    tiny_store.activate("slow", "1")
    return tiny_store



# --- READY, STATUS, STOPPING ------------------------------------------------------------
def test_ready_comes_when_the_socket_answers_then_status_lines_and_stopping(
        start_daemon, sample_store, notifications, broker: Broker, tmp_path):
    notify = notifications()
    mqtt = {"enabled": True, "host": broker.host, "port": broker.port, "device_id": "cam-1",
            "outbox_path": str(tmp_path / "outbox.db"), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    daemon = start_notified(start_daemon, notify, sample_store.root, {"mqtt": mqtt})
    ready = notify.wait_for("READY=1")
    with daemon.client() as client:  # from the moment READY=1 arrives, the socket answers
        assert client.ready()
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)
    before = notify.lines(0, ready)
    assert before[0] == "STATUS=loading 3 models"
    assert not [line for line in before if not line.startswith("STATUS=")]  # no READY, no WATCHDOG
    status = notify.messages[ready][1]
    assert re.fullmatch(r"STATUS=serving 3 models \(face 1 \w+, selfie 1 litert, tiny 1 openvino\); "
                        r"MQTT (not )?connected", status), status
    connected = notify.wait_for("STATUS=serving 3 models", after=ready)
    while not notify.messages[connected][-1].endswith("; MQTT connected"):  # told when it changes
        connected = notify.wait_for("STATUS=serving 3 models", after=connected + 1)
    assert "WATCHDOG=1" not in notify.lines()  # no WATCHDOG_USEC: no checks, no pings

    daemon.proc.send_signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING=1", after=connected)
    assert daemon.proc.wait(timeout=60) == 0
    notify.drain()
    assert notify.messages[stopping] == ["STOPPING=1", "STATUS=stopping"]
    assert notify.messages[stopping + 1:] == []  # nothing after STOPPING=1, READY=1 least of all


def test_told_to_stop_while_loading_it_never_says_ready(start_daemon, slow_store, notifications):
    notify = notifications()  # (compiling and probing slow takes a good second: SIGTERM comes meanwhile)
    daemon = start_notified(start_daemon, notify, slow_store.root)
    notify.wait_for("STATUS=loading")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=120) == 0
    notify.drain()
    lines = notify.lines()
    assert "READY=1" not in lines and lines[-2:] == ["STOPPING=1", "STATUS=stopping"]


def test_a_notify_socket_nobody_reads_never_stalls_the_daemon(start_daemon, tiny_store, short_dir):
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # its queue fills, then sends wait
    unread.bind(str(short_dir / "unread"))
    try:
        daemon = start_daemon(tiny_store.root, env={"NOTIFY_SOCKET": str(short_dir / "unread"),
                                                    "WATCHDOG_USEC": "400000"})  # 5 pings a second
        wait_until(lambda: "cannot notify systemd" in daemon.output(), what="the queue to fill")
        with daemon.client() as client:  # a send waiting on the queue holds no lock inference needs
            for _ in range(20):
                assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)
        assert daemon.stop() == 0
    finally:
        unread.close()


# --- reload -----------------------------------------------------------------------------
def test_sighup_reloads_applies_pipelines_reports_the_rest_and_keeps_a_broken_config_out(
        start_daemon, tiny_store, notifications, tmp_path):
    notify = notifications(abstract=True)  # an abstract NOTIFY_SOCKET, like systemd's own
    daemon = start_notified(start_daemon, notify, tiny_store.root)
    first_ready = notify.wait_for("READY=1")
    assert notify.messages[first_ready][1] == "STATUS=serving 1 model (tiny 1 openvino)"
    data, out = tmp_path / "sensor.csv", tmp_path / "results.jsonl"
    data.write_text("1,2,3,4\n" * 3)
    config = tomllib.loads(daemon.config_path.read_text())
    config["pipelines"] = {"sensor": {
        "model": "tiny", "source": {"kind": "file", "uri": str(data), "channels": 4, "from_start": True},
        "sinks": [{"kind": "jsonl", "path": str(out)}]}}
    config["socket"]["path"] = str(tmp_path / "elsewhere.sock")
    daemon.config_path.write_text(to_toml(config))

    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", after=first_ready + 1)
    assert notify.messages[reloading][1].startswith("MONOTONIC_USEC=")
    ready = notify.wait_for("READY=1", after=reloading + 1)
    assert notify.messages[ready][1] == ("STATUS=serving 1 model (tiny 1 openvino); "
                                         "1 of 1 pipelines running; restart needed for: socket")
    wait_until(lambda: out.exists() and out.read_text().endswith("\n"), what="a pipeline result")
    record = json.loads(out.read_text().splitlines()[-1])  # (windows read at once: the newest one)
    assert record["outputs"]["y"]["data"] == [3.0, 5.0, 7.0, 9.0]  # relu(2x + 1) of the sensor's line
    with daemon.client() as client:  # still on the socket it was started with
        assert client.pipelines()["sensor"]["state"] == "running"
    assert "config reloaded: applied pipelines; needs a restart: socket" in daemon.output()

    daemon.config_path.write_text("[socket\n")  # a config that does not load changes nothing
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", after=ready + 1)
    ready = notify.wait_for("READY=1", after=reloading + 1)
    assert "1 of 1 pipelines running" in notify.messages[ready][1]
    errors = [line for line in daemon.output().splitlines() if "config not reloaded" in line]
    assert len(errors) == 1 and "nothing changed" in errors[0] and "invalid TOML" in errors[0]
    with daemon.client() as client:
        assert client.pipelines()["sensor"]["state"] == "running"
        assert client.infer("tiny", {"x": X})["y"].tolist() == [[3.0, 5.0, 0.0, 2.0]]
    assert daemon.stop() == 0


# --- socket activation ------------------------------------------------------------------
def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


def start_activated(start_daemon, store: Path, sock: socket.socket, notify: Notifications,
                    path: Path) -> DaemonProcess:
    return start_notified(
        start_daemon, notify, store, {"socket": {"path": str(path)}},
        {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "edged.socket"},
        launcher=[sys.executable, "-c", ACTIVATE, str(sock.fileno())], pass_fds=(sock.fileno(),),
    )


def test_socket_activation_serves_the_passed_socket_which_outlives_the_daemon(
        start_daemon, tiny_store, notifications, short_dir):
    path = short_dir / "api.sock"
    listener = listening_socket(path)
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        notify = notifications()
        first = start_activated(start_daemon, tiny_store.root, listener, notify, path)
        notify.wait_for("READY=1")
        with Client(path) as client:
            assert client.infer("tiny", {"x": X})["y"].tolist() == [[3.0, 5.0, 0.0, 2.0]]
        assert "(socket from systemd)" in first.output()
        assert first.stop() == 0
        assert path.is_socket()  # systemd's socket: never unlinked by the daemon
        waiting.connect(str(path))  # queued in the backlog while no edged runs
        waiting.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: edged\r\n\r\n")

        second_notify = notifications()
        second = start_activated(start_daemon, tiny_store.root, listener, second_notify, path)
        second_notify.wait_for("READY=1")
        waiting.settimeout(60)
        assert waiting.recv(4096).startswith(b"HTTP/1.1 200 OK")  # answered by the next edged
        assert second.stop() == 0
    finally:
        waiting.close()
        listener.close()


def test_socket_activation_refuses_a_socket_that_is_not_a_listening_stream(
        start_daemon, tiny_store, notifications, short_dir):
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    datagram.bind(str(short_dir / "dgram.sock"))
    try:
        daemon = start_activated(start_daemon, tiny_store.root, datagram, notifications(),
                                 short_dir / "dgram.sock")
        assert daemon.proc.wait(timeout=60) == 2
    finally:
        datagram.close()
    assert ("socket activation: fd 3 (edged.socket) is not a listening AF_UNIX stream socket"
            in daemon.output())


# --- the watchdog -----------------------------------------------------------------------
def test_watchdog_pings_stop_while_inference_is_stuck_and_resume(
        start_daemon, slow_store, notifications):
    notify = notifications()
    daemon = start_notified(start_daemon, notify, slow_store.root, {"backends": {"workers": 1}},
                            {"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    ready = notify.wait_for("READY=1")
    ping = ready
    for _ in range(3):  # healthy: pings
        ping = notify.wait_for("WATCHDOG=1", after=ping + 1)

    # Hold slow's only worker with one long request: the check queues behind it.
    with daemon.client(timeout=300) as client:
        rows = 512
        started = time.monotonic()
        client.infer("slow", {"x": np.zeros([rows, 1], np.float32)})
        rows = min(int(rows * 12 / (time.monotonic() - started)) + 1, 20_000)  # about 12 s
    outcome: dict[str, object] = {}

    def long_request() -> None:
        with daemon.client(timeout=300) as slow_client:
            outcome["y"] = slow_client.infer("slow", {"x": np.zeros([rows, 1], np.float32)})["y"]

    holder = threading.Thread(target=long_request)
    before_stuck = notify.mark()
    holder.start()
    with daemon.client() as client:  # the API answers on: only inference is stuck

        def check_running() -> float:
            assert holder.is_alive(), "the long request ended before the check was overdue: make it longer"
            return client.status()["watchdog"]["check_running_s"]

        deadline = WATCHDOG_USEC / 4e6
        wait_until(lambda: check_running() > deadline, what="the check to be overdue")
        overdue_from = notify.mark()
        wait_until(lambda: check_running() >= WATCHDOG_USEC / 1e6, what="a whole WatchdogSec stuck")
        now = notify.mark()
        assert "WATCHDOG=1" not in notify.lines(overdue_from, now)  # systemd would restart the daemon now
        # The STATUS= line changes with the whole seconds stuck, so on a loaded machine its
        # first change can come before this test saw the check overdue: look from the start.
        # The main loop sends it on its next tick (once a second), which a loaded machine may
        # delay past `now`: wait for it while the request still holds the worker.
        wait_until(lambda: any(
            line.startswith("STATUS=") and "; inference stuck for" in line
            for line in notify.lines(before_stuck, notify.mark())), what="STATUS= saying inference is stuck")
    holder.join(timeout=300)
    assert "y" in outcome, f"the long request ({rows} rows) did not end:\n{daemon.output()}"
    assert outcome["y"].shape == (rows,)

    resumed = notify.wait_for("WATCHDOG=1", after=overdue_from)
    resumed = notify.wait_for("WATCHDOG=1", after=resumed + 1)
    status_lines = [line for line in notify.lines(overdue_from) if line.startswith("STATUS=")]
    assert "stuck" not in status_lines[-1]
    with daemon.client() as client:
        watchdog = client.status()["watchdog"]
    assert watchdog["enabled"] and watchdog["late_checks"] >= 1 and watchdog["ping_interval_s"] == 1.0


# --- SIGTERM under load -----------------------------------------------------------------
def test_sigterm_under_load_answers_every_request_that_got_a_connection(start_daemon, slow_store):
    daemon = start_daemon(slow_store.root, {"backends": {"workers": 1}})
    x = {"x": np.zeros([128, 1], np.float32)}
    term_sent = threading.Event()
    lock = threading.Lock()
    counts = {"answered": 0, "answered_after_term": 0, "refused": 0}
    failures: list[str] = []

    def hammer(keep_alive: bool) -> None:
        client = daemon.client(timeout=120)
        try:
            while True:
                if not keep_alive:
                    client.close()  # a new connection for every request
                try:
                    y = client.infer("slow", x)["y"]
                except ClientError as exc:
                    failures.append(f"answered with an error: {exc}")
                    return
                except EdgedError as exc:
                    if "cannot connect" not in str(exc):
                        failures.append(str(exc))
                    with lock:
                        counts["refused"] += 1
                    return  # the socket is gone: the daemon stopped taking connections
                except Exception as exc:  # a reset, a connection closed without an answer
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                if y.shape != (128,):
                    failures.append(f"wrong answer {y.shape}")
                with lock:
                    counts["answered"] += 1
                    counts["answered_after_term"] += term_sent.is_set()
        finally:
            client.close()

    threads = [threading.Thread(target=hammer, args=(i >= 4,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: counts["answered"] >= 12 or failures, what="requests under way")
    daemon.proc.send_signal(signal.SIGTERM)
    term_sent.set()
    for t in threads:
        t.join(timeout=120)
    assert daemon.proc.wait(timeout=60) == 0
    assert failures == []
    assert counts["refused"] == 6  # every client ended at a refused connect, never a lost request
    assert counts["answered_after_term"] >= 1  # requests in flight at SIGTERM were answered


# --- one instance -----------------------------------------------------------------------
def test_a_second_instance_on_the_same_socket_or_store_refuses_to_start(start_daemon, tiny_store, tmp_path):
    first = start_daemon(tiny_store.root)
    pid = first.proc.pid
    same_socket = start_daemon(tiny_store.root, {"socket": {"path": str(first.socket)}}, ready=False)
    assert same_socket.proc.wait(timeout=60) == 1
    assert f"edged: another process is serving on {first.socket} (edged, pid {pid})" in same_socket.output()
    other = ModelStore(tmp_path / "other")
    other.add("tiny", ir_files(build_tiny_ir(tmp_path / "ir")), "1")
    same_socket_other_store = start_daemon(other.root, {"socket": {"path": str(first.socket)}}, ready=False)
    assert same_socket_other_store.proc.wait(timeout=60) == 1
    assert f"another process is serving on {first.socket}" in same_socket_other_store.output()
    same_store = start_daemon(tiny_store.root, ready=False)
    assert same_store.proc.wait(timeout=60) == 1
    assert (f"edged: another process is using the model store {tiny_store.root} (edged, pid {pid})"
            in same_store.output())
    with first.client() as client:  # the first one is untouched
        assert client.infer("tiny", {"x": X})["y"].shape == (1, 4)
    assert first.stop() == 0
    again = start_daemon(tiny_store.root, {"socket": {"path": str(first.socket)}})  # locks went with it
    with again.client() as client:
        assert client.ready()


# --- the journal ------------------------------------------------------------------------
def journal_decision(journal_stream: str | None, stderr: Path) -> str:
    """What a real process decides about its real stderr (a file here)."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    code = ("from edged import systemd\n"
            "print(systemd.stderr_is_journal(), type(systemd.journald_handler()).__name__)")
    with stderr.open("wb") as err:
        done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, env=env,
                              timeout=60, check=True)
    return done.stdout.decode().strip()


JOURNALD = JOURNAL_SOCKET.exists()  # not in the test container


def test_journal_is_used_only_when_stderr_is_the_journal_stream(tmp_path):
    stderr = tmp_path / "stderr"
    stderr.touch()
    st = stderr.stat()
    # Without journald's socket libsystemd would drop the entries: plain lines on stderr then.
    assert journal_decision(f"{st.st_dev}:{st.st_ino}", stderr) == (
        "True JournalHandler" if JOURNALD else "True StreamHandler")
    assert journal_decision(f"{st.st_dev}:{st.st_ino + 1}", stderr) == "False StreamHandler"
    assert journal_decision("garbage", stderr) == "False StreamHandler"
    assert journal_decision(None, stderr) == "False StreamHandler"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_journal_fields_come_from_the_manager_log_lines(tmp_path, tiny_ir):
    store = ModelStore(tmp_path / "store")
    store.add("tiny", ir_files(tiny_ir), "1")
    store.activate("tiny", "1")
    broken = build_tiny_ir(tmp_path / "broken", name="broken")
    store.add("broken", ir_files(broken), "1")
    store.activate("broken", "1")
    (store.version_dir("broken", "1") / "broken.bin").write_bytes(b"\0" * 16)
    records = Records()
    logger = logging.getLogger("edged.models.manager")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        manager = ModelManager(store, Settings(store={"path": store.root},
                                               backends={"openvino_cache_dir": tmp_path / "cache"}))
        manager.load_all()
        manager.close()
    finally:
        logger.removeHandler(records)
        logger.setLevel(logging.NOTSET)
    handler = JournalHandler()
    loaded = next(handler.fields(r) for r in records.records if "serving on" in r.getMessage())
    assert loaded["MODEL"] == "tiny" and loaded["VERSION"] == "1"
    assert loaded["MESSAGE"].startswith("tiny 1 serving on openvino")
    assert loaded["PRIORITY"] == "6" and loaded["SYSLOG_IDENTIFIER"] == "edged"
    assert loaded["LOGGER"] == "edged.models.manager" and loaded["CODE_FUNC"] == "_load"
    assert "PIPELINE" not in loaded
    failed = next(handler.fields(r) for r in records.records if "cannot serve" in r.getMessage())
    assert (failed["MODEL"], failed["VERSION"], failed["PRIORITY"]) == ("broken", "1", "3")


def test_journal_fields_of_a_pipeline_record():
    record = logging.getLogger("edged.pipelines.runner").makeRecord(
        "edged.pipelines.runner", logging.WARNING, __file__, 1, "pipeline %s degraded: %s",
        ("door", "frozen picture"), None, extra={"PIPELINE": "door", "MODEL": "face"})
    fields = JournalHandler().fields(record)
    assert fields["MESSAGE"] == "pipeline door degraded: frozen picture"
    assert (fields["PIPELINE"], fields["MODEL"], fields["PRIORITY"]) == ("door", "face", "4")
    assert "VERSION" not in fields


def test_the_daemon_logs_to_the_journal_only_through_its_socket(tiny_store, short_dir):
    """JOURNAL_STREAM names the daemon's real stderr: its entries go to journald's socket when
    there is one; without one (as in this container) they stay plain lines on stderr."""
    log_path = short_dir / "daemon.log"  # DaemonProcess truncates it: the same inode stays its stderr
    log_path.touch()
    st = log_path.stat()
    settings = daemon_settings(short_dir, tiny_store.root, None)
    with DaemonProcess(short_dir, settings, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) as daemon:
        daemon.wait_ready()
    assert daemon.proc.returncode == 0
    serving = [line for line in log_path.read_text().splitlines() if "tiny 1 serving on openvino" in line]
    if JOURNALD:
        assert serving == []
    else:
        assert len(serving) == 1 and " INFO edged.models.manager: tiny 1 serving on" in serving[0]


@pytest.mark.skipif(not shutil.which("journalctl") or not JOURNALD,
                    reason="no journald runs here: the entry cannot be read back")
def test_an_entry_reaches_a_real_journal_with_its_fields():
    marker = uuid.uuid4().hex
    logger = logging.getLogger(f"edged.test.{marker}")
    logger.propagate = False
    logger.addHandler(JournalHandler())
    logger.warning("journal test %s", marker, extra={"MODEL": "face", "VERSION": "3"})

    def entries() -> list[dict]:
        out = subprocess.run(["journalctl", "-o", "json", f"LOGGER=edged.test.{marker}"],
                             capture_output=True, text=True, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    found = wait_until(entries, 10, "the entry in the journal", interval=0.2)
    assert found[0]["MODEL"] == "face" and found[0]["VERSION"] == "3"
    assert found[0]["MESSAGE"] == f"journal test {marker}"
