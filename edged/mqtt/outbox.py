"""The durable store-and-forward outbox: everything edged publishes over MQTT waits here.

Producers (pipelines, the model manager's event hooks, the health timer) `put` from any thread;
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

A full disk (or one failing writes) is a state, not an error (edged/mqtt/outbox_full.py):
acks still get written, new messages wait in memory, bounded, and nothing is lost silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edged.errors import OutboxError
from edged.mqtt import outbox_file as sql
from edged.mqtt.outbox_file import KINDS, Unwritable
from edged.mqtt.outbox_full import FullDisk
from edged.mqtt.outbox_memory import Row

__all__ = ["KINDS", "Outbox", "OutgoingMessage"]
# One more than the stored value, or than the one given out while it could not be stored.
_NEXT = ("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) "
         "DO UPDATE SET value = max(value + 1, excluded.value) RETURNING value")
log = logging.getLogger(__name__)
MAX_TOPIC_BYTES = 65535
MEMORY_MESSAGES = 10_000  # messages held in memory while the disk is full ...
MEMORY_BYTES = 8 << 20  # ... and their bytes


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float  # time.time() at put: how stale it is when it finally goes


class Outbox(FullDisk):
    def __init__(self, path: Path, max_messages: int = 100_000, max_bytes: int = 64 << 20,
                 synchronous: str = "NORMAL", memory_messages: int = MEMORY_MESSAGES,
                 memory_bytes: int = MEMORY_BYTES) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise OutboxError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        if min(max_messages, max_bytes, memory_messages, memory_bytes) < 1:
            raise OutboxError("max_messages, max_bytes and the memory bounds must be positive")
        super().__init__(path, synchronous.upper(), memory_messages, memory_bytes)
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._put_event = threading.Event()
        self._dropping = False  # warned that it drops; reset once the backlog is half empty again
        if self.backlog():
            self._put_event.set()  # what a previous run left is waiting to go

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
                except Unwritable as exc:
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

    def _count_drops(self, dropped: dict[str, int]) -> None:
        for kind, n in dropped.items():
            self._dropped[kind] += n
        if dropped and not self._dropping and not self._full:
            self._dropping = True
            log.warning("outbox %s is full (%d messages or %d bytes): dropping the oldest messages, "
                        "health first, events last", self.path, self.max_messages, self.max_bytes)

    def next_sequence(self, name: str = "events") -> int:
        """The next number of a persistent counter (1, 2, ...), monotonic across restarts. Written
        on a full disk too (one page, rewritten in place: the reserve has room for it), so a number
        an event already went out with is not given again after a restart."""
        def bump(db: sqlite3.Connection) -> int:
            # fetchall(): the autocommit transaction ends with the statement
            [(value,)] = db.execute(_NEXT, (f"seq.{name}", self._sequences.get(name, 0) + 1)).fetchall()
            self._sequences[name] = value
            self._unsaved_sequences.discard(name)
            return value

        with self._lock:
            self._maybe_recover()
            try:
                return self._run(bump)
            except Unwritable as exc:
                self._become_full(str(exc))
            value = self._sequences[name] = self._sequences.get(name, 0) + 1
            self._unsaved_sequences.add(name)  # written once the disk takes it
            return value

    # --- the link thread ---------------------------------------------------
    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutgoingMessage]:
        """Up to `limit` messages with an id above `after_id`, oldest first."""
        with self._lock:
            self._maybe_recover()
            doomed = json.dumps(sorted(self._doomed))
            try:
                rows = self._run(lambda db: db.execute(sql.PENDING, (after_id, doomed, limit)).fetchall())
            except Unwritable:
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

    def wait(self, timeout: float) -> bool:
        """Block until something was put since the last call, or `timeout` s passed. Call it
        before `pending`: a put landing after the wake-up wakes the next call."""
        if self._put_event.wait(timeout):
            self._put_event.clear()
            return True
        return False

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

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                if self._full:  # a last try: acks and counters fit in the reserve
                    self._write_back(KINDS[::-1])
                if self._memory:
                    lost = {k: n for k, n in self._memory.by_kind().items() if n}
                    log.error("outbox %s: closing on a full disk: %d messages kept in memory are lost (%s)",
                              self.path, len(self._memory), lost)
                    counters = [(f"dropped.{k}", n) for k, n in lost.items()]
                    with contextlib.suppress(Unwritable, OutboxError):  # counted if the disk lets us
                        self._run(lambda db: db.executemany(sql.BUMP, counters))
                self._db.close()
                self._db = None
        self._put_event.set()  # a waiting link thread wakes and finds it closed
