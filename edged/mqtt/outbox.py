"""The durable store-and-forward outbox: everything edged publishes over MQTT waits here.

Producers (pipelines, model manager listeners, the health timer) `put` from any thread;
the link thread reads `pending` in id order while connected and `ack`s a message when its
PUBACK arrives, so a message leaves only once the broker has it (QoS 1: what was sent but
not acked goes again after a reconnect, and the broker may see it twice).

One SQLite file in WAL mode, one connection behind one lock, one transaction per put.
Ids come from AUTOINCREMENT under that lock: never reused, and each committed before a
larger one exists, so paging with `pending(after_id)` never skips a message.

Durability: `put` returns once its commit is in the WAL file, so `kill -9` of the daemon
loses nothing put. `synchronous="NORMAL"` does not fsync each commit: a power cut or
kernel crash may roll back the commits since the last checkpoint (messages, drop counters
and sequence numbers alike, so a sequence number can be issued twice) but never corrupts
the file. `"FULL"` fsyncs every commit: durable, at one disk flush per put.

The file is locked exclusively (a second daemon on it gets OutboxError) and untrusted: one
that is not an outbox (corrupt, foreign, another schema) is moved aside to
`<path>.corrupt-<time>` and replaced by an empty one, at open or when SQLite reports
corruption later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from edged.errors import OutboxError

log = logging.getLogger(__name__)

KINDS = ("health", "result", "state", "event")  # the order they are dropped in when full
SCHEMA_VERSION = 1  # the value _SCHEMA writes
_SCHEMA = """BEGIN;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, created_at REAL NOT NULL,
    size INTEGER NOT NULL);
