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
import queue
import select
import socket
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from edged.api.http import ClientGone, Connection, HTTPError, Request, Response
from edged.api.routes import Api, error_response

log = logging.getLogger(__name__)
LINGER_MS = 5  # wait this long on a connection for its next request before parking it
DISCARD_BYTES = 16 << 20  # read at most this much of a refused request's body ...
DISCARD_S = 2.0  # ... for at most this long, so that the client reads the refusal
MAX_STREAMS = 64  # event streams (each holds a thread for as long as its client reads)

Work = Request | HTTPError  # a head to serve, or the reason it cannot be


class Loop(Protocol):
    """What a worker needs of the server: give a connection back, or end it."""

    stopping: threading.Event

    def park(self, conn: Connection) -> None: ...
    def close(self, conn: Connection) -> None: ...


class WorkerPool:
    def __init__(self, size: int, serve: Callable[[Connection, Work], None]) -> None:
        self.size = size
        self.per_uid = max(1, size // 2)
        self._serve = serve
        self._queue: queue.SimpleQueue[tuple[Connection, Work] | None] = queue.SimpleQueue()
        self._active: Counter[int] = Counter()  # per uid: connections being served or queued to be
        self._waiting: dict[int, deque[tuple[Connection, Work]]] = {}  # per uid, past its share
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"api-worker-{i}", daemon=True)
                         for i in range(size)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, conn: Connection, work: Work) -> None:
        uid = conn.peer.uid
        with self._lock:
            if self._active[uid] >= self.per_uid:
                self._waiting.setdefault(uid, deque()).append((conn, work))
                return
            self._active[uid] += 1
        self._queue.put((conn, work))

    def busy(self) -> int:
        """Connections being served or waiting for a worker."""
        with self._lock:
            return sum(self._active.values())

    def queue_empty(self) -> bool:
        return self._queue.empty()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            conn, work = item
            try:
                self._serve(conn, work)
            except Exception:  # a bug must cost one connection, never a worker
                log.exception("unhandled error serving a connection")
            finally:
                self._done(conn.peer.uid)

    def _done(self, uid: int) -> None:
        with self._lock:
            waiting = self._waiting.get(uid)
            following = waiting.popleft() if waiting else None
            if waiting is not None and not waiting:
                del self._waiting[uid]
            if following is None:
                self._active[uid] -= 1
                if not self._active[uid]:
                    del self._active[uid]
        if following is not None:
            self._queue.put(following)

    def stop(self, timeout: float) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)


class RequestHandler:
    """Serves the requests of one connection on a worker, from its first head until it parks."""

    def __init__(self, api: Api, loop: Loop, pool: WorkerPool) -> None:
        self.api = api
        self.loop = loop
        self.pool = pool
        self._streams = 0
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
        response = self.api.handle(request, conn.peer)
        if response.stream is not None and not head_only:
            self._stream(conn, response)
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

    def _stream(self, conn: Connection, response: Response) -> None:
        """An event stream keeps its own thread for as long as its client reads, not a worker."""
        with self._lock:
            full = self._streams >= MAX_STREAMS
            if not full:
                self._streams += 1
        if full:
            self.refuse(conn, error_response(503, f"too many event streams (limit {MAX_STREAMS})"), 0)
            return

        def run() -> None:
            try:
                conn.send_stream(response)
            except OSError:
                pass
            finally:
                with self._lock:
                    self._streams -= 1
                self.loop.close(conn)

        threading.Thread(target=run, name="api-stream", daemon=True).start()
