"""Pull one file from the registry in chunks over MQTT, resumably.

Chunk requests go to `{prefix}/registry/fetch` with this device's response topic and
correlation data (docs/updates.md); `window` of them are in flight at a time, each timed
out and retried. Chunks are written at their offset into `{sha256}.part`; the list of
chunks on disk is kept in `{sha256}.progress` (written only after the part file is
synced), so a daemon restart or a broker outage resumes where the transfer stopped
instead of starting over. A finished file is checked against its size and sha256 (hashed
as the chunks arrive, so it is never read again) before it is handed over as
`{sha256}.file`, with its stat fingerprint taken once it has that name: the store moves
it in unread if that fingerprint (ctime included) has not moved since. That file is not
synced: the store syncs it (moved or copied), and a `.file` found at the next start is hashed again before it
is used, so a power cut costs a download, never a wrong model.

A write that fails (a full disk) removes the file's `.part`, `.progress` and `.file` and
raises a one-line TransferError; so does a download that is given up. A download that
merely timed out keeps its chunks, for the next try to resume.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edged.errors import EdgedError
from edged.fsio import Fingerprint
from edged.models.manifest import sha256_of
from edged.mqtt.download_hash import InOrderHash
from edged.mqtt.link import MqttLink

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5
SUFFIXES = (".part", ".progress", ".file")
SCRATCH_PREFIX = ".stage-"  # hard-link directories an earlier edged made here (and tempfile's "tmp")


class TransferError(EdgedError):
    """A file could not be fetched; the message says why, in one line."""


class RegistrySilent(TransferError):
    """No reply came: the registry is away (a reply arriving later says it is back)."""


@dataclass
class _Reply:
    correlation: bytes
    status: str
    offset: int
    payload: bytes


class Transfer:
    """Fetches files by sha256; one fetch at a time (the update agent's thread)."""

    def __init__(self, link: MqttLink, directory: Path, *, chunk_bytes: int, window: int,
                 timeout_s: float, retries: int, on_reply: Callable[[], None] | None = None) -> None:
        self.link = link
        self.on_reply = on_reply  # told (on paho's thread) that a chunk reply came
        self.directory = directory
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.timeout_s = timeout_s
        self.retries = retries
        self.reply_topic = link.topics.chunk_replies
        self._replies: queue.Queue[_Reply] = queue.Queue()
        self.bytes_received = 0
        self.chunks_retried = 0
        self.last_reply = 0.0  # monotonic time of the last chunk reply: the registry answers

    def start(self) -> None:
        self.link.subscribe(self.reply_topic, self._on_reply)

    def _on_reply(self, message: mqtt.MQTTMessage) -> None:
        """paho's thread: hand the reply over, nothing more."""
        properties = getattr(message, "properties", None)
        correlation = getattr(properties, "CorrelationData", None)
        if not correlation:
            return
        self.last_reply = time.monotonic()
        if self.on_reply is not None:
            self.on_reply()
        values = dict(getattr(properties, "UserProperty", None) or [])
        try:
            offset = int(values.get("offset", "-1"))
        except ValueError:
            offset = -1
        self._replies.put(_Reply(bytes(correlation), values.get("status", ""), offset, message.payload))

    # --- one file ---------------------------------------------------------------------
    def chunk_size(self) -> int:
        """Our chunk size, kept under the broker's packet limit when it announces one."""
        limit = self.link.max_packet_size
        return min(self.chunk_bytes, limit - 4096) if limit else self.chunk_bytes

    def fetch(self, sha256: str, size: int, stop: threading.Event) -> tuple[Path, Fingerprint]:
        """`{sha256}.file`, complete and verified, fetching what is missing, and its
        fingerprint when its hash matched. A failed write removes what was on disk for this
        file and says so in one line."""
        try:
            return self._fetch(sha256, size, stop)
        except OSError as exc:
            self.discard(sha256)
            where = exc.filename or self.directory
            raise TransferError(f"file {sha256[:12]}: cannot write {where}: {exc.strerror or exc}; "
                                f"its partial download was removed") from exc

    def _fetch(self, sha256: str, size: int, stop: threading.Event) -> tuple[Path, Fingerprint]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        done_path = self.directory / f"{sha256}.file"
        if done_path.exists() and done_path.stat().st_size == size:
            # Left by an earlier run, never synced (the store's copy is): check it once more.
            before = Fingerprint.of(done_path.stat())
            if sha256_of(done_path) == sha256 and Fingerprint.of(done_path.stat()) == before:
                return done_path, before
            done_path.unlink()
        part = self.directory / f"{sha256}.part"
        progress_path = self.directory / f"{sha256}.progress"
        chunk, have = self._load_progress(progress_path, size, self.chunk_size())
        count = max(1, -(-size // chunk))
        missing = [i for i in range(count) if i not in have]
        if missing:
            log.info("fetching %s (%d bytes): %d of %d chunks to go", sha256[:12], size, len(missing), count)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            digest = self._pull(fd, sha256, size, chunk, missing, have, progress_path, stop)
            if digest != sha256:
                part.unlink(missing_ok=True)
                progress_path.unlink(missing_ok=True)
                raise TransferError(f"file {sha256[:12]}: the received bytes hash to {digest[:12]}; "
                                    f"discarded")
            os.replace(part, done_path)
            # Taken after the rename (which moves ctime), of the file just hashed: any write
            # from here on moves its ctime, and the store then hashes it again.
            hashed = Fingerprint.of(os.fstat(fd))
        finally:
            os.close(fd)
        progress_path.unlink(missing_ok=True)
        return done_path, hashed

    def _pull(self, fd: int, sha256: str, size: int, chunk: int, missing: list[int], have: set[int],
              progress_path: Path, stop: threading.Event) -> str:
        """Fetch the missing chunks into `fd`; the sha256 of the whole file, hashed as it grows."""
        hashing = InOrderHash(fd, size, chunk, hold=2 * self.window)
        hashing.advance(have)  # chunks a previous run left on disk
        waiting = list(reversed(missing))  # pop() from the end: lowest index first
        in_flight: dict[bytes, tuple[int, float]] = {}  # correlation -> (index, sent at)
        attempts: dict[int, int] = {}
        not_before: dict[int, float] = {}  # a refused chunk waits before it is asked again
        saved_at = heard_at = time.monotonic()
        silence = self.timeout_s * (self.retries + 1)  # every chunk timing out: the registry is gone
        while waiting or in_flight:
            if stop.is_set():
                raise TransferError("stopped")
            if not self.link.connected.is_set():  # an outage is not the chunk's fault: wait
                in_flight.clear()
                waiting = sorted(set(range(-(-size // chunk))) - have, reverse=True)
                self.link.connected.wait(1.0)
                heard_at = time.monotonic()
                continue
            now = time.monotonic()
            if in_flight and now - heard_at > silence:
                index = min(i for i, _ in in_flight.values())
                raise RegistrySilent(f"chunk {index}: no reply from the registry for {now - heard_at:.0f} s "
                                    f"({self.retries + 1} chunk timeouts of {self.timeout_s:g} s)")
            while waiting and len(in_flight) < self.window and not_before.get(waiting[-1], 0) <= now:
                index = waiting.pop()
                correlation = secrets.token_bytes(12)
                in_flight[correlation] = (index, time.monotonic())
                self._request(sha256, index * chunk, min(chunk, size - index * chunk), correlation)
            try:
                reply = self._replies.get(timeout=0.2)
            except queue.Empty:
                reply = None
            if reply is not None and reply.correlation in in_flight:
                heard_at = time.monotonic()
                index, _sent = in_flight.pop(reply.correlation)
                problem = self._check(reply, index * chunk, min(chunk, size - index * chunk))
                if problem is None:
                    os.pwrite(fd, reply.payload, index * chunk)
                    have.add(index)
                    self.bytes_received += len(reply.payload)
                    hashing.received(index, reply.payload, have)
                else:  # refused or damaged: ask again after a pause (the registry may be reindexing)
                    self._retry(index, attempts, waiting, problem)
                    not_before[index] = time.monotonic() + min(0.25 * 2 ** attempts[index], 5.0)
            now = time.monotonic()
            for correlation, (index, sent) in list(in_flight.items()):
                if now - sent > self.timeout_s:
                    del in_flight[correlation]
                    self._retry(index, attempts, waiting, f"no reply within {self.timeout_s:g} s",
                                silent=True)
            if now - saved_at > PROGRESS_EVERY_S:
                os.fsync(fd)
                self._save_progress(progress_path, size, chunk, have)
                saved_at = now
        self._save_progress(progress_path, size, chunk, have)
        return hashing.hexdigest()

    def _retry(self, index: int, attempts: dict[int, int], waiting: list[int], problem: str,
               silent: bool = False) -> None:
        attempts[index] = attempts.get(index, 0) + 1
        self.chunks_retried += 1
        if attempts[index] > self.retries:
            error = RegistrySilent if silent else TransferError
            raise error(f"chunk {index}: {problem} ({attempts[index]} tries)")
        log.debug("chunk %d again: %s", index, problem)
        waiting.insert(0, index)  # after the chunks not yet asked for

    @staticmethod
    def _check(reply: _Reply, offset: int, length: int) -> str | None:
        if reply.status != "ok":
            try:
                return str(json.loads(reply.payload).get("error", "refused"))[:200]
            except (ValueError, AttributeError, UnicodeDecodeError):
                return "refused by the registry"
        if reply.offset != offset:
            return f"reply for offset {reply.offset}, asked for {offset}"
        if len(reply.payload) != length:
            return f"truncated chunk: {len(reply.payload)} bytes, expected {length}"
        return None

    def _request(self, sha256: str, offset: int, length: int, correlation: bytes) -> None:
        payload = json.dumps({"sha256": sha256, "offset": offset, "length": length}).encode()
        self.link.request(self.link.topics.fetch, payload, self.reply_topic, correlation)

    # --- progress on disk -------------------------------------------------------------
    @staticmethod
    def _load_progress(path: Path, size: int, limit: int) -> tuple[int, set[int]]:
        """The chunk size and the chunks already on disk: a fresh start when the record is
        missing, damaged, for another size, or in chunks now too big for the broker."""
        try:
            record = json.loads(path.read_text())
            chunk = int(record["chunk"])
            if record.get("size") == size and 0 < chunk <= limit:
                return chunk, {int(i) for i in record["done"] if 0 <= int(i) < -(-size // chunk)}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return limit, set()

    @staticmethod
    def _save_progress(path: Path, size: int, chunk: int, have: set[int]) -> None:
        temporary = path.with_suffix(".progress.tmp")
        temporary.write_text(json.dumps({"size": size, "chunk": chunk, "done": sorted(have)}))
        os.replace(temporary, path)

    def discard(self, sha256: str) -> None:
        for suffix in SUFFIXES:
            (self.directory / f"{sha256}{suffix}").unlink(missing_ok=True)
        (self.directory / f"{sha256}.progress.tmp").unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> list[str]:
        """Remove every download whose sha256 is not in `keep` (a release that was replaced,
        withdrawn or installed); returns the sha256s removed."""
        removed = set()
        if not self.directory.is_dir():
            return []
        for path in self.directory.iterdir():
            digest = path.name.split(".", 1)[0]
            if path.is_file() and len(digest) == 64 and digest not in keep:
                path.unlink(missing_ok=True)
                removed.add(digest)
        return sorted(removed)

    def clear_leftovers(self) -> list[Path]:
        """At start: the hard-link directories an earlier edged, killed while copying a
        version into the store, left here (each holds a link to a whole model file)."""
        found = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.is_dir() and path.name.startswith((SCRATCH_PREFIX, "tmp")):
                    shutil.rmtree(path, ignore_errors=True)
                    found.append(path)
        return found
