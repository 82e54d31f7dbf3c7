"""The outbox on a full disk (or one failing writes): a state, not an error.

When SQLite says SQLITE_FULL, the outbox gives its reserve (edged/mqtt/outbox_file.py) back
to the disk, so acks and evictions can still be written, and keeps new messages in memory
(`Held`: bounded, health lost first, events last, every loss counted). At most every RETRY_S
it looks again: with room for the reserve and as much again, it writes back everything held
and is writable again; without, it drops the oldest health reports and results on disk so
that the events held in memory fit in their pages. One log line when it starts, one when it
is over, one if events ever have to go.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from edged.mqtt import outbox_file as sql
from edged.mqtt.outbox_file import KINDS, RESERVE_BYTES, OutboxFile, Reserve, Unwritable
from edged.mqtt.outbox_memory import Held, Row

log = logging.getLogger("edged.mqtt.outbox")
RETRY_S = 1.0  # how often a full disk is looked at again
IMPORTANT = ("event", "state")  # what is written into room made by dropping health and results
EVICT_BATCH = 256 << 10  # bytes of health and results dropped per transaction on a full disk
PAGE = 1024  # the file's page size (a new file's): a row costs its bytes and about a page more


class FullDisk(OutboxFile):
    _put: Callable[..., int]  # Outbox's: store one message (its id, 0 if it was dropped)
    _count_drops: Callable[[dict[str, int]], None]

    def __init__(self, path: Path, synchronous: str, memory_messages: int, memory_bytes: int) -> None:
        super().__init__(path, synchronous)
        self.memory_messages, self.memory_bytes = memory_messages, memory_bytes
        self._reserve = Reserve(self.path)
        self._memory = Held(memory_messages, memory_bytes)  # messages put while the disk was full
        self._doomed: set[int] = set()  # acked while even deletes failed: deleted once possible
        self._unsaved_drops: dict[str, int] = {}  # drop counts not written yet
        self._unsaved_sequences: set[str] = set()
        self._full = ""  # why the file cannot be written now; "" while it can
        self._full_since = 0.0
        self._next_try = 0.0
        self._losing_events = False
        if not self._reserve.take():
            log.warning("outbox %s: no room for its %d KiB reserve; on a full disk acks wait in memory",
                        self.path, RESERVE_BYTES >> 10)

    def _start_over(self, reason: str) -> None:
        super()._start_over(reason)
        self._doomed.clear()  # those rows went with the old file
        self._count = self._memory.by_kind()
        self._bytes = {k: self._memory.bytes_of((k,)) for k in KINDS}

    def _hold(self, row: Row, replace: bool) -> int:
        """Keep a message in memory while the file cannot take it; its id, 0 if it went at once."""
        kind, topic = row[0], row[1]
        if replace:
            for old in self._memory.ids(topic=topic):
                self._unhold(old)
            with contextlib.suppress(Unwritable):
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
        # No room on the disk: events and states go only into pages freed inside the file (by
        # dropping old health and results, a bounded batch at a time so that each deletion fits
        # in the WAL), never where the file would grow into the room left for acks.
        while True:
            held = self._memory.by_kind()
            want = self._memory.bytes_of(IMPORTANT) + PAGE * sum(held[k] for k in IMPORTANT)
            if not want:
                return
            try:
                room = self._run(_free_pages)
                if room < want:
                    before = room
                    self._run(functools.partial(self._make_room, min(want - room, EVICT_BATCH)))
                    room = self._run(_free_pages)
                    if room <= before:
                        log.debug("outbox %s: nothing left to drop for %d bytes", self.path, want)
                        return  # the rest waits in memory
                self._run(_checkpoint)  # the WAL starts over: the writes below reuse its space
            except Unwritable as exc:
                log.debug("outbox %s: no room made for %d bytes yet: %s", self.path, want, exc)
                return
            if self._write_back(IMPORTANT, budget=room) or self._memory.by_kind() == held:
                log.debug("outbox %s: %s in memory after writing into %d free bytes", self.path,
                          self._memory.by_kind(), room)
                return  # all written, or none could be: try again in RETRY_S

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
        _checkpoint(db)

    def _write_back(self, kinds: tuple[str, ...], budget: int | None = None) -> bool:
        """Write the acks, counters and the messages of `kinds` kept in memory (those that fit
        in `budget` bytes of free pages, if given); True once all are."""
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
                    if budget is not None:
                        budget -= row[-1] + PAGE
                        if budget < 0:
                            self._memory.put_back(msg_id, row)
                            self._count[row[0]] += 1
                            self._bytes[row[0]] += row[-1]
                            return False
                    try:
                        self._run(functools.partial(self._put, msg_id=msg_id, row=row, replace=False))
                    except Unwritable:
                        self._memory.put_back(msg_id, row)
                        self._count[row[0]] += 1
                        self._bytes[row[0]] += row[-1]
                        raise
        except Unwritable:
            return False
        return True

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

    def _forget(self, ids: list[int]) -> None:
        """Delete these rows; while even that fails, remember them as gone."""
        ids = [i for i in ids if i not in self._doomed]
        if not ids:
            return
        try:
            self._run(lambda db: self._delete(db, json.dumps(ids)))
        except Unwritable as exc:
            self._become_full(str(exc))
            self._doomed.update(ids)
            with contextlib.suppress(Unwritable):
                query = "SELECT kind, size FROM messages WHERE id IN (SELECT value FROM json_each(?))"
                for kind, size in self._run(lambda db: db.execute(query, (json.dumps(ids),)).fetchall()):
                    self._count[kind] -= 1
                    self._bytes[kind] -= size

    def _delete(self, db: sqlite3.Connection, ids: str) -> None:
        for kind, size in db.execute(sql.DELETE, (ids,)).fetchall():
            self._count[kind] -= 1
            self._bytes[kind] -= size

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


def _checkpoint(db: sqlite3.Connection) -> None:
    """Copy the WAL into the database and start it over: the next commits reuse its space."""
    db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()


def _free_pages(db: sqlite3.Connection) -> int:
    """Bytes of the pages inside the file that nothing uses: room that does not grow it."""
    [(pages,)] = db.execute("PRAGMA freelist_count").fetchall()
    [(size,)] = db.execute("PRAGMA page_size").fetchall()
    return int(pages) * int(size)
