"""Chunk requests waiting for a worker: one queue per requester, served in turn.

A requester is the device id its response topic names. Each has at most `per_requester`
requests waiting and all of them together at most `total`, so one device (or a client
flooding the fetch topic) holds a bounded share of memory and of the workers: the workers
take one request from each requester in turn (round robin), and a request that does not
fit is refused `busy`. When the total is reached, a requester with few requests waiting
still gets in: the newest request of the longest queue is refused instead, if that queue
is at least two longer (so a flood fills its own queue, never the others' places).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")
PER_REQUESTER = 32  # above a device's `window` (default 8): a normal device is never refused
TOTAL = 1024


class FairQueue(Generic[T]):
    def __init__(self, per_requester: int = PER_REQUESTER, total: int = TOTAL) -> None:
        self.per_requester = per_requester
        self.total = total
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()  # round-robin order
        self._by_length: list[set[str]] = [set() for _ in range(per_requester + 1)]
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return self._count

    @property
    def requesters(self) -> int:
        """Requesters with something waiting: never more than `total`."""
        return len(self._queues)

    def put(self, requester: str, item: T) -> T | None:
        """Queue `item`; returns the request refused instead (`item`, or another requester's
        newest), or None when nothing is refused."""
        with self._cond:
            if self._closed:
                return item
            queue = self._queues.get(requester)
            length = len(queue) if queue is not None else 0
            if length >= self.per_requester:
                return item
            refused = None
            if self._count >= self.total:
                longest = self._longest()
                if longest < length + 2:
                    return item
                victim = next(iter(self._by_length[longest]))
                refused = self._queues[victim].pop()
                self._moved(victim, longest, longest - 1)
                self._count -= 1
            if queue is None:
                queue = self._queues[requester] = deque()
            queue.append(item)
            self._moved(requester, length, length + 1)
            self._count += 1
            self._cond.notify()
            return refused

    def get(self) -> T | None:
        """The next request, taking requesters in turn; None once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._count > 0 or self._closed)
            if self._closed:
                return None
            requester, queue = next(iter(self._queues.items()))
            item = queue.popleft()
            self._moved(requester, len(queue) + 1, len(queue))
            self._count -= 1
            if queue:
                self._queues.move_to_end(requester)  # its next request waits for the others
            return item

    def close(self) -> list[T]:
        """Wake every worker; returns what was still waiting."""
        with self._cond:
            self._closed = True
            left = [item for queue in self._queues.values() for item in queue]
            self._queues.clear()
            self._by_length = [set() for _ in range(self.per_requester + 1)]
            self._count = 0
            self._cond.notify_all()
            return left

    def _longest(self) -> int:
        return next((n for n in range(self.per_requester, 0, -1) if self._by_length[n]), 0)

    def _moved(self, requester: str, old: int, new: int) -> None:
        if old:
            self._by_length[old].discard(requester)
        if new:
            self._by_length[new].add(requester)
        elif requester in self._queues:
            del self._queues[requester]
