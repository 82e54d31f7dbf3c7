"""The MQTT outbox on real files: order, acks, bounds, persistence, threads, kill -9, corruption."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edged.errors import EdgedError, OutboxError
from edged.mqtt.outbox import KINDS, Outbox, OutgoingMessage

ROOT = Path(__file__).resolve().parents[2]
EVENTS = "edged/devices/d1/events"
STATE = "edged/devices/d1/state"
HEALTH = "edged/devices/d1/health"
RESULTS = "edged/devices/d1/results/cam"
TOPIC_OF = {"health": HEALTH, "result": RESULTS, "state": STATE, "event": EVENTS}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "mqtt" / "outbox.db"


@pytest.fixture
def outbox(path: Path):
    box = Outbox(path)
    yield box
    box.close()


def reopen(box: Outbox, **kwargs) -> Outbox:
    box.close()
    return Outbox(box.path, **kwargs)


def drain(box: Outbox) -> list[OutgoingMessage]:
    """Everything pending, oldest first, acked."""
    found, after = [], 0
    while batch := box.pending(after, 50):
        found += batch
        box.ack(*(m.id for m in batch))
        after = batch[-1].id
    return found


def payloads(messages: list[OutgoingMessage]) -> list[bytes]:
    return [m.payload for m in messages]


def run_child(code: str, path: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = textwrap.dedent(code).replace("PATH", repr(str(path)))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, **kwargs)


# --- order, acks, paging -----------------------------------------------------
def test_messages_come_out_in_order_with_everything_they_were_put_with(outbox: Outbox):
    ids = [outbox.put(KINDS[n % 4], TOPIC_OF[KINDS[n % 4]], b"m%d" % n) for n in range(10)]
    retained = outbox.put("state", STATE, b"doc", qos=0, retain=True)
    assert ids == sorted(ids) and len(set(ids)) == 10 and retained > ids[-1]
    found = outbox.pending(limit=100)
    assert [m.id for m in found] == [*ids, retained]
    assert payloads(found) == [b"m%d" % n for n in range(10)] + [b"doc"]
    assert found[1] == OutgoingMessage(ids[1], "result", RESULTS, b"m1", 1, False, found[1].created_at)
    assert (found[-1].qos, found[-1].retain, found[-1].kind) == (0, True, "state")
    assert found[0].created_at <= found[-1].created_at


def test_ack_removes_and_the_backlog_numbers_follow(outbox: Outbox):
    a = outbox.put("event", EVENTS, b"12345")
    b = outbox.put("health", HEALTH, b"1")
    c = outbox.put("event", EVENTS, b"")
    assert outbox.backlog() == 3
    assert outbox.backlog_by_kind() == {"health": 1, "result": 0, "state": 0, "event": 2}
    assert outbox.backlog_bytes() == 3 * len(EVENTS) - len(EVENTS) + len(HEALTH) + 6
    outbox.ack(a, c)
    assert [m.id for m in outbox.pending()] == [b]
    assert outbox.backlog_by_kind() == {"health": 1, "result": 0, "state": 0, "event": 0}
    assert outbox.backlog_bytes() == len(HEALTH) + 1
    outbox.ack(b)
    assert (outbox.pending(), outbox.backlog(), outbox.backlog_bytes()) == ([], 0, 0)


def test_pending_pages_after_an_id_without_skipping_or_repeating(outbox: Outbox):
    ids = [outbox.put("result", RESULTS, b"%d" % n) for n in range(250)]
    pages, after = [], 0
    while page := outbox.pending(after, 100):
        pages.append(page)
        after = page[-1].id
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [m.id for p in pages for m in p] == ids
    assert outbox.backlog() == 250  # reading does not remove
    assert outbox.pending(ids[-1]) == []
    assert [m.id for m in outbox.pending(ids[10], 2)] == ids[11:13]


def test_duplicate_and_unknown_acks_are_harmless(outbox: Outbox):
    a, b = outbox.put("event", EVENTS, b"a"), outbox.put("event", EVENTS, b"b")
    outbox.ack(a)
    outbox.ack(a)  # the same PUBACK twice
    outbox.ack(a, 987654, -1)
    outbox.ack()
    assert [m.id for m in outbox.pending()] == [b]
    assert outbox.backlog_by_kind()["event"] == 1 and outbox.backlog_bytes() == len(EVENTS) + 1
    many = [outbox.put("event", EVENTS, b"x") for _ in range(1200)]
    outbox.ack(*many, *many)  # one call, more ids than one statement may bind
    assert outbox.backlog() == 1 and outbox.backlog_bytes() == len(EVENTS) + 1


def test_ids_are_never_reused_even_after_the_outbox_empties(outbox: Outbox):
    first = outbox.put("event", EVENTS, b"a")
    outbox.ack(first)
    second = outbox.put("event", EVENTS, b"b")
    assert second > first
    box = reopen(outbox)
    try:
        box.ack(second)
        assert box.put("event", EVENTS, b"c") > second
    finally:
        box.close()


def test_replace_keeps_only_the_newest_document_on_its_topic_and_is_no_drop(outbox: Outbox):
    event = outbox.put("event", EVENTS, b"e1")
    first = outbox.put("state", STATE, b"v1", retain=True, replace=True)
    outbox.put("state", "edged/devices/d1/other", b"other", retain=True)
    second = outbox.put("state", STATE, b"v2", retain=True, replace=True)
    third = outbox.put("state", STATE, b"v3", retain=True, replace=True)
    found = outbox.pending()
    assert payloads(found) == [b"e1", b"other", b"v3"]
    assert found[-1].id == third and found[0].id == event
    assert outbox.backlog_by_kind()["state"] == 2
    assert outbox.backlog_bytes() == len(EVENTS) + 2 + len("edged/devices/d1/other") + 5 + len(STATE) + 2
    assert outbox.dropped() == dict.fromkeys(KINDS, 0)
    outbox.ack(first, second)  # late PUBACKs for the replaced ones change nothing
    assert payloads(outbox.pending()) == [b"e1", b"other", b"v3"]


# --- bounds ----------------------------------------------------------------
def test_when_full_health_goes_first_then_results_then_state_then_events(path: Path, caplog):
    box = Outbox(path, max_messages=8)
    for kind in ("event", "state", "result", "health") * 2:
        box.put(kind, TOPIC_OF[kind], kind.encode())
    assert box.backlog() == 8 and box.dropped() == dict.fromkeys(KINDS, 0)
    kinds_left = []
    with caplog.at_level(logging.WARNING, logger="edged.mqtt.outbox"):
        for n in range(8):
            box.put("event", EVENTS, b"new%d" % n)
            kinds_left.append(box.backlog_by_kind())
            assert box.backlog() == 8
    assert [(k["health"], k["result"], k["state"], k["event"]) for k in kinds_left] == [
        (1, 2, 2, 3), (0, 2, 2, 4), (0, 1, 2, 5), (0, 0, 2, 6), (0, 0, 1, 7), (0, 0, 0, 8), (0, 0, 0, 8),
        (0, 0, 0, 8),
    ]
    assert box.dropped() == {"health": 2, "result": 2, "state": 2, "event": 2}
    assert payloads(box.pending()) == [b"new%d" % n for n in range(8)]  # the two old events went first
    assert len([r for r in caplog.records if "full" in r.getMessage()]) == 1
    box.close()

    box = Outbox(path, max_messages=8)  # the counters and the backlog survive a restart
    try:
        assert box.dropped() == {"health": 2, "result": 2, "state": 2, "event": 2}
        assert box.backlog_by_kind() == {"health": 0, "result": 0, "state": 0, "event": 8}
        assert box.put("health", HEALTH, b"h") == 0  # full of events: the health sample goes
        box.put("event", EVENTS, b"new8")
        assert box.dropped() == {"health": 3, "result": 2, "state": 2, "event": 3}
        assert payloads(box.pending()) == [b"new%d" % n for n in range(1, 9)]
    finally:
        box.close()


def test_the_kind_decides_not_the_age_and_a_less_important_newcomer_is_dropped_itself(path: Path):
    box = Outbox(path, max_messages=4)
    try:
        for kind, payload in [("event", b"e0"), ("result", b"r0"), ("event", b"e1"), ("health", b"h0")]:
            box.put(kind, TOPIC_OF[kind], payload)
        box.put("event", EVENTS, b"e2")  # h0 goes, though r0 is older
        assert payloads(box.pending()) == [b"e0", b"r0", b"e1", b"e2"]
        box.put("result", RESULTS, b"r1")  # r0 goes: a newer result is worth more than an older one
        assert payloads(box.pending()) == [b"e0", b"e1", b"e2", b"r1"]
        assert box.put("health", HEALTH, b"h1") == 0  # it would push out a result: it goes instead
        box.put("event", EVENTS, b"e3")  # r1 goes
        assert box.put("state", STATE, b"s", replace=True) == 0  # only events left: they stay
        assert payloads(box.pending()) == [b"e0", b"e1", b"e2", b"e3"]
        assert box.dropped() == {"health": 2, "result": 2, "state": 1, "event": 0}
        assert box.backlog_by_kind() == {"health": 0, "result": 0, "state": 0, "event": 4}
    finally:
        box.close()


def test_the_byte_bound_drops_as_many_as_needed_and_refuses_a_message_over_it(path: Path):
    topic = "t"
    box = Outbox(path, max_bytes=100)
    try:
        for n in range(4):
            box.put("health", topic, bytes([n]) * 19)  # 20 bytes each with the topic
        box.put("event", topic, b"e" * 19)
        assert box.backlog_bytes() == 100
        box.put("event", topic, b"E" * 49)  # 50 bytes: three health samples must go
        assert box.backlog_by_kind() == {"health": 1, "result": 0, "state": 0, "event": 2}
        assert box.backlog_bytes() == 90 and box.dropped()["health"] == 3
        assert payloads(box.pending())[0] == bytes([3]) * 19
        with pytest.raises(OutboxError, match="exceeds") as refused:
            box.put("event", topic, b"x" * 100)
        assert isinstance(refused.value, EdgedError)
        assert box.backlog_bytes() == 90 and box.dropped()["event"] == 0  # nothing dropped for it
        assert box.put("result", topic, b"r" * 19)  # the last health sample makes room for it
        assert box.backlog_by_kind() == {"health": 0, "result": 1, "state": 0, "event": 2}
        assert box.put("health", topic, b"h" * 19) == 0  # 20 bytes would push out a result
        assert box.backlog_bytes() == 90
        assert box.dropped() == {"health": 5, "result": 0, "state": 0, "event": 0}
        box.put("event", topic, b"x" * 99)  # exactly the bound: everything else goes
        assert box.backlog() == 1 and box.backlog_bytes() == 100
        assert box.dropped() == {"health": 5, "result": 1, "state": 0, "event": 2}
    finally:
        box.close()


def test_dropping_warns_again_only_after_the_backlog_recovered(path: Path, caplog):
    box = Outbox(path, max_messages=4)
    try:
        with caplog.at_level(logging.INFO, logger="edged.mqtt.outbox"):
            for n in range(10):
                box.put("event", EVENTS, b"%d" % n)
            drain(box)
            for n in range(10):
                box.put("event", EVENTS, b"%d" % n)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert box.dropped()["event"] == 12
    finally:
        box.close()


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("alert", EVENTS, b""), {}, "unknown message kind"),
        (("event", "a/+/b", b""), {}, "not a topic"),
        (("event", "a/#", b""), {}, "not a topic"),
        (("event", "", b""), {}, "not a topic"),
        (("event", EVENTS, b""), {"qos": 3}, "qos"),
    ],
)
def test_a_message_that_could_never_go_is_refused(outbox: Outbox, args, kwargs, match):
    with pytest.raises(OutboxError, match=match):
        outbox.put(*args, **kwargs)
    assert outbox.backlog() == 0


def test_bad_settings_are_refused(path: Path):
    with pytest.raises(OutboxError, match="synchronous"):
        Outbox(path, synchronous="OFF")
    with pytest.raises(OutboxError, match="positive"):
        Outbox(path, max_messages=0)


# --- persistence -----------------------------------------------------------
def test_sequences_are_persistent_monotonic_and_independent(path: Path):
    box = Outbox(path)
    assert [box.next_sequence() for _ in range(3)] == [1, 2, 3]
    assert box.next_sequence("health") == 1
    box = reopen(box)
    assert box.next_sequence() == 4 and box.next_sequence("health") == 2
    box = reopen(box, synchronous="FULL")
    try:
        assert box.next_sequence("events") == 5
    finally:
        box.close()


def test_the_backlog_survives_a_restart_and_wakes_the_link(path: Path):
    box = Outbox(path, synchronous="FULL")
    ids = [box.put("event", EVENTS, b"%d" % n) for n in range(5)]
    box.ack(ids[0])
    box = reopen(box)
    try:
        assert box.wait(0)  # what the last run left is waiting to go
        assert [m.id for m in box.pending()] == ids[1:]
        assert box.backlog_by_kind()["event"] == 4 and box.backlog_bytes() == 4 * (len(EVENTS) + 1)
    finally:
        box.close()


def test_the_directory_and_files_are_private(path: Path, outbox: Outbox):
    outbox.put("event", EVENTS, b"secret")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for file in path.parent.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_a_second_outbox_on_the_same_file_is_refused_and_the_file_kept(path: Path, outbox: Outbox):
    outbox.put("event", EVENTS, b"mine")
    with pytest.raises(OutboxError, match="cannot open"):
        Outbox(path)
    assert payloads(outbox.pending()) == [b"mine"]
    assert not list(path.parent.glob("*.corrupt-*"))


def test_a_closed_outbox_says_so(outbox: Outbox):
    outbox.close()
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.put("event", EVENTS, b"x")
    with pytest.raises(OutboxError, match="closed"):
        outbox.pending()


# --- the file is untrusted ---------------------------------------------------
def _assert_moved_aside_and_working(path: Path, original: bytes, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="edged.mqtt.outbox"):
        box = Outbox(path)
    try:
        aside = list(path.parent.glob("outbox.db.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == original
        assert len(caplog.records) == 1 and str(aside[0]) in caplog.records[0].getMessage()
        assert box.backlog() == 0 and box.dropped() == dict.fromkeys(KINDS, 0)
        box.put("event", EVENTS, b"after")
        assert payloads(box.pending()) == [b"after"]
    finally:
        box.close()


def test_a_file_of_random_bytes_is_moved_aside(path: Path, caplog):
    path.parent.mkdir()
    garbage = os.urandom(8192)
    path.write_bytes(garbage)
    _assert_moved_aside_and_working(path, garbage, caplog)


def test_a_foreign_database_is_moved_aside(path: Path, caplog):
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE cookies (name TEXT)")
    db.close()
    _assert_moved_aside_and_working(path, path.read_bytes(), caplog)


def test_another_schema_version_is_moved_aside(path: Path, caplog):
    Outbox(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    db.close()
    _assert_moved_aside_and_working(path, path.read_bytes(), caplog)


def test_damaged_pages_are_found_at_open_and_moved_aside(path: Path, caplog):
    box = Outbox(path)
    for n in range(300):
        box.put("result", RESULTS, bytes([n % 256]) * 700)
    box.close()  # checkpointed: everything is in the main file now
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))
    _assert_moved_aside_and_working(path, bytes(data), caplog)


def test_corruption_found_while_running_moves_the_file_aside_and_the_call_goes_on(path: Path, caplog):
    box = Outbox(path, max_messages=5000)
    for n in range(6000):  # more pages than SQLite caches, so the oldest are read from the file again
        last = box.put("result", RESULTS, bytes([n % 256]) * 700)
    assert box.next_sequence() == 1
    box = reopen(box, max_messages=5000)
    try:
        size = path.stat().st_size
        with path.open("r+b") as f:  # the disk goes bad under the running daemon
            f.seek(8192)  # past the header and the tables' root pages
            f.write(bytes(size * 9 // 10 - 8192))
        with caplog.at_level(logging.ERROR, logger="edged.mqtt.outbox"):
            assert box.pending(0, 10) == []
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "moved it to" in errors[0]
        assert len(list(path.parent.glob("outbox.db.corrupt-*"))) == 1
        assert box.backlog() == 0
        after = box.put("event", EVENTS, b"after")
        assert after > last  # a link paging after the ids it has seen still finds it
        assert payloads(box.pending(last)) == [b"after"]
        assert box.dropped()["result"] == 1000  # the counts carry over to the new file
        assert box.next_sequence() == 2
    finally:
        box.close()
    box = Outbox(path)
    try:
        assert box.dropped()["result"] == 1000 and box.put("event", EVENTS, b"later") > after
        assert box.next_sequence() == 3
    finally:
        box.close()


# --- threads ---------------------------------------------------------------
def test_many_putters_and_one_draining_link_lose_nothing_and_repeat_nothing(outbox: Outbox):
    threads_n, per_thread = 4, 1500
    received: list[bytes] = []
    done = threading.Event()

    def producer(t: int) -> None:
        for n in range(per_thread):
            outbox.put(KINDS[n % 4], TOPIC_OF[KINDS[n % 4]], b"%d:%d" % (t, n))

    def link() -> None:
        after = 0
        while not (done.is_set() and outbox.backlog() == 0):
            outbox.wait(0.05)
            while batch := outbox.pending(after, 64):
                received.extend(payloads(batch))
                after = batch[-1].id
                for m in batch:
                    outbox.ack(m.id)

    drainer = threading.Thread(target=link)
    drainer.start()
    producers = [threading.Thread(target=producer, args=(t,)) for t in range(threads_n)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    done.set()
    drainer.join(timeout=120)
    assert not drainer.is_alive()
    assert len(received) == len(set(received)) == threads_n * per_thread
    for t in range(threads_n):
        mine = [int(p.split(b":")[1]) for p in received if p.startswith(b"%d:" % t)]
        assert mine == list(range(per_thread))
    assert outbox.backlog() == 0 and outbox.backlog_bytes() == 0


def test_wait_wakes_on_a_put_and_times_out_otherwise(outbox: Outbox):
    assert not outbox.wait(0.01)
    outbox.put("event", EVENTS, b"x")
    assert outbox.wait(0.01)
    assert not outbox.wait(0.01)  # consumed
    later = threading.Timer(0.05, outbox.put, args=("event", EVENTS, b"y"))
    later.start()
    assert outbox.wait(30)
    later.join()


# --- kill -9 ---------------------------------------------------------------
def test_kill_9_after_put_returns_loses_nothing(path: Path):
    child = run_child(
        """
        import os, signal
        from edged.mqtt.outbox import Outbox
        box = Outbox(PATH)
        ids = [box.put("event", "edged/devices/d1/events", b"%d" % n) for n in range(2000)]
        box.ack(*ids[:10])
        box.put("state", "edged/devices/d1/state", b"v1", retain=True)
        box.put("state", "edged/devices/d1/state", b"v2", retain=True, replace=True)
        for _ in range(7):
            box.next_sequence()
        print("done", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        path,
    )
    out, _ = child.communicate(timeout=120)
    assert out.strip() == "done" and child.returncode == -signal.SIGKILL
    box = Outbox(path)
    try:
        assert payloads(drain(box)) == [b"%d" % n for n in range(10, 2000)] + [b"v2"]
        assert box.next_sequence() == 8
    finally:
        box.close()


