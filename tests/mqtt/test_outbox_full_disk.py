"""The outbox on a really full disk (a tmpfs filled to the last byte, writes fail with ENOSPC
and SQLite says SQLITE_FULL): events kept, health and results dropped first and counted, acks
never raise and are not forgotten, everything held written once the disk has room."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edged.mqtt import outbox_full
from edged.mqtt.outbox import KINDS, Outbox
from tests.conftest import wait_until

EVENTS = "edged/devices/d1/events"
HEALTH = "edged/devices/d1/health"
RESULTS = "edged/devices/d1/results/cam"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(outbox_full, "RETRY_S", 0.05)  # look at the disk again sooner


def event(box: Outbox, detail: str = "") -> bytes:
    return json.dumps({"seq": box.next_sequence(), "kind": "model_failed", "error": detail}).encode()


def fill_until_unwritable(box: Outbox, disk, limit: int = 20_000) -> int:
    """Fill the disk, then put results until the outbox says it cannot write; how many it took."""
    disk.fill()
    for n in range(limit):
        if not box.condition()["writable"]:
            return n
        box.put("result", RESULTS, b"r" * 900)
    raise AssertionError("the outbox never noticed the full disk")


def sequences(box: Outbox) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in box.pending(0, 1_000_000) if m.kind == "event"]


def outbox_lines(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "edged.mqtt.outbox"]


def test_events_are_kept_and_health_and_results_make_room_on_a_full_disk(small_disk, tmp_path: Path, caplog):
    disk = small_disk(tmp_path / "disk", 8)
    box = Outbox(disk.path / "outbox.db")
    try:
        for _ in range(1500):  # what a broker outage leaves behind
            box.put("health", HEALTH, b"h" * 900)
            box.put("result", RESULTS, b"r" * 900)
        with caplog.at_level(logging.INFO, logger="edged.mqtt.outbox"):
            fill_until_unwritable(box, disk)
            condition = box.condition()
            assert condition["problem"] == "database or disk is full" and condition["since"] > 0
            for _ in range(1000):  # more than the reserve gave back: health and results must go
                box.put("event", EVENTS, event(box, "x" * 2000))
                box.put("health", HEALTH, b"h" * 900)
            wait_until(lambda: box.recover() or box.condition()["in_memory"]["event"] == 0,
                       what="the events written to disk in room made by dropping health")
            assert box.backlog_by_kind()["event"] == 1000 and sequences(box) == list(range(1, 1001))
            dropped = box.dropped()
            assert dropped["event"] == 0 and dropped["state"] == 0 and dropped["health"] > 0
            assert box.condition()["writable"] is False
            disk.free()
            wait_until(lambda: box.recover() or box.condition()["writable"], what="recovered")
        assert box.condition() == {"writable": True, "problem": "", "since": None,
                                   "in_memory": dict.fromkeys(KINDS, 0), "acks_unsaved": 0}
        lines = outbox_lines(caplog)
        assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines  # full, recovered
        assert "cannot be written (database or disk is full)" in lines[0][1]
        assert "can be written again" in lines[1][1]
        backlog, dropped = box.backlog_by_kind(), box.dropped()
    finally:
        box.close()
    box = Outbox(disk.path / "outbox.db")  # all of it on disk
    try:
        assert box.backlog_by_kind() == backlog and box.dropped() == dropped
        assert sequences(box) == list(range(1, 1001)) and box.next_sequence() == 1001
    finally:
        box.close()


def test_acks_on_a_full_disk_never_raise_and_are_not_sent_again_after_a_restart(small_disk, tmp_path: Path):
    disk = small_disk(tmp_path / "disk", 4)
    box = Outbox(disk.path / "outbox.db")
    try:
        for _ in range(100):
            box.put("event", EVENTS, event(box))
        fill_until_unwritable(box, disk)
        sent = box.pending(0, 1_000_000)
        box.ack(*(m.id for m in sent[:60]))  # written into the reserve the outbox gave back
        assert box.condition()["acks_unsaved"] == 0
        disk.fill()  # something else takes the reserve too: now even a delete fails
        box.ack(*(m.id for m in sent[60:90]))
        assert box.condition()["acks_unsaved"] == 30
        left = box.pending(0, 1_000_000)
        assert [m.id for m in left] == [m.id for m in sent[90:]]  # acked ones do not go again
        assert box.backlog() == len(left)
        disk.free()
        wait_until(lambda: box.recover() or box.condition()["writable"], what="recovered")
        assert box.condition()["acks_unsaved"] == 0
    finally:
        box.close()
    box = Outbox(disk.path / "outbox.db")
    try:
        assert [m.id for m in box.pending(0, 1_000_000)] == [m.id for m in sent[90:]]
    finally:
        box.close()


def test_acks_made_in_the_reserve_survive_a_restart_while_the_disk_is_still_full(small_disk, tmp_path: Path):
    disk = small_disk(tmp_path / "disk", 4)
    box = Outbox(disk.path / "outbox.db")
    try:
        for _ in range(50):
            box.put("event", EVENTS, event(box))
        fill_until_unwritable(box, disk)
        held = box.put("event", EVENTS, event(box))  # in memory
        sent = box.pending(0, 1_000_000)
        assert sent[-1].id == held
        box.ack(*(m.id for m in sent))
        assert box.backlog() == 0
    finally:
        box.close()  # the disk is still full
    box = Outbox(disk.path / "outbox.db")
    try:
        assert box.pending(0, 1_000_000) == []  # nothing the broker had is sent again
        assert box.next_sequence() > json.loads(sent[-1].payload)["seq"]  # no number given twice
    finally:
        box.close()


def test_memory_is_bounded_and_what_it_loses_is_counted_health_first(small_disk, tmp_path: Path, caplog):
    disk = small_disk(tmp_path / "disk", 4)
    box = Outbox(disk.path / "outbox.db", memory_messages=20)
    try:
        fill_until_unwritable(box, disk)
        dropped_before = box.dropped()
        box.ack(*(m.id for m in box.pending(0, 1_000_000)))  # no results left on disk to drop
        with caplog.at_level(logging.INFO, logger="edged.mqtt.outbox"):
            for _ in range(5):
                box.put("health", HEALTH, b"h" * 100)
            ids = [box.put("event", EVENTS, event(box)) for _ in range(30)]
        assert sum(box.condition()["in_memory"].values()) == 20 and box.backlog_by_kind()["event"] == 20
        dropped = {k: n - dropped_before[k] for k, n in box.dropped().items()}
        assert dropped == {"health": 5, "result": 0, "state": 0, "event": 10}
        assert [m.id for m in box.pending(0, 100)] == ids[10:]  # the newest events are kept
        errors = [m for level, m in outbox_lines(caplog) if level == logging.ERROR]
        assert len(errors) == 1 and "events are being lost" in errors[0]
        disk.free()
        wait_until(lambda: box.recover() or box.condition()["writable"], what="recovered")
        counted = box.dropped()
    finally:
        box.close()
    box = Outbox(disk.path / "outbox.db")
    try:
        assert box.dropped() == counted and [m.id for m in box.pending(0, 100)] == ids[10:]
    finally:
        box.close()
