"""The durable store-and-forward outbox: everything edged publishes over MQTT waits here.

Producers (pipelines, model manager listeners, the health timer) `put` from any thread;
the link thread reads `pending` in id order while connected and `ack`s a message when its
PUBACK arrives, so a message leaves only once the broker has it (QoS 1: what was sent but
not acked goes again after a reconnect, and the broker may see it twice).

One SQLite file (edged/mqtt/outbox_file.py) in WAL mode, one connection behind one lock, one
transaction per put. Ids are given out under that lock, one more than the last, and written
explicitly: never reused, so paging with `pending(after_id)` never skips a message.

Durability: `put` returns once its commit is in the WAL file, so `kill -9` of the daemon
loses nothing put. `synchronous="NORMAL"` does not fsync each commit: a power cut or
kernel crash may roll back the commits since the last checkpoint (messages, drop counters
and sequence numbers alike, so a sequence number can be issued twice) but never corrupts
the file. `"FULL"` fsyncs every commit: durable, at one disk flush per put.

A full disk (or one failing writes) is a state, not an error: the outbox gives its reserve
back to the disk, so acks and evictions still get written; new messages wait in memory
(bounded: health goes first, then results, state, events last; every drop counted); events
held there are written as soon as dropping old health and results on disk makes room for
them, and everything held once the disk has room again. One log line when it starts, one
when it is over. Only what memory still holds at exit is lost, and that is logged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edged.errors import OutboxError
from edged.mqtt import outbox_file as sql
from edged.mqtt.outbox_file import KINDS, RESERVE_BYTES, Reserve, is_corrupt, is_unwritable, open_file
from edged.mqtt.outbox_memory import Held, Row

__all__ = ["KINDS", "Outbox", "OutgoingMessage"]
log = logging.getLogger(__name__)
MAX_TOPIC_BYTES = 65535
RETRY_S = 1.0  # how often a full disk is looked at again
MEMORY_MESSAGES = 10_000  # messages held in memory while the disk is full ...
MEMORY_BYTES = 8 << 20  # ... and their bytes
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float  # time.time() at put: how stale it is when it finally goes


class _Unwritable(Exception):
    """SQLite could not write (SQLITE_FULL, SQLITE_IOERR): handled as a full disk."""


class Outbox:
    def __init__(self, path: Path, max_messages: int = 100_000, max_bytes: int = 64 << 20,
                 synchronous: str = "NORMAL", memory_messages: int = MEMORY_MESSAGES,
                 memory_bytes: int = MEMORY_BYTES) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise OutboxError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        if min(max_messages, max_bytes, memory_messages, memory_bytes) < 1:
            raise OutboxError("max_messages, max_bytes and the memory bounds must be positive")
        self.path = Path(path)
        self.max_messages, self.max_bytes, self.synchronous = max_messages, max_bytes, synchronous.upper()
        self.memory_messages, self.memory_bytes = memory_messages, memory_bytes
        self._lock = threading.Lock()
        self._put_event = threading.Event()
        self._dropping = False  # warned that it drops; reset once the backlog is half empty again
        self._db: sqlite3.Connection | None = None
        self._reserve = Reserve(self.path)
        self._memory = Held(memory_messages, memory_bytes)  # messages put while the disk was full
        self._doomed: set[int] = set()  # acked while even deletes failed: deleted once possible
        self._unsaved_drops: dict[str, int] = {}  # drop counts not written yet
        self._unsaved_sequences: set[str] = set()
        self._full = ""  # why the file cannot be written now; "" while it can
        self._full_since = 0.0
        self._next_try = 0.0
        self._losing_events = False
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._adopt(*open_file(self.path, self.synchronous))
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from None
        if not self._reserve.take():
            log.warning("outbox %s: no room for its %d KiB reserve; on a full disk acks wait in memory",
                        self.path, RESERVE_BYTES >> 10)
        if self.backlog():
            self._put_event.set()  # what a previous run left is waiting to go

    # --- the file ----------------------------------------------------------
    def _adopt(self, db: sqlite3.Connection, contents: sql.Contents) -> None:
        self._db = db
        self._count, self._bytes, self._dropped = contents.count, contents.nbytes, contents.dropped
        self._last_id, self._sequences = contents.last_id, contents.sequences

    def _locked(self, op: Callable[[sqlite3.Connection], _T], retry: bool = True) -> _T:
        with self._lock:
            try:
                return self._run(op, retry)
            except _Unwritable as exc:
                raise OutboxError(f"{self.path}: {exc}") from None

    def _run(self, op: Callable[[sqlite3.Connection], _T], retry: bool = True) -> _T:
        """Run `op` (the lock held); after corruption, once more on a fresh file."""
        if self._db is None:
            raise OutboxError(f"{self.path}: the outbox is closed")
        try:
            return op(self._db)
        except BaseException as exc:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.Error):
                raise
            if is_unwritable(exc):
                raise _Unwritable(str(exc)) from None
            if not (retry and is_corrupt(exc)):
                raise OutboxError(f"{self.path}: {exc}") from None
            self._start_over(str(exc))
        return self._run(op, retry=False)

    def _start_over(self, reason: str) -> None:
        """Corruption while running: a new file where ids, sequences and drop counts go on from
        where they were (the link pages by id, consumers order by sequence)."""
        self._db.close()
        self._db = None
        last_id, dropped, sequences = self._last_id, self._dropped, self._sequences
        try:
            db, _ = open_file(self.path, self.synchronous, reason)
            db.execute("INSERT INTO sqlite_sequence VALUES ('messages', ?)", (last_id,))
            counters = [(f"dropped.{k}", n) for k, n in dropped.items()]
            db.executemany(sql.BUMP, counters + [(f"seq.{k}", n) for k, n in sequences.items()])
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot start a new outbox: {exc}") from None
        self._db, self._last_id, self._dropped, self._sequences = db, last_id, dropped, sequences
        self._doomed.clear()  # those rows went with the old file
        self._count = self._memory.by_kind()
        self._bytes = {k: self._memory.bytes_of((k,)) for k in KINDS}

    # --- producers ---------------------------------------------------------
    def put(self, kind: str, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
            replace: bool = False) -> int:
        """Store one message; its id, or 0 if it was dropped at once (the outbox is full of more
        important kinds: counted). `replace` first removes the pending messages on `topic` (a
        retained document: only the newest matters); they do not count as dropped."""
        if kind not in KINDS:
            raise OutboxError(f"unknown message kind {kind!r}, expected one of {', '.join(KINDS)}")
        if qos not in (0, 1, 2):
            raise OutboxError(f"qos must be 0, 1 or 2, not {qos!r}")
        encoded = topic.encode()  # a topic the broker refuses would block the queue: refuse it here
        if not topic or len(encoded) > MAX_TOPIC_BYTES or "+" in topic or "#" in topic or "\0" in topic:
            raise OutboxError(f"{topic!r} is not a topic one can publish to")
        payload = bytes(payload)
        size = len(encoded) + len(payload)
        if size > self.max_bytes:
            raise OutboxError(f"a {size}-byte message on {topic} exceeds the outbox's {self.max_bytes} bytes")
        row: Row = (kind, topic, payload, qos, int(retain), time.time(), size)
        with self._lock:
            self._maybe_recover()
            msg_id = 0
            if not self._full:
                try:
                    msg_id = self._run(lambda db: self._put(db, self._last_id + 1, row, replace))
                except _Unwritable as exc:
                    self._become_full(str(exc))
            if self._full:
                msg_id = self._hold(row, replace)
        self._put_event.set()
        return msg_id

    def _put(self, db: sqlite3.Connection, msg_id: int, row: Row, replace: bool) -> int:
        kind, topic, size = row[0], row[1], row[-1]
        count, nbytes = self._count, self._bytes
        fits = sum(count.values()) < self.max_messages and sum(nbytes.values()) + size <= self.max_bytes
        if fits and not replace:
            db.execute(sql.INSERT, (msg_id, *row))  # fast: one autocommit statement
            self._last_id = max(self._last_id, msg_id)
            count[kind] += 1
            nbytes[kind] += size
            return msg_id
        count, nbytes, dropped = dict(count), dict(nbytes), {}  # applied only once committed
        db.execute("BEGIN IMMEDIATE")
        if replace:
            replaced = db.execute("DELETE FROM messages WHERE topic = ? RETURNING kind, size", (topic,))
            for old, old_size in replaced.fetchall():
                count[old], nbytes[old] = count[old] - 1, nbytes[old] - old_size
        victims = KINDS[: KINDS.index(kind) + 1]  # never an event for a health sample
        if sum(count.values()) - sum(count[v] for v in victims) >= self.max_messages or (
            sum(nbytes.values()) - sum(nbytes[v] for v in victims) + size > self.max_bytes
        ):  # full of more important messages: this one is the one to drop
            db.execute("ROLLBACK")
            db.execute(sql.BUMP, (f"dropped.{kind}", 1))
            self._count_drops({kind: 1})
            return 0
        for victim in victims:
            need_n = sum(count.values()) + 1 - self.max_messages
            need_b = sum(nbytes.values()) + size - self.max_bytes
            if need_n <= 0 and need_b <= 0:
                break
            n, b = self._evict(db, victim, need_n, need_b)
            if n:
                count[victim], nbytes[victim], dropped[victim] = count[victim] - n, nbytes[victim] - b, n
        db.execute(sql.INSERT, (msg_id, *row))
        db.execute("COMMIT")
        self._last_id = max(self._last_id, msg_id)
        count[kind], nbytes[kind] = count[kind] + 1, nbytes[kind] + size
        self._count, self._bytes = count, nbytes
        self._count_drops(dropped)
        return msg_id

    def _evict(self, db: sqlite3.Connection, victim: str, need_n: int, need_b: int) -> tuple[int, int]:
        """Delete the oldest messages of one kind, at least `need_n` of them and `need_b` bytes
        (or all there are), and count them as dropped, in the caller's transaction."""
        last, n, b = 0, 0, 0
        oldest = db.execute("SELECT id, size FROM messages WHERE kind = ? ORDER BY id", (victim,))
        with contextlib.closing(oldest) as rows:
            for last, msg_size in rows:  # last: where the oldest of this kind end
                if last in self._doomed:
                    continue  # acked already, not a drop (and not counted in the backlog)
                n, b = n + 1, b + msg_size
                if n >= need_n and b >= need_b:
                    break
        if n:
            db.execute("DELETE FROM messages WHERE kind = ? AND id <= ?", (victim, last))
            db.execute(sql.BUMP, (f"dropped.{victim}", n))
            self._doomed -= {i for i in self._doomed if i <= last}
        return n, b

    def _count_drops(self, dropped: dict[str, int]) -> None:
        for kind, n in dropped.items():
            self._dropped[kind] += n
        if dropped and not self._dropping and not self._full:
            self._dropping = True
            log.warning("outbox %s is full (%d messages or %d bytes): dropping the oldest messages, "
                        "health first, events last", self.path, self.max_messages, self.max_bytes)

    def next_sequence(self, name: str = "events") -> int:
        """The next number of a persistent counter (1, 2, ...), monotonic across restarts."""
        def bump(db: sqlite3.Connection) -> int:
            # fetchall(): the autocommit transaction ends with the statement
            [(value,)] = db.execute(f"{sql.BUMP} RETURNING value", (f"seq.{name}", 1)).fetchall()
            self._sequences[name] = value
            return value

        with self._lock:
            self._maybe_recover()
            if not self._full:
                try:
                    return self._run(bump)
                except _Unwritable as exc:
                    self._become_full(str(exc))
            value = self._sequences[name] = self._sequences.get(name, 0) + 1
            self._unsaved_sequences.add(name)  # written with the messages that carry it
            return value

    # --- the link thread ---------------------------------------------------
    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutgoingMessage]:
        """Up to `limit` messages with an id above `after_id`, oldest first."""
        with self._lock:
            self._maybe_recover()
            doomed = json.dumps(sorted(self._doomed))
            try:
                rows = self._run(lambda db: db.execute(sql.PENDING, (after_id, doomed, limit)).fetchall())
            except _Unwritable:
                rows = []  # a disk failing reads too: what memory holds still goes
            held = self._memory.after(after_id, limit)
        rows = sorted(rows + held, key=lambda r: r[0])[:limit]
        return [OutgoingMessage(i, k, t, p, q, bool(r), c) for i, k, t, p, q, r, c in rows]

    def ack(self, *ids: int) -> None:
        """The broker has these: delete them. Unknown ids (a duplicate PUBACK) are ignored. Never
        fails on a full disk: an ack that cannot be written yet is kept and written later."""
        if not ids:
            return
        with self._lock:
            on_disk = [int(i) for i in ids if self._unhold(int(i)) is None]
            if on_disk:
                self._forget(on_disk)
            self._maybe_recover()
            half_empty = 2 * sum(self._count.values()) <= self.max_messages
            if self._dropping and half_empty and 2 * sum(self._bytes.values()) <= self.max_bytes:
                self._dropping = False
                log.info("outbox %s has room again; dropped so far: %s", self.path, self._dropped)

    def _forget(self, ids: list[int]) -> None:
        """Delete these rows; while even that fails, remember them as gone."""
        ids = [i for i in ids if i not in self._doomed]
        if not ids:
            return
        try:
            self._run(lambda db: self._delete(db, json.dumps(ids)))
        except _Unwritable as exc:
            self._become_full(str(exc))
            self._doomed.update(ids)
            with contextlib.suppress(_Unwritable):
                query = "SELECT kind, size FROM messages WHERE id IN (SELECT value FROM json_each(?))"
                for kind, size in self._run(lambda db: db.execute(query, (json.dumps(ids),)).fetchall()):
                    self._count[kind] -= 1
                    self._bytes[kind] -= size

    def _delete(self, db: sqlite3.Connection, ids: str) -> None:
        for kind, size in db.execute(sql.DELETE, (ids,)).fetchall():
            self._count[kind] -= 1
            self._bytes[kind] -= size

    def wait(self, timeout: float) -> bool:
        """Block until something was put since the last call, or `timeout` s passed. Call it
        before `pending`: a put landing after the wake-up wakes the next call."""
        if self._put_event.wait(timeout):
            self._put_event.clear()
            return True
        return False

    # --- a full disk -------------------------------------------------------
    def _hold(self, row: Row, replace: bool) -> int:
        """Keep a message in memory while the file cannot take it; its id, 0 if it went at once."""
        kind, topic = row[0], row[1]
        if replace:
            for old in self._memory.ids(topic=topic):
                self._unhold(old)
            with contextlib.suppress(_Unwritable):
                query = "SELECT id FROM messages WHERE topic = ?"
                self._forget([i for (i,) in self._run(lambda db: db.execute(query, (topic,)).fetchall())])
        msg_id = self._last_id = self._last_id + 1
        self._count[kind] += 1
        self._bytes[kind] += row[-1]
        dropped: dict[str, int] = {}
        for gone in self._memory.add(msg_id, row):
            self._count[gone[0]] -= 1
            self._bytes[gone[0]] -= gone[-1]
            dropped[gone[0]] = dropped.get(gone[0], 0) + 1
        for lost, n in dropped.items():
            self._dropped[lost] += n
            self._unsaved_drops[lost] = self._unsaved_drops.get(lost, 0) + n
        if dropped.get("event") and not self._losing_events:
            self._losing_events = True
            log.error("outbox %s: the disk is full and the %d messages or %d bytes kept in memory are "
                      "used up: events are being lost (counted in dropped.event)", self.path,
                      self.memory_messages, self.memory_bytes)
        return msg_id if msg_id in self._memory else 0

    def _unhold(self, msg_id: int) -> Row | None:
        row = self._memory.pop(msg_id)
        if row is not None:
            self._count[row[0]] -= 1
            self._bytes[row[0]] -= row[-1]
        return row

    def _become_full(self, reason: str) -> None:
        self._next_try = time.monotonic() + RETRY_S
        if self._full:
            return
        self._full, self._full_since = reason, time.time()
        self._reserve.release()  # room for acks and evictions
        log.warning("outbox %s cannot be written (%s): keeping new messages in memory (at most %d), "
                    "dropping old health and results on disk to make room for events", self.path,
                    reason, self.memory_messages)

    def _maybe_recover(self) -> None:
        """While the disk is full, at most every RETRY_S: write what memory holds if the disk has
        room again (for the reserve and as much again), else make room for the events."""
        if not self._full or time.monotonic() < self._next_try or self._db is None:
            return
        self._next_try = time.monotonic() + RETRY_S
        try:
            room = shutil.disk_usage(self.path.parent).free
        except OSError:
            room = 0
        if room >= 2 * RESERVE_BYTES and self._reserve.take():
            held = len(self._memory)
            if self._write_back(KINDS[::-1]):
                log.info("outbox %s can be written again after %.0f s: wrote the %d messages kept in "
                         "memory; dropped so far: %s", self.path, time.time() - self._full_since, held,
                         self._dropped)
                self._full, self._losing_events = "", False
                return
            self._reserve.release()
            return
        important = self._memory.bytes_of(("state", "event"))
        if important:
            try:
                self._run(functools.partial(self._make_room, 2 * important + (16 << 10)))
            except _Unwritable:
                return
            self._write_back(("event", "state"))

    def _make_room(self, need: int, db: sqlite3.Connection) -> None:
        """Drop the oldest health reports, then results, on disk: their pages take events."""
        db.execute("BEGIN IMMEDIATE")
        dropped = {}
        for victim in ("health", "result"):
            n, b = self._evict(db, victim, 0, need)
            if n:
                dropped[victim], need = (n, b), need - b
            if need <= 0:
                break
        db.execute("COMMIT")
        for victim, (n, b) in dropped.items():
            self._count[victim], self._bytes[victim] = self._count[victim] - n, self._bytes[victim] - b
        self._count_drops({victim: n for victim, (n, _) in dropped.items()})
        db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()  # the next commits reuse the WAL

    def _write_back(self, kinds: tuple[str, ...]) -> bool:
        """Write the acks, counters and (of `kinds`) messages kept in memory; True once all are."""
        def save(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            if self._doomed:
                db.execute(sql.DELETE, (json.dumps(sorted(self._doomed)),)).fetchall()
            db.executemany(sql.BUMP, [(f"dropped.{k}", n) for k, n in self._unsaved_drops.items()])
            db.executemany(sql.RAISE, [(f"seq.{n}", self._sequences[n]) for n in self._unsaved_sequences])
            db.execute("COMMIT")
            self._doomed.clear()
            self._unsaved_drops.clear()
            self._unsaved_sequences.clear()

        try:
            self._run(save)
            for kind in kinds:
                for msg_id in self._memory.ids(kind):
                    row = self._unhold(msg_id)
                    assert row is not None
                    try:
                        self._run(functools.partial(self._put, msg_id=msg_id, row=row, replace=False))
                    except _Unwritable:
                        self._memory.put_back(msg_id, row)
                        self._count[row[0]] += 1
                        self._bytes[row[0]] += row[-1]
                        raise
        except _Unwritable:
            return False
        return not self._memory

    # --- numbers -----------------------------------------------------------
    def backlog(self) -> int:
        with self._lock:
            return sum(self._count.values())

    def backlog_by_kind(self) -> dict[str, int]:
        with self._lock:
            return dict(self._count)

    def backlog_bytes(self) -> int:
        """Topic plus payload bytes waiting: what max_bytes bounds (the file adds some overhead)."""
        with self._lock:
            return sum(self._bytes.values())

    def dropped(self) -> dict[str, int]:
        """Messages dropped to make room, per kind, since the file was created."""
        with self._lock:
            return dict(self._dropped)

    def condition(self) -> dict[str, object]:
        """For health: can the file be written, and if not why, since when, what waits in memory."""
        with self._lock:
            return {"writable": not self._full, "problem": self._full,
                    "since": round(self._full_since, 3) if self._full else None,
                    "in_memory": self._memory.by_kind(), "acks_unsaved": len(self._doomed)}

    def recover(self) -> None:
        """Look at a full disk again (the link calls this at least once a second)."""
        with self._lock:
            self._maybe_recover()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                if self._full:  # a last try: acks and counters fit in the reserve
                    self._write_back(KINDS[::-1])
                if self._memory:
                    log.error("outbox %s: closing on a full disk: %d messages kept in memory are lost (%s)",
                              self.path, len(self._memory), self._memory.by_kind())
                self._db.close()
                self._db = None
        self._put_event.set()  # a waiting link thread wakes and finds it closed
