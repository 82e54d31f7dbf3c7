"""The socket file deleted (or replaced) under a running daemon, as a tmpfiles cleaner does it:
a real daemon subprocess, a real `os.unlink` of its socket, real clients on the same path."""

from __future__ import annotations

import grp
import os
import socket
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edged.client import Client
from tests.conftest import wait_until
from tests.mqtt.test_daemon_link import TOPICS, mqtt_config
from tests.test_systemd import ACTIVATE, Notifications, listening_socket, start_notified

X = np.array([[1, 2, -3, 0.5]], np.float32)
HELD = {"idle_timeout_s": 600}  # a connection made before the deletion stays open to ask on
# A group that is not ours, to show it is set on the socket bound again.
GROUP = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())


@pytest.fixture
def notify(short_dir: Path):
    """systemd's side of NOTIFY_SOCKET."""
    notifications = Notifications(str(short_dir / "notify"))
    yield notifications
    notifications.close()


def lines(daemon, text: str) -> list[str]:
    return [line for line in daemon.output().splitlines() if text in line]


def back(path: Path, old_inode: int) -> bool:
    """The path is a socket again, a new one."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISSOCK(found.st_mode) and found.st_ino != old_inode


def test_a_deleted_socket_is_bound_again_with_its_mode_and_group(start_daemon, tiny_store):
    daemon = start_daemon(tiny_store.root, {"socket": {"group": GROUP.gr_name}})
    path = daemon.socket
    lock = path.with_name(path.name + ".lock")
    for round_ in (1, 2):  # and again: each deletion is noticed
        before = path.lstat()
        os.unlink(path)
        if round_ == 2:  # a cleaner that takes the socket takes its lock file too
            os.unlink(lock)
        wait_until(lambda b=before: back(path, b.st_ino), what="the socket bound again")
        after = path.lstat()
        assert stat.S_IMODE(after.st_mode) == 0o660 and after.st_gid == GROUP.gr_gid
        with Client(path) as client:  # a new client, on the same path
            assert client.ready()
            assert client.infer("tiny", {"x": X})["y"].tolist() == [[3.0, 5.0, 0.0, 2.0]]
            status = client.status()
            assert status["ready"] is True and status["api"]["socket_problem"] is None
        rebound = lines(daemon, f"socket {path} was deleted under the daemon")
        assert len(rebound) == round_, daemon.output()
        assert "WARNING" in rebound[-1] and "bound it again (mode 660, group " in rebound[-1]
    wait_until(lambda: lock.exists() and lock.read_text() == f"{daemon.proc.pid}\n", what="the lock again")
    assert len(lines(daemon, f"lock file {lock} was deleted under the daemon; took it again")) == 1
    second = start_daemon(tiny_store.root, {"socket": {"path": str(path)}}, ready=False)
    assert second.proc.wait(timeout=60) == 1  # still one edged per socket
    assert f"another process is serving on {path} (edged, pid {daemon.proc.pid})" in second.output()
    assert "Traceback" not in daemon.output()
    assert daemon.stop() == 0
    assert not path.exists()  # removed at the stop, as before


def test_a_path_taken_by_another_file_is_not_ready_and_a_second_edged_says_why(
        start_daemon, tiny_store, tmp_path):
    daemon = start_daemon(tiny_store.root, {"socket": HELD})
    path = daemon.socket
    with Client(path) as held:
        assert held.ready()
        squatter = tmp_path / "not-a-socket"
        squatter.write_text("a regular file\n")
        os.replace(squatter, path)  # the socket's name now leads to a regular file
        wait_until(lambda: lines(daemon, "cannot be bound again"), what="the problem logged")
        assert held.ready() is False  # 503 on /v2/health/ready
        status = held.status()
        assert status["ready"] is False and "is not a socket" in status["api"]["socket_problem"]

        second = start_daemon(tiny_store.root, {"socket": {"path": str(path)}}, ready=False)
        assert second.proc.wait(timeout=60) == 1
        assert (f"edged (pid {daemon.proc.pid}) holds the lock of {path}, but its socket is gone: "
                f"{path} is not a socket" in second.output()), second.output()
        assert path.read_text() == "a regular file\n"  # nobody replaced what is not a socket

        time.sleep(2)  # the daemon tries again every second meanwhile ...
        assert len(lines(daemon, "cannot be bound again")) == 1  # ... and says it once
        os.unlink(path)  # whoever put the file there takes it away
        wait_until(lambda: path.is_socket(), what="the socket bound again")
        with Client(path) as client:
            assert client.ready() and client.status()["api"]["socket_problem"] is None
        assert held.ready()  # the old connection sees readiness back
    assert lines(daemon, "replaced by another file")
    assert "Traceback" not in daemon.output()
    assert daemon.stop() == 0


def test_an_activated_socket_deleted_is_not_ready_everywhere(start_daemon, tiny_store, notify, short_dir,
                                                            broker, mqtt_subscriber, tmp_path):
    """Socket activation: the daemon cannot bind systemd's socket again, so it says it is not ready
    on every surface: /v2/health/ready, the health document, MQTT health, the STATUS= line."""
    path = short_dir / "api.sock"
    listener = listening_socket(path)
    mqtt = mqtt_config(broker, tmp_path, health_interval_s=1)
    health = mqtt_subscriber(broker, f"{TOPICS}/health")
    try:
        daemon = start_notified(
            start_daemon, notify, tiny_store.root, {"socket": {"path": str(path), **HELD}, **mqtt},
            {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "edged.socket"},
            launcher=[sys.executable, "-c", ACTIVATE, str(listener.fileno())], pass_fds=(listener.fileno(),))
        notify.wait_for("READY=1")
        health.wait_for(lambda m: m.json()["ready"] is True, timeout=20)
        with Client(path) as held:
            assert held.ready()
            mark = notify.mark()
            os.unlink(path)
            wait_until(lambda: lines(daemon, "cannot be bound again"), what="the problem logged")
            assert held.ready() is False
            status = held.status()
            assert status["ready"] is False and "socket activation" in status["api"]["socket_problem"]
            notify.wait_for("STATUS=", after=mark)
            said = notify.lines(mark)
            assert any(f"socket unreachable: {path}" in line for line in said), said
            health.clear()
            reported = health.wait_for(timeout=20).json()  # the next health report over MQTT
            assert reported["ready"] is False and "socket activation" in reported["api"]["socket_problem"]
        logged = lines(daemon, "cannot be bound again")
        assert len(logged) == 1 and "ERROR" in logged[0], logged
        assert "systemctl restart edged.socket edged" in logged[0]
        assert not path.exists()  # systemd's socket: never bound by the daemon
        assert daemon.stop() == 0
    finally:
        listener.close()



def test_a_socket_another_process_put_at_the_path_is_left_to_it(start_daemon, tiny_store, short_dir):
    daemon = start_daemon(tiny_store.root, {"socket": HELD})
    path = daemon.socket
    theirs = listening_socket(short_dir / "theirs.sock")
    try:
        with Client(path) as held:
            assert held.ready()  # connected before
            os.replace(short_dir / "theirs.sock", path)  # another server now answers at the path
            wait_until(lambda: lines(daemon, "cannot be bound again"), what="the problem logged")
            assert "another process is serving on" in lines(daemon, "cannot be bound again")[0]
            assert held.ready() is False
        assert daemon.stop() == 0
        assert path.is_socket()  # not removed at the stop: it is not the daemon's
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))  # still theirs
    finally:
        theirs.close()