CREATE INDEX messages_kind ON messages (kind);
CREATE INDEX messages_topic ON messages (topic);
INSERT INTO meta VALUES ('schema_version', 1);
COMMIT;"""
_COLUMNS = "id, kind, topic, payload, qos, retain, created_at"
_PENDING = f"SELECT {_COLUMNS} FROM messages WHERE id > ? ORDER BY id LIMIT ?"  # noqa: S608
_INSERT = "INSERT INTO messages (kind, topic, payload, qos, retain, created_at, size) VALUES (?,?,?,?,?,?,?)"
_BUMP = "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = value + excluded.value"
_ACK = "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) RETURNING kind, size"
MAX_TOPIC_BYTES = 65535
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


class _NotAnOutbox(sqlite3.DatabaseError):
    """A readable SQLite file that is not an outbox of this schema: handled as a corrupt one."""

    sqlite_errorcode = sqlite3.SQLITE_NOTADB


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class Outbox:
    def __init__(
        self, path: Path, max_messages: int = 100_000, max_bytes: int = 64 << 20, synchronous: str = "NORMAL"
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise OutboxError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        if max_messages < 1 or max_bytes < 1:
            raise OutboxError("max_messages and max_bytes must be positive")
        self.path = Path(path)
        self.max_messages, self.max_bytes, self.synchronous = max_messages, max_bytes, synchronous.upper()
        self._lock = threading.Lock()
        self._put_event = threading.Event()
        self._dropping = False  # warned that it drops; reset once the backlog is half empty again
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._open()
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from None
        if self.backlog():
            self._put_event.set()  # what a previous run left is waiting to go

    # --- the file ----------------------------------------------------------
    def _open(self, reason: str = "") -> None:
        """Connect; a file that is corrupt or no outbox is moved aside (once) for an empty one."""
        if reason:
            stamp = datetime.now().strftime("%Y%m%dT%H%M%S.%f")
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            os.replace(self.path, target)
            for suffix in ("-wal", "-shm", "-journal"):  # never replay an old journal into the new file
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{target}{suffix}")
            log.error("outbox %s is unusable (%s); moved it to %s, starting empty", self.path, reason, target)
        try:
            self._connect()
        except sqlite3.Error as exc:
            if reason or not _is_corrupt(exc):
                raise
            self._open(str(exc))

    def _connect(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # SQLite gives its -wal file the same mode
        finally:
            os.close(fd)
        # The timeout only matters against another process: the old daemon still shutting down.
        db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
        try:
            # Small pages: a commit writes each page it touches to the WAL; 1 KiB halves a put.
            db.execute("PRAGMA page_size = 1024")  # applies to a new file only
            # Exclusive before WAL: the WAL index lives in process memory, no -shm to map.
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchall():
                db.executescript(_SCHEMA)  # a new file, or one whose creation was interrupted
            self._load(db)  # before anything is written to a file that may not be ours
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            db.execute("PRAGMA journal_size_limit = 8388608")  # the WAL shrinks back after a burst
        except BaseException:
            db.close()
            raise
        self._db = db

    def _load(self, db: sqlite3.Connection) -> None:
        try:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise _NotAnOutbox(f"schema version {meta.get('schema_version')!r}, not {SCHEMA_VERSION}")
            db.execute(_PENDING, (0, 0)).fetchall()  # every column is there
            totals = db.execute("SELECT kind, count(*), total(size) FROM messages GROUP BY kind").fetchall()
            last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchall()
        except sqlite3.Error as exc:
            if (getattr(exc, "sqlite_errorcode", 0) or 0) != sqlite3.SQLITE_ERROR:
                raise
            raise _NotAnOutbox(str(exc)) from None  # "no such table/column"
        if not {kind for kind, _, _ in totals} <= set(KINDS):
            raise _NotAnOutbox("unknown message kinds")
        self._count = dict.fromkeys(KINDS, 0) | {kind: n for kind, n, _ in totals}
        self._bytes = dict.fromkeys(KINDS, 0) | {kind: int(size) for kind, _, size in totals}
        self._dropped = {kind: meta.get(f"dropped.{kind}", 0) for kind in KINDS}
        self._last_id = last[0][0] if last else 0
        self._sequences = {key[4:]: value for key, value in meta.items() if key.startswith("seq.")}

    def _locked(self, op: Callable[[sqlite3.Connection], _T], retry: bool = True) -> _T:
        """Run `op` under the lock; after corruption, once more on a fresh file."""
        with self._lock:
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
                if not (retry and _is_corrupt(exc)):
                    raise OutboxError(f"{self.path}: {exc}") from None
                self._start_over(str(exc))
        return self._locked(op, retry=False)

    def _start_over(self, reason: str) -> None:
        """Corruption while running: a new file where ids, sequences and drop counts go on from
        where they were (the link pages by id, consumers order by sequence)."""
        assert self._db is not None
        self._db.close()
        self._db = None
        last_id, dropped, sequences = self._last_id, self._dropped, self._sequences
        try:
            self._open(reason)
            assert self._db is not None
            self._db.execute("INSERT INTO sqlite_sequence VALUES ('messages', ?)", (last_id,))
            counters = [(f"dropped.{k}", n) for k, n in dropped.items()]
            self._db.executemany(_BUMP, counters + [(f"seq.{k}", n) for k, n in sequences.items()])
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot start a new outbox: {exc}") from None
        self._last_id, self._dropped, self._sequences = last_id, dropped, sequences

    # --- producers ---------------------------------------------------------
    def put(
        self, kind: str, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
        replace: bool = False,
    ) -> int:
        """Store one message durably; its id, or 0 if the outbox is full of more important kinds
        (then this one is counted as dropped). `replace` first removes the pending messages on
        `topic` (a retained document: only the newest matters); they do not count as dropped."""
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
        row = (kind, topic, payload, qos, int(retain), time.time(), size)
        msg_id = self._locked(lambda db: self._put(db, row, replace))
        self._put_event.set()
        return msg_id

    def _put(self, db: sqlite3.Connection, row: tuple, replace: bool) -> int:
        kind, topic, size = row[0], row[1], row[-1]
        count, nbytes = self._count, self._bytes
        fits = sum(count.values()) < self.max_messages and sum(nbytes.values()) + size <= self.max_bytes
        if fits and not replace:
            msg_id = self._last_id = db.execute(_INSERT, row).lastrowid  # fast: one autocommit statement
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
            db.execute(_BUMP, (f"dropped.{kind}", 1))
            self._count_drops({kind: 1})
            return 0
        for victim in victims:
            need_n = sum(count.values()) + 1 - self.max_messages
            need_b = sum(nbytes.values()) + size - self.max_bytes
            if need_n <= 0 and need_b <= 0:
                break
            last, n, b = 0, 0, 0
            oldest = db.execute("SELECT id, size FROM messages WHERE kind = ? ORDER BY id", (victim,))
            with contextlib.closing(oldest) as rows:
                for last, msg_size in rows:  # noqa: B007 (last: where the oldest of this kind end)
                    n, b = n + 1, b + msg_size
                    if n >= need_n and b >= need_b:
                        break
            if n:
                db.execute("DELETE FROM messages WHERE kind = ? AND id <= ?", (victim, last))
                db.execute(_BUMP, (f"dropped.{victim}", n))
                count[victim], nbytes[victim], dropped[victim] = count[victim] - n, nbytes[victim] - b, n
        msg_id = db.execute(_INSERT, row).lastrowid
        db.execute("COMMIT")
        self._last_id = msg_id
        count[kind], nbytes[kind] = count[kind] + 1, nbytes[kind] + size
        self._count, self._bytes = count, nbytes
        self._count_drops(dropped)
        return msg_id

    def _count_drops(self, dropped: dict[str, int]) -> None:
        for kind, n in dropped.items():
            self._dropped[kind] += n
        if dropped and not self._dropping:
            self._dropping = True
            log.warning("outbox %s is full (%d messages or %d bytes): dropping the oldest messages, "
                        "health first, events last", self.path, self.max_messages, self.max_bytes)

    def next_sequence(self, name: str = "events") -> int:
        """The next number of a persistent counter (1, 2, ...), monotonic across restarts."""
        def bump(db: sqlite3.Connection) -> int:
            # fetchall(): the autocommit transaction ends with the statement
            [(value,)] = db.execute(f"{_BUMP} RETURNING value", (f"seq.{name}", 1)).fetchall()
            self._sequences[name] = value
            return value

        return self._locked(bump)

    # --- the link thread ---------------------------------------------------
    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutgoingMessage]:
        """Up to `limit` messages with an id above `after_id`, oldest first."""
        rows = self._locked(lambda db: db.execute(_PENDING, (after_id, limit)).fetchall())
        return [OutgoingMessage(i, k, t, p, q, bool(r), c) for i, k, t, p, q, r, c in rows]

    def ack(self, *ids: int) -> None:
        """The broker has these: delete them. Unknown ids (a duplicate PUBACK) are ignored."""
        if ids:
            self._locked(lambda db: self._ack(db, [int(i) for i in ids]))

    def _ack(self, db: sqlite3.Connection, ids: list[int]) -> None:
        for kind, size in db.execute(_ACK, (json.dumps(ids),)).fetchall():
            self._count[kind] -= 1
            self._bytes[kind] -= size
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
                self._db.close()
                self._db = None
        self._put_event.set()  # a waiting link thread wakes and finds it closed
