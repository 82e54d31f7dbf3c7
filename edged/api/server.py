"""The Unix socket listener: binds safely, caps connections, one thread each.

A thread per connection keeps a request on the fast path (blocking recv,
inference with the GIL released, sendall) and isolates slow clients: a
client that trickles bytes only ever holds its own thread, until its
deadline. Past `max_connections`, new connections get 503 and are closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

from edged.api.access import Peer
from edged.api.http import ClientGone, Connection, HTTPError, Response
from edged.api.routes import Api, error_response
from edged.api.unix_socket import (
    SOCKET_MODE,
    PathWatch,
    SocketInUse,
    bind_unix_socket,
    check_socket_path,
    resolve_group,
)
from edged.config import SocketSettings

log = logging.getLogger(__name__)
SOCKET_BUFFER = 1 << 20


class ApiServer:
    def __init__(self, settings: SocketSettings, api: Api, listener: socket.socket | None = None) -> None:
        self.settings = settings
        self.api = api
        self.inherited = listener is not None
        self.listener = listener
        self._connections: dict[socket.socket, Connection | None] = {}
        self._reused: set[socket.socket] = set()  # kept alive after a response
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.watch: PathWatch | None = None  # the path, checked by check_path()
        self._next: socket.socket | None = None  # bound again at the path, for the accept loop

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
        self.listener.settimeout(0.25)
        self._thread = threading.Thread(target=self._accept_loop, name="api-accept", daemon=True)
        self._thread.start()

    def check_path(self) -> None:
        """Notice the socket's path deleted or replaced (within a second, from the daemon's
        loop), bind it again when it is ours, and keep readiness true to what clients see."""
        if self.watch is None or self._stopping.is_set():
            return
        listener = self.watch.check()
        self.api.socket_problem = self.watch.problem
        if listener is not None:
            listener.settimeout(0.25)
            with self._lock:
                unused, self._next = self._next, listener
            if unused is not None:  # bound again twice before the accept loop took the first
                unused.close()

    def _take_next(self) -> None:
        """On the accept thread: serve the listener bound again; answer what waits on the old one."""
        with self._lock:
            if self._next is None:  # stop() took it meanwhile
                return
            old, self.listener, self._next = self.listener, self._next, None
        assert old is not None
        old.setblocking(False)
        with contextlib.suppress(OSError):
            while True:
                self._take(old.accept()[0])
        old.close()

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while True:
            if self._next is not None:
                self._take_next()
            draining = self._stopping.is_set()
            if draining and self.inherited:
                return  # what waits in the backlog is for the next edged systemd starts
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except BlockingIOError:  # draining, and the backlog is empty
                return
            except OSError as exc:
                if draining:
                    return
                log.warning("accept failed: %s", exc)
                continue
            if draining:
                log.debug("answering a connection made before the socket was removed")
            self._take(sock)

    def _take(self, sock: socket.socket) -> None:
        """Serve one accepted connection on its own thread, or refuse it past the cap."""
        try:
            # Room for a whole camera frame per syscall instead of a dozen small wake-ups.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:
            sock.close()
            return
        with self._lock:
            full = len(self._connections) >= self.settings.max_connections
            if not full:
                self._connections[sock] = None
        if full:
            self.api.count("refused_connections")
            self._refuse(sock)
            return
        thread = threading.Thread(target=self._serve, args=(sock,), name="api-conn", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _refuse(self, sock: socket.socket) -> None:
        try:
            conn = Connection(sock, max_body=0, request_timeout=1.0, idle_timeout=1.0)
            limit = self.settings.max_connections
            conn.send(error_response(503, f"too many connections (limit {limit})"), keep_alive=False)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, sock: socket.socket) -> None:
        s = self.settings
        conn = Connection(
            sock, max_body=s.max_body_bytes, request_timeout=s.request_timeout_s,
            idle_timeout=s.idle_timeout_s,
        )
        with self._lock:
            self._connections[sock] = conn
        try:
            peer = Peer.of(sock)
            if not self.api.socket_rule.allows(peer):  # refused before it can send anything
                self.api.count("refused_peer")
                conn.send(error_response(403, f"uid {peer.uid} is not allowed to use this socket"),
                          keep_alive=False)
                return
            while True:  # ends after a response when stopping: keep_alive is then False
                try:
                    request = conn.read_head()
                    refusal = self.api.admit(request, peer)  # decided on the head alone
                    if refusal is None:
                        conn.read_body(request)
                except HTTPError as exc:
                    self.api.count(f"http_{exc.status}")
                    conn.send(error_response(exc.status, str(exc)), keep_alive=False)
                    return
                http10 = request.version == "HTTP/1.0"
                if refusal is not None:  # the body was not read: the connection cannot go on
                    conn.send(refusal, keep_alive=False, http10=http10)
                    return
                head_only = request.method == "HEAD"
                if head_only:
                    request.method = "GET"
                response = self.api.handle(request, peer)
                keep_alive = request.keep_alive and not self._stopping.is_set() and response.stream is None
                conn.send(response, keep_alive, http10=http10, head_only=head_only)
                if not keep_alive:
                    return
                with self._lock:
                    self._reused.add(sock)
        except ClientGone:
            pass
        except OSError as exc:  # the client went away while we answered
            self.api.count("client_errors")
            log.debug("connection error: %s", exc)
        finally:
            with self._lock:
                self._connections.pop(sock, None)
                self._reused.discard(sock)
                self._threads.discard(threading.current_thread())
            sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking connections and answer every request already made (up to `timeout`).

        A socket we bound is removed first, so new clients are refused, and what is
        already in its backlog is accepted and answered. An inherited one stays
        systemd's: it keeps its path and its backlog, which the next edged answers.
        A connection idle after a response is closed for reading: a request already
        sent on it is still answered; one sent after that fails to send (HTTP allows
        closing an idle keep-alive connection; clients retry on a new one). A new
        connection still gets its first request answered.
        """
        if not self.inherited and (self.watch is None or self.watch.owns_path()):  # not another's
            with contextlib.suppress(FileNotFoundError):
                self.settings.path.unlink()
        self._stopping.set()
        self.api.stopping.set()  # ends event streams
        with self._lock:
            unused, self._next = self._next, None  # bound again just now, never served
            listener = self.listener
        if unused is not None:
            unused.close()
        if listener is not None and not self.inherited:
            listener.setblocking(False)  # the accept loop drains the backlog, then ends
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        closed: set[socket.socket] = set()
        while (left := deadline - time.monotonic()) > 0:
            with self._lock:
                for sock in self._reused - closed:  # looked at again: one may fall idle meanwhile
                    conn = self._connections.get(sock)
                    if conn is not None and not conn.in_request:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RD)
                        closed.add(sock)
                threads = list(self._threads)
            if not threads:
                break
            threads[0].join(timeout=min(0.1, left))
        if self.listener is not None:
            self.listener.close()


__all__ = ["SOCKET_MODE", "ApiServer", "Response", "SocketInUse", "bind_unix_socket", "check_socket_path",
           "resolve_group"]
