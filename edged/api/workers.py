"""The threads that serve requests, shared fairly between the users of the socket.

A connection reaches a worker only once its request head has arrived whole (the
event loop in `server.py` waits for heads, however slowly they come). The worker
receives the body, runs the request and answers; then it waits a few milliseconds
for the next request on the same connection, which a client sending frames in a
loop has usually sent by then, and parks the connection with the loop otherwise.
One peer uid holds at most half the workers: its further requests wait their turn
in its own queue, so one user's slow bodies or heavy requests cannot stall another's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from edged.api.http import ClientGone, Connection, HTTPError, Request, Response
from edged.api.routes import Api, error_response

log = logging.getLogger(__name__)
LINGER_MS = 5  # wait this long on a connection for its next request before parking it
DISCARD_BYTES = 16 << 20  # read at most this much of a refused request's body ...
DISCARD_S = 2.0  # ... for at most this long, so that the client reads the refusal
MAX_STREAMS = 64  # event streams (each holds a thread for as long as its client reads) ...
MAX_STREAMS_PER_UID = MAX_STREAMS // 2  # ... and one user at most half of them

Work = Request | HTTPError  # a head to serve, or the reason it cannot be


class Loop(Protocol):
    """What a worker needs of the server: give a connection back, or end it."""

    stopping: threading.Event

    def park(self, conn: Connection) -> None: ...
    def close(self, conn: Connection) -> None: ...


class WorkerPool:
    """`size` threads; work is started in turn across users. A user with nothing running
    always gets the next free worker; one with work running gets more only below half the
    pool and while a quarter of it stays free, so neither one user nor two can take it all."""

    def __init__(self, size: int, serve: Callable[[Connection, Work], None]) -> None:
        self.size = size
        self.per_uid = max(1, size // 2)
        self.reserve = size // 4  # kept free for users with nothing running
        self._serve = serve
        self._queue: queue.SimpleQueue[tuple[Connection, Work] | None] = queue.SimpleQueue()
        self._active: Counter[int] = Counter()  # per uid: work started (queued here or running)
        self._started = 0  # in all; never over `size`, so started work finds a free worker
        self._waiting: dict[int, deque[tuple[Connection, Work]]] = {}  # per uid, in turn (oldest first)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"api-worker-{i}", daemon=True)
                         for i in range(size)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, conn: Connection, work: Work) -> None:
        uid = conn.peer.uid
        conn.queued_at = time.monotonic()
        with self._lock:
            if uid in self._waiting or not self._may_start(uid):
                self._waiting.setdefault(uid, deque()).append((conn, work))
                return
            self._begin(uid)
        self._queue.put((conn, work))

    def _may_start(self, uid: int) -> bool:
        """With the lock held."""
        if self._started >= self.size:
            return False
        active = self._active[uid]
        return active == 0 or (active < self.per_uid and self.size - self._started > self.reserve)

    def _begin(self, uid: int) -> None:
        self._active[uid] += 1
        self._started += 1

    def queue_empty(self) -> bool:
        return self._queue.empty() and not self._waiting

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            conn, work = item
            conn.deadline += time.monotonic() - conn.queued_at  # waiting for a worker: not the client's time
            try:
                self._serve(conn, work)
            except Exception:  # a bug must cost one connection, never a worker
                log.exception("unhandled error serving a connection")
            finally:
                self._done(conn.peer.uid)

    def _done(self, uid: int) -> None:
        following = []
        with self._lock:
            self._active[uid] -= 1
            if not self._active[uid]:
                del self._active[uid]
            self._started -= 1
            for waiting_uid in list(self._waiting):  # in turn: a uid served goes to the back
                if not self._may_start(waiting_uid):
                    continue
                waiting = self._waiting.pop(waiting_uid)
                following.append(waiting.popleft())
                if waiting:
                    self._waiting[waiting_uid] = waiting
                self._begin(waiting_uid)
        for item in following:
            self._queue.put(item)

    def stop(self, timeout: float) -> None:
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))


class RequestHandler:
    """Serves the requests of one connection on a worker, from its first head until it parks."""

    def __init__(self, api: Api, loop: Loop, pool: WorkerPool) -> None:
        self.api = api
        self.loop = loop
        self.pool = pool
        self._streams: Counter[int] = Counter()  # per uid
        self._lock = threading.Lock()

    def __call__(self, conn: Connection, work: Work) -> None:
        try:
            if isinstance(work, HTTPError):
                raise work
            request: Request | None = work
            while request is not None:
                request = self._serve_one(conn, request)
        except HTTPError as exc:
            self.api.count(f"http_{exc.status}")
            self.refuse(conn, error_response(exc.status, str(exc)), None if exc.status != 408 else 0)
        except ClientGone:
            self.loop.close(conn)
        except OSError as exc:  # the client went away while we answered
            self.api.count("client_errors")
            log.debug("connection error: %s", exc)
            self.loop.close(conn)
        except Exception:  # a bug (or MemoryError) costs this connection, never its descriptor
            log.exception("unhandled error serving a connection")
            if not conn.parked:
                self.loop.close(conn)

    def _serve_one(self, conn: Connection, request: Request) -> Request | None:
        """Answer `request`; the connection's next request when it follows at once, else None."""
        http10 = request.version == "HTTP/1.0"
        refusal = self.api.admit(request, conn.peer)  # decided on the head alone
        if refusal is not None:
            self.refuse(conn, refusal, request.length, http10)
            return None
        conn.read_body(request)
        head_only = request.method == "HEAD"
        if head_only:
            request.method = "GET"
        request.fds, conn.passed_fds = conn.passed_fds, []
        try:
            response = self.api.handle(request, conn.peer)
        finally:
            for fd in request.fds:  # passed with the request and not taken by its handler
                os.close(fd)
        if response.stream is not None and not head_only:
            self._stream(conn, response, http10)
            return None
        keep_alive = request.keep_alive and not self.loop.stopping.is_set()
        conn.send(response, keep_alive, http10=http10, head_only=head_only)
        conn.requests += 1
        if not keep_alive:
            self.loop.close(conn)
            return None
        return self._next_request(conn)

    def _next_request(self, conn: Connection) -> Request | None:
        """The next head if it is already here or comes within LINGER_MS; else park."""
        following = conn.take_head()
        if following is None and not conn.buffer and self.pool.queue_empty():
            poller = select.poll()  # not select(): descriptors past 1024 are expected here
            poller.register(conn.fd, select.POLLIN)
            if poller.poll(LINGER_MS):
                if not conn.receive():
                    self.loop.close(conn)
                    return None
                following = conn.take_head()
        if following is None:
            self.loop.park(conn)
        else:  # the next request's whole time starts now, not with the bytes it came after
            conn.deadline = time.monotonic() + conn.request_timeout
        return following

    def refuse(self, conn: Connection, response: Response, body: int | None, http10: bool = False) -> None:
        """Answer and close, reading what the client still sends first so it reads the answer:
        `body` bytes of it (a refused request's), or until it stops (None: the head was bad)."""
        try:
            conn.send(response, keep_alive=False, http10=http10)
            if body != 0:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)  # the client sees the answer end
                conn.discard_body(body, DISCARD_BYTES, DISCARD_S)
        except OSError:
            pass
        finally:
            self.loop.close(conn)

    def _stream(self, conn: Connection, response: Response, http10: bool) -> None:
        """An event stream keeps its own thread for as long as its client reads, not a worker."""
        uid = conn.peer.uid
        with self._lock:
            if sum(self._streams.values()) >= MAX_STREAMS:
                refusal = f"too many event streams (limit {MAX_STREAMS})"
            elif self._streams[uid] >= MAX_STREAMS_PER_UID:
                refusal = f"too many event streams from uid {uid} (limit {MAX_STREAMS_PER_UID})"
            else:
                refusal = None
                self._streams[uid] += 1
        if refusal is not None:
            self.refuse(conn, error_response(503, refusal), 0)
            return

        def run() -> None:
            try:
                conn.send_stream(response, http10)
            except OSError:
                pass
            finally:
                self._stream_ended(uid)
                self.loop.close(conn)

        try:
            threading.Thread(target=run, name="api-stream", daemon=True).start()
        except BaseException:
            self._stream_ended(uid)
            raise

    def _stream_ended(self, uid: int) -> None:
        with self._lock:
            self._streams[uid] -= 1
            if not self._streams[uid]:
                del self._streams[uid]
