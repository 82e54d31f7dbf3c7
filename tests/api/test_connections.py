"""Idle, trickling and greedy clients against the daemon's event loop and worker pool
(edged/api/server.py, edged/api/workers.py): nobody locks anybody else out, and a
refused request's client reads the refusal."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import resource
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.daemon_process import wait_until

NOBODY = pwd.getpwnam("nobody")
SYSTEM_PYTHON = "/usr/bin/python3"
# A client run as `nobody`: one request, its status and the first bytes of its body on stdout.
AS_NOBODY = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(60)
sock.connect(sys.argv[1])
body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += sock.recv(65536)
print(data.split(b"\\r\\n")[0].decode(), data.split(b"\\r\\n\\r\\n", 1)[1][:200].decode())
"""


def as_nobody(socket_path: Path) -> str:
    """Run one request as the `nobody` user; its status line and body start."""
    # The system's Python: the test's own may sit where nobody can reach (a venv under /root).
    done = subprocess.run([SYSTEM_PYTHON, "-c", AS_NOBODY, str(socket_path)], user=NOBODY.pw_uid,
                          group=NOBODY.pw_gid, extra_groups=[], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout


def open_to_nobody(socket_path: Path) -> None:
    """Let `nobody` reach the socket: its directories searchable (the socket stays 0660,
    group nogroup from the config)."""
    for directory in (socket_path.parent, socket_path.parent.parent):
        os.chmod(directory, 0o711)  # noqa: S103 (search only, no listing)


def proc_status(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split(f"{field}:")[1].split()[0])


@pytest.fixture
def many_files():
    """This test process holds over a thousand sockets: lift its soft descriptor limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit on open files ({hard}) is below the 4096 this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking: a full backlog makes it wait, not fail
    sock.settimeout(30)
    return sock


def test_a_thousand_idle_and_64_trickling_connections_lock_nobody_out(start_daemon, tiny_store, many_files):
    daemon = start_daemon(tiny_store.root, config={"socket": {"group": "nogroup", "request_timeout_s": 60}})
    open_to_nobody(daemon.socket)
    pid = daemon.proc.pid
    rss_before, threads_before = proc_status(pid, "VmRSS"), proc_status(pid, "Threads")
    idle = [connect(daemon.socket) for _ in range(1000)]
    trickling = [connect(daemon.socket) for _ in range(64)]
    stop = threading.Event()

    def trickle() -> None:
        head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nX-Slow: " + b"a" * 1000
        for i in range(len(head)):
            for sock in trickling:
                sock.send(head[i : i + 1])
            if stop.wait(0.05):
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        for sock in idle[:10] + trickling[:10]:  # all were accepted, none refused with a 503
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
        reply = as_nobody(daemon.socket)
        rss_after, threads_after = proc_status(pid, "VmRSS"), proc_status(pid, "Threads")
    finally:
        stop.set()
        thread.join()
        for sock in idle + trickling:
            sock.close()
    assert reply.startswith("HTTP/1.1 200"), reply
    grown_mb = (rss_after - rss_before) / 1024
    assert grown_mb < 50, f"RSS grew {grown_mb:.1f} MB for 1064 connections"
    assert threads_after - threads_before < 10, f"threads {threads_before} -> {threads_after}"
    with daemon.client() as client:
        api = client.status()["api"]
    assert api.get("refused_connections", 0) == 0


def test_connections_per_uid_are_capped_and_another_uid_still_gets_in(start_daemon, tiny_store):
    daemon = start_daemon(tiny_store.root, config={"socket": {"group": "nogroup",
                                                              "max_connections_per_uid": 5}})
    open_to_nobody(daemon.socket)
    held = [connect(daemon.socket) for _ in range(5)]
    try:
        with connect(daemon.socket) as extra:  # refused at once: the 503 comes without a request
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"too many connections from uid 0" in answer and b"socket.max_connections_per_uid" in answer
        assert as_nobody(daemon.socket).startswith("HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()


def test_one_uids_slow_bodies_hold_at_most_half_the_workers(start_daemon, tiny_store):
    """Root sends ten heads whose bodies never come (each holds a worker until its deadline);
    nobody's request is answered while all ten still wait for theirs."""
    daemon = start_daemon(tiny_store.root, config={"socket": {"group": "nogroup", "workers": 4,
                                                              "request_timeout_s": 120}})
    open_to_nobody(daemon.socket)
    slow = [connect(daemon.socket) for _ in range(10)]
    for sock in slow:
        sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
    assert as_nobody(daemon.socket).startswith("HTTP/1.1 200")
    for sock in slow:  # still held: none was answered (nor timed out) before nobody's request
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
        sock.close()
    with daemon.client() as client:  # root's share comes back once its connections have gone
        wait_until(client.live, 30, "root served again")


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the daemon's Unix socket, as a Python program would use it."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


@pytest.mark.parametrize(("size", "headers", "status", "message"), [
    (200_000, {"Inference-Header-Content-Length": "-1"}, 400, "bad Inference-Header-Content-Length"),
    (200_000, {"Inference-Header-Content-Length": "abc"}, 400, "bad Inference-Header-Content-Length"),
    (1_900_000, {"Inference-Header-Content-Length": "1800000"}, 413, "binary extension"),
    (1_900_000, {}, 413, "binary extension"),  # all of it JSON: over max_json_bytes
    (3_000_000, {}, 413, "over the 2000000-byte limit"),  # over max_body_bytes: refused on the head
])
def test_a_request_refused_before_its_body_is_read_gets_its_error(start_daemon, tiny_store, size, headers,
                                                                   status, message):
    daemon = start_daemon(tiny_store.root, config={"socket": {"max_body_bytes": 2_000_000,
                                                              "max_json_bytes": 1_500_000}})
    connection = UnixHTTPConnection(daemon.socket)
    connection.request("POST", "/v2/models/tiny/infer", body=b"{" + b" " * (size - 1),
                       headers={"Content-Type": "application/octet-stream", **headers})
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == status and message in body["error"], body


def test_a_forbidden_model_refusal_reaches_a_client_still_sending(start_daemon, tiny_store):
    daemon = start_daemon(tiny_store.root, config={"models": {"tiny": {"allowed_users": ["nobody"]}}})
    connection = UnixHTTPConnection(daemon.socket)
    connection.request("POST", "/v2/models/tiny/infer", body=b" " * 1_000_000)
    response = connection.getresponse()
    assert response.status == 403 and b"not allowed to use model 'tiny'" in response.read()
    connection.close()


@pytest.fixture
def fifo_pipeline(tiny_store, short_dir):
    """A pipeline `p` on the tiny model, reading 4-channel lines from a FIFO."""
    fifo = short_dir / "fifo"
    os.mkfifo(fifo)
    source = {"kind": "fifo", "uri": str(fifo), "channels": 4}
    return {"pipelines": {"p": {"model": "tiny", "source": source}}}


def event_streams(daemon) -> int:
    with daemon.client() as client:
        return client.pipelines()["p"]["event_streams"]


def test_event_streams_that_are_never_sent_leave_no_subscription(start_daemon, tiny_store, fifo_pipeline):
    daemon = start_daemon(tiny_store.root, config=fifo_pipeline)
    with connect(daemon.socket) as sock:
        for _ in range(20):  # HEAD: the stream's head only, on one keep-alive connection
            sock.sendall(b"HEAD /v2/edged/pipelines/p/events HTTP/1.1\r\n\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += sock.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200")
    assert event_streams(daemon) == 0
    with connect(daemon.socket) as stream:
        stream.sendall(b"GET /v2/edged/pipelines/p/events HTTP/1.1\r\n\r\n")
        assert stream.recv(65536).startswith(b"HTTP/1.1 200")
        wait_until(lambda: event_streams(daemon) == 1, 10, "the stream's subscription")
    wait_until(lambda: event_streams(daemon) == 0, 10, "the subscription gone with its client")


def test_one_uid_holds_at_most_half_the_event_streams(start_daemon, tiny_store, fifo_pipeline):
    daemon = start_daemon(tiny_store.root, config={**fifo_pipeline, "socket": {"group": "nogroup"}})
    open_to_nobody(daemon.socket)
    streams = []
    try:
        for _ in range(32):
            sock = connect(daemon.socket)
            sock.sendall(b"GET /v2/edged/pipelines/p/events HTTP/1.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            streams.append(sock)
        with connect(daemon.socket) as extra:
            extra.sendall(b"GET /v2/edged/pipelines/p/events HTTP/1.1\r\n\r\n")
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"too many event streams from uid 0 (limit 32)" in answer
        assert as_nobody(daemon.socket).startswith("HTTP/1.1 200")  # an inference still gets a worker
    finally:
        for sock in streams:
            sock.close()


def test_time_waiting_for_a_worker_is_not_counted_against_the_request(start_daemon, tiny_store):
    """One worker per uid: a bad head whose client goes on trickling holds it while its body is
    read and dropped (up to 2 s, past the 1 s request_timeout); a whole request sent meanwhile
    waits for that worker, then is answered, not timed out."""
    daemon = start_daemon(tiny_store.root, config={"socket": {"workers": 2, "request_timeout_s": 1.0}})
    bad = connect(daemon.socket)
    bad.sendall(b"GARBAGE\r\n\r\n")
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):
            try:
                bad.send(b"x")
            except OSError:
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                       "data": [1, 2, 3, 4]}]}).encode().ljust(100_000)
        good = connect(daemon.socket)
        good.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        reply = good.recv(65536)
        good.close()
    finally:
        stop.set()
        thread.join()
        bad.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