def test_kill_9_in_the_middle_of_puts_from_threads_loses_nothing_that_was_put(path: Path):
    child = run_child(
        """
        import sys, threading
        from edged.mqtt.outbox import Outbox
        box = Outbox(PATH)
        lock = threading.Lock()
        def put(t):
            for n in range(10**9):
                box.put("result", "edged/devices/d1/results/cam", b"%d:%d" % (t, n))
                with lock:  # one write a line: a kill never leaves half a line counted
                    sys.stdout.write("%d %d\\n" % (t, n))
                    sys.stdout.flush()
        for t in range(3):
            threading.Thread(target=put, args=(t,)).start()
        """,
        path,
    )
    confirmed = []
    for line in child.stdout:
        if not line.endswith("\n"):  # cut by the kill: that put was not confirmed
            break
        confirmed.append(tuple(int(x) for x in line.split()))
        if len(confirmed) == 1500:
            child.send_signal(signal.SIGKILL)
            break
    rest, _ = child.communicate(timeout=60)
    confirmed += [tuple(int(x) for x in line.split()) for line in rest.splitlines(keepends=True)
                  if line.endswith("\n")]
    assert child.returncode == -signal.SIGKILL
    box = Outbox(path)
    try:
        stored = [tuple(int(x) for x in p.split(b":")) for p in payloads(drain(box))]
    finally:
        box.close()
    assert set(confirmed) <= set(stored)
    assert len(stored) == len(set(stored))
    for t in range(3):  # each thread's messages in order and without gaps (at most one unconfirmed)
        mine = [n for tt, n in stored if tt == t]
        assert mine == list(range(len(mine)))
