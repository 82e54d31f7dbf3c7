"""The outbox's SQLite file: its schema, opening it safely, moving a corrupt one aside, and
the reserve that keeps acks writable on a full disk.

The file is locked exclusively (a second daemon on it gets an error) and untrusted: one that
is not an outbox (corrupt, foreign, another schema) is moved aside to `<path>.corrupt-<time>`
and replaced by an empty one.

A full disk surfaces as SQLITE_FULL ("database or disk is full") on whatever statement had to
grow the WAL or the database. Deleting rows needs a little room too (the WAL records the
change), so a full disk would also refuse acks, and the messages the broker already has would
be sent again after a restart. `Reserve` is a file of RESERVE_BYTES allocated beside the outbox
while all is well and given back the moment the disk fills up: acks and evictions are then
written into that room.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from edged.errors import OutboxError

log = logging.getLogger("edged.mqtt.outbox")

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
COLUMNS = "id, kind, topic, payload, qos, retain, created_at"
PENDING = (f"SELECT {COLUMNS} FROM messages WHERE id > ? "  # noqa: S608
           "AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?")
INSERT = ("INSERT INTO messages (id, kind, topic, payload, qos, retain, created_at, size) "
          "VALUES (?,?,?,?,?,?,?,?)")
BUMP = "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = value + excluded.value"
RAISE = "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
DELETE = "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) RETURNING kind, size"
RESERVE_BYTES = 1 << 20  # room for ~900 one-page WAL frames: thousands of acks
_T = TypeVar("_T")


class Unwritable(Exception):
    """SQLite could not write (SQLITE_FULL, SQLITE_IOERR): handled as a full disk."""


class NotAnOutbox(sqlite3.DatabaseError):
    """A readable SQLite file that is not an outbox of this schema: handled as a corrupt one."""

    sqlite_errorcode = sqlite3.SQLITE_NOTADB


def is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def is_unwritable(exc: sqlite3.Error) -> bool:
    """A full disk (SQLITE_FULL) or one that fails writes (SQLITE_IOERR_*): the file is intact,
    it just cannot take more for now."""
    code = getattr(exc, "sqlite_errorcode", 0) or 0
    return code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


@dataclass
class Contents:
    """What an opened file holds, read once at open."""

    count: dict[str, int]
    nbytes: dict[str, int]
    dropped: dict[str, int]
    last_id: int
    sequences: dict[str, int]


def open_file(path: Path, synchronous: str, reason: str = "") -> tuple[sqlite3.Connection, Contents]:
    """Connect; a file that is corrupt or no outbox is moved aside (once) for an empty one."""
    if reason:
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S.%f")
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        os.replace(path, target)
        for suffix in ("-wal", "-shm", "-journal"):  # never replay an old journal into the new file
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}{suffix}", f"{target}{suffix}")
        log.error("outbox %s is unusable (%s); moved it to %s, starting empty", path, reason, target)
    try:
        return _connect(path, synchronous)
    except sqlite3.Error as exc:
        if reason or not is_corrupt(exc):
            raise
        return open_file(path, synchronous, str(exc))


def _connect(path: Path, synchronous: str) -> tuple[sqlite3.Connection, Contents]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # SQLite gives its -wal file the same mode
    finally:
        os.close(fd)
    # The timeout only matters against another process: the old daemon still shutting down.
    db = sqlite3.connect(path, timeout=1.0, isolation_level=None, check_same_thread=False)
    try:
        # Small pages: a commit writes each page it touches to the WAL; 1 KiB halves a put.
        db.execute("PRAGMA page_size = 1024")  # applies to a new file only
        # Exclusive before WAL: the WAL index lives in process memory, no -shm to map.
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchall():
            db.executescript(_SCHEMA)  # a new file, or one whose creation was interrupted
        contents = _load(db)  # before anything is written to a file that may not be ours
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("PRAGMA journal_size_limit = 8388608")  # the WAL shrinks back after a burst
    except BaseException:
        db.close()
        raise
    return db, contents


def _load(db: sqlite3.Connection) -> Contents:
    try:
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise NotAnOutbox(f"schema version {meta.get('schema_version')!r}, not {SCHEMA_VERSION}")
        db.execute(PENDING, (0, "[]", 0)).fetchall()  # every column is there
        totals = db.execute("SELECT kind, count(*), total(size) FROM messages GROUP BY kind").fetchall()
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchall()
    except sqlite3.Error as exc:
        if (getattr(exc, "sqlite_errorcode", 0) or 0) != sqlite3.SQLITE_ERROR:
            raise
        raise NotAnOutbox(str(exc)) from None  # "no such table/column"
    if not {kind for kind, _, _ in totals} <= set(KINDS):
        raise NotAnOutbox("unknown message kinds")
    return Contents(
        count=dict.fromkeys(KINDS, 0) | {kind: n for kind, n, _ in totals},
        nbytes=dict.fromkeys(KINDS, 0) | {kind: int(size) for kind, _, size in totals},
        dropped={kind: meta.get(f"dropped.{kind}", 0) for kind in KINDS},
        last_id=last[0][0] if last else 0,
        sequences={key[4:]: value for key, value in meta.items() if key.startswith("seq.")},
    )


class Reserve:
    """RESERVE_BYTES allocated beside the outbox (`<path>.reserve`), given back to the disk when
    it fills up so that acks and evictions can still be written, and taken again once there is
    room for it and more."""

    def __init__(self, outbox_path: Path) -> None:
        self.path = outbox_path.with_name(f"{outbox_path.name}.reserve")

    def take(self) -> bool:
        """Allocate the reserve (real blocks, not a sparse file); False when the disk has no room."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.pwrite(fd, bytes(RESERVE_BYTES), 0)  # a file system without fallocate
            return True
        except OSError:
            self.release()
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def held(self) -> bool:
        return self.path.exists()


class OutboxFile:
    """The outbox's file as its queue logic sees it: one connection behind one lock, the
    totals read at open, and a corrupt file replaced while running by one that carries on."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path, self.synchronous = Path(path), synchronous
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._adopt(*open_file(self.path, self.synchronous))
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from None

    def _adopt(self, db: sqlite3.Connection, contents: Contents) -> None:
        self._db = db
        self._count, self._bytes, self._dropped = contents.count, contents.nbytes, contents.dropped
        self._last_id, self._sequences = contents.last_id, contents.sequences

    def _locked(self, op: Callable[[sqlite3.Connection], _T], retry: bool = True) -> _T:
        with self._lock:
            try:
                return self._run(op, retry)
            except Unwritable as exc:
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
                raise Unwritable(str(exc)) from None
            if not (retry and is_corrupt(exc)):
                raise OutboxError(f"{self.path}: {exc}") from None
            self._start_over(str(exc))
        return self._run(op, retry=False)

    def _start_over(self, reason: str) -> None:
        """Corruption while running: a new file where ids, sequences and drop counts go on from
        where they were (the link pages by id, consumers order by sequence)."""
        assert self._db is not None
        self._db.close()
        self._db = None
        last_id, dropped, sequences = self._last_id, self._dropped, self._sequences
        try:
            db, _ = open_file(self.path, self.synchronous, reason)
            db.execute("INSERT INTO sqlite_sequence VALUES ('messages', ?)", (last_id,))
            counters = [(f"dropped.{k}", n) for k, n in dropped.items()]
            db.executemany(BUMP, counters + [(f"seq.{k}", n) for k, n in sequences.items()])
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot start a new outbox: {exc}") from None
        self._db, self._last_id, self._dropped, self._sequences = db, last_id, dropped, sequences
        self._count, self._bytes = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
