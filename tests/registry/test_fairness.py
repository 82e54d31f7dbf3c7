"""FairQueue: the bounds and the order the workers see (the flood test drives it for real)."""

from __future__ import annotations

import threading

from edged.registry.fairness import FairQueue


def test_requesters_are_served_in_turn():
    queue: FairQueue[str] = FairQueue(per_requester=8, total=100)
    for i in range(4):
        assert queue.put("flood", f"f{i}") is None
    assert queue.put("cam", "c0") is None
    assert queue.put("cam", "c1") is None
    assert [queue.get() for _ in range(6)] == ["f0", "c0", "f1", "c1", "f2", "f3"]
    assert len(queue) == 0 and queue.requesters == 0


def test_one_requester_is_refused_past_its_share():
    queue: FairQueue[int] = FairQueue(per_requester=3, total=100)
    refused = [queue.put("flood", i) for i in range(10)]
    assert refused == [None] * 3 + list(range(3, 10))
    assert queue.put("cam", 99) is None  # the others still get in


def test_at_the_total_the_longest_queue_gives_way():
    queue: FairQueue[str] = FairQueue(per_requester=10, total=10)
    for i in range(10):
        assert queue.put("flood", f"f{i}") is None
    assert queue.put("cam", "c0") == "f9"  # the flood's newest is refused instead
    assert queue.put("cam", "c1") == "f8"
    assert len(queue) == 10
    # Equal shares: nobody gives way to a requester that would then hold more.
    for i in range(3):
        queue.put("cam", f"c{i + 2}")
    assert queue.put("cam", "c-too-many") == "c-too-many"  # 5 and 5: it would be 6 against 4


def test_many_requesters_stay_within_the_total():
    queue: FairQueue[int] = FairQueue(per_requester=4, total=50)
    refused = [queue.put(f"forged-{i}", i) for i in range(1000)]
    assert len(queue) == 50 and queue.requesters == 50
    assert refused.count(None) == 50


def test_close_wakes_the_workers_and_refuses_more():
    queue: FairQueue[int] = FairQueue()
    got: list[int | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    queue.close()
    worker.join(10)
    assert got == [None] and queue.put("cam", 1) == 1
