"""The Unix socket listener: one event loop holds every waiting connection; workers serve.

An idle keep-alive connection costs a file descriptor and a small buffer, not a
thread: the loop (epoll, one-shot per connection) waits on all of them, reads
request heads as they arrive, and hands a connection whose head is complete to
the worker pool (`workers.py`). A client that trickles its head, or leaks idle
connections, holds nothing but its buffers until its deadline. Caps: connections
in all and per peer uid (503 past them), and one uid's share of the workers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import select
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from edged.api.access import Peer
from edged.api.http import Connection, HTTPError, Response
from edged.api.routes import Api, error_response
from edged.api.unix_socket import (
    SOCKET_MODE,
    PathWatch,
    SocketInUse,
    bind_unix_socket,
    check_socket_path,
    resolve_group,
)
from edged.api.workers import RequestHandler, WorkerPool
from edged.config import SocketSettings

log = logging.getLogger(__name__)
SOCKET_BUFFER = 1 << 20
SWEEP_S = 0.25  # deadlines are looked at this often
STOP_GRACE_S = 1.0  # while stopping, a connection accepted from the backlog has this long to send
ARMED = select.EPOLLIN | select.EPOLLONESHOT


class ApiServer:
    def __init__(self, settings: SocketSettings, api: Api, listener: socket.socket | None = None) -> None:
        self.settings = settings
        self.api = api
        self.inherited = listener is not None
        self.listener = listener
        self.stopping = threading.Event()
        self.watch: PathWatch | None = None  # the path, checked by check_path()
        self._next: socket.socket | None = None  # bound again at the path, for the event loop
        self._epoll = select.epoll()
        self._connections: dict[int, Connection] = {}  # by fd: every open connection
        self._per_uid: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listening = False  # the listener is registered with epoll
        self._accept_paused_until = 0.0  # out of file descriptors: try again later
        self._stop_started = 0.0
        self._closing = False  # stop()'s time is up: the loop ends at once
        self._wake, self._waker = socket.socketpair()  # stop() wakes the loop through it
        self._epoll.register(self._wake.fileno(), select.EPOLLIN)
        self.pool = WorkerPool(settings.workers, self._serve)
        self._handler = RequestHandler(api, self, self.pool)

    @property
    def path(self) -> Path:
        """Where clients connect: the inherited socket's own path, else the configured one."""
        if self.inherited and self.listener is not None:
            with contextlib.suppress(OSError):
                if isinstance(name := self.listener.getsockname(), str) and name:
                    return Path(name)
        return self.settings.path

    def start(self) -> None:
        if self.listener is None:
            self.listener = bind_unix_socket(self.settings.path, self.settings.group)
        if isinstance(self.listener.getsockname(), str) and self.listener.getsockname():  # not abstract
            self.watch = PathWatch(self.path, self.settings.group, self.inherited)
        raise_file_limit(self.settings.max_connections)
        self.listener.setblocking(False)
        self._listen(True)
        self.pool.start()
        self._thread = threading.Thread(target=self._loop, name="api-loop", daemon=True)
        self._thread.start()

    def check_path(self) -> None:
        """Notice the socket's path deleted or replaced (within a second, from the daemon's
        loop), bind it again when it is ours, and keep readiness true to what clients see."""
        if self.watch is None or self.stopping.is_set():
            return
        listener = self.watch.check()
        self.api.socket_problem = self.watch.problem
        if listener is not None:
            with self._lock:
                unused, self._next = self._next, listener
            if unused is not None:  # bound again twice before the accept loop took the first
                unused.close()

    def _take_next(self) -> None:
        """On the loop: serve the listener bound again; answer what waits on the old one."""
        with self._lock:
            if self._next is None:  # stop() took it meanwhile
                return
            old, self.listener, self._next = self.listener, self._next, None
        assert old is not None
        self._listen(False, old)
        self._accept_all(old)
        old.close()
        self._listen(True)

    def _listen(self, on: bool, listener: socket.socket | None = None) -> None:
        listener = listener or self.listener
        assert listener is not None
        if on and not self._listening:
            listener.setblocking(False)
            self._epoll.register(listener.fileno(), select.EPOLLIN)
        elif not on and self._listening:
            self._epoll.unregister(listener.fileno())
        self._listening = on

    # --- the event loop -----------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException:
            if not self.stopping.is_set():  # the API is gone: say so where readiness is read
                log.exception("the socket's event loop failed; the daemon no longer answers on it")
                self.api.socket_problem = "the socket's event loop failed (see the log); restart edged"
            raise

    def _run_loop(self) -> None:
        next_sweep = 0.0
        while True:
            if self._next is not None:
                self._take_next()
            listener = self.listener
            assert listener is not None
            woken = False
            for fd, _ in self._epoll.poll(SWEEP_S):
                if fd == self._wake.fileno():
                    with contextlib.suppress(OSError):
                        self._wake.recv(64, socket.MSG_DONTWAIT)
                    woken = True
                    continue
                if fd == listener.fileno() and self._listening:
                    self._accept_all(listener)
                    continue
                conn = self._connections.get(fd)
                if conn is None or not conn.parked:  # stale: closed meanwhile, or a worker's now
                    continue
                conn.parked = False
                try:
                    self._readable(conn)
                except Exception:  # a bug costs this connection, never the loop
                    log.exception("unhandled error reading a request")
                    self.close(conn)
            if self._closing:
                return
            now = time.monotonic()
            if now >= next_sweep or woken:
                next_sweep = now + SWEEP_S
                try:
                    if self._sweep(now):
                        return
                except Exception:
                    log.exception("unhandled error looking at deadlines")

    def _accept_all(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept connections for now (%s); %d open", exc.strerror,
                                len(self._connections))
                    self._accept_paused_until = time.monotonic() + SWEEP_S
                    self._listen(False)
                elif not self.stopping.is_set():
                    log.warning("accept failed: %s", exc)
                return
            try:
                self._take(sock)
            except Exception:  # a bug (or a group lookup failing) costs this connection only
                log.exception("unhandled error taking a connection")
                sock.close()

    def _take(self, sock: socket.socket) -> None:
        """Keep an accepted connection, parked until its first request; or refuse it."""
        try:
            # Room for a whole camera frame per syscall instead of a dozen small wake-ups.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            peer = Peer.of(sock)
        except OSError:
            sock.close()
            return
        s = self.settings
        if not self.api.socket_rule.allows(peer):  # refused before it can send anything
            self.api.count("refused_peer")
            self._refuse_now(sock, 403, f"uid {peer.uid} is not allowed to use this socket")
            return
        with self._lock:
            if len(self._connections) >= s.max_connections:
                refusal = f"too many connections (limit {s.max_connections}, socket.max_connections)"
            elif self._per_uid[peer.uid] >= s.max_connections_per_uid:
                refusal = (f"too many connections from uid {peer.uid} (limit {s.max_connections_per_uid}, "
                           "socket.max_connections_per_uid)")
            else:
                refusal = None
                conn = Connection(sock, max_body=s.max_body_bytes, request_timeout=s.request_timeout_s,
                                  idle_timeout=s.idle_timeout_s)
                conn.peer = peer
                self._connections[conn.fd] = conn
                self._per_uid[peer.uid] += 1
        if refusal is not None:
            self.api.count("refused_connections")
            self._refuse_now(sock, 503, refusal)
            return
        self.park(conn)

    def _refuse_now(self, sock: socket.socket, status: int, message: str) -> None:
        """Answer a connection refused at once; a fresh socket's buffer takes it without waiting."""
        try:
            conn = Connection(sock, max_body=0, request_timeout=1.0, idle_timeout=1.0)
            with contextlib.suppress(OSError):
                conn.send(error_response(status, message), keep_alive=False)
        finally:
            sock.close()

    def _readable(self, conn: Connection) -> None:
        if not conn.receive():
            self.close(conn)
            return
        try:
            request = conn.take_head()
        except HTTPError as exc:
            self.pool.submit(conn, exc)  # answered, and its body read, on a worker
            return
        if request is None:
            self.park(conn, deadline=False)
        else:
            self.pool.submit(conn, request)

    def _sweep(self, now: float) -> bool:
        """Time out what waits too long; while stopping, end idle connections. True when done."""
        stopping = self.stopping.is_set()
        if stopping and self._listening:
            if not self.inherited:  # what waits in our backlog is answered; systemd's is the next edged's
                assert self.listener is not None
                self._accept_all(self.listener)
            self._listen(False)
        elif not self._listening and now >= self._accept_paused_until and not stopping:
            self._listen(True)
        for conn in list(self._connections.values()):
            if not conn.parked:
                continue
            idle = not conn.buffer
            if now >= conn.deadline:
                conn.parked = False
                if idle:
                    self.close(conn)
                else:
                    self.pool.submit(conn, HTTPError(408, "request not received in time"))
            elif stopping and idle and (conn.accepted < self._stop_started
                                        or now - conn.accepted > STOP_GRACE_S):
                # HTTP lets a server close an idle keep-alive connection; a request that
                # is already on its way is still read and answered.
                conn.parked = False
                self._readable(conn)
                if conn.parked and not conn.buffer:
                    conn.parked = False
                    self.close(conn)
        return stopping and not self._connections

    # --- for the workers ------------------------------------------------------------
    def _serve(self, conn: Connection, work) -> None:
        self._handler(conn, work)

    def park(self, conn: Connection, deadline: bool = True) -> None:
        """Give a connection to the loop until its next bytes arrive (or its deadline)."""
        if deadline:
            wait = conn.request_timeout if conn.buffer else conn.idle_timeout
            conn.deadline = time.monotonic() + wait
        conn.parked = True
        try:
            try:
                self._epoll.modify(conn.fd, ARMED)
            except FileNotFoundError:  # new: not registered yet
                self._epoll.register(conn.fd, ARMED)
        except (OSError, ValueError):  # closed under us, or the server stopped (epoll closed)
            conn.parked = False
            self.close(conn)

    def close(self, conn: Connection) -> None:
        with self._lock:
            if self._connections.get(conn.fd) is not conn:
                return
            del self._connections[conn.fd]
            self._per_uid[conn.peer.uid] -= 1
            if not self._per_uid[conn.peer.uid]:
                del self._per_uid[conn.peer.uid]
            with contextlib.suppress(OSError, ValueError):  # ValueError: stopped, epoll closed
                self._epoll.unregister(conn.fd)  # before close: the fd number may be reused
            conn.sock.close()
            conn.close_passed_fds()

    # --- stopping ----------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking connections and answer every request already made (up to `timeout`).

        A socket we bound is removed first, so new clients are refused, and what is
        already in its backlog is accepted and answered. An inherited one stays
        systemd's: it keeps its path and its backlog, which the next edged answers.
        An idle keep-alive connection is closed (HTTP allows it; clients retry on a
        new one); a request already sent on it is still answered, and a connection
        accepted while stopping gets its first request answered.
        """
        if not self.inherited and (self.watch is None or self.watch.owns_path()):  # not another's
            with contextlib.suppress(FileNotFoundError):
                self.settings.path.unlink()
        self._stop_started = time.monotonic()
        with self._lock:
            unused, self._next = self._next, None  # bound again just now, never served
        if unused is not None:
            unused.close()
        self.stopping.set()
        self.api.stopping.set()  # ends event streams
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._waker.send(b"x")
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            self._closing = True
            self._waker.send(b"x")
            self._thread.join(timeout=1.0)
        for conn in list(self._connections.values()):  # what did not finish in time
            self.close(conn)
        self.pool.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.api.close()  # shared-memory regions: their descriptors closed
        if self.listener is not None:
            self.listener.close()
        self._epoll.close()
        self._wake.close()
        self._waker.close()


def raise_file_limit(connections: int) -> None:
    """Let the process hold `connections` sockets: the soft descriptor limit is often 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256  # models, logs, MQTT, the store
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("the open file limit (%d) is below socket.max_connections (%d) + 256; "
                        "raise LimitNOFILE", hard, connections)


__all__ = ["SOCKET_MODE", "ApiServer", "Response", "SocketInUse", "bind_unix_socket", "check_socket_path",
           "resolve_group"]
