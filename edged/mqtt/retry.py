"""When to try a failed release again: backoff, and the events that cut the wait short.

A release that failed for a reason that may pass (the registry did not answer, the disk
was full, a write failed) is kept here, one per model, until it succeeds or a newer
release (or a withdrawal) replaces it. It is tried again after a doubling, capped and
jittered wait, so a fleet neither hammers a registry that is down nor retries in step;
and at once when there is news that it may work now: the registry says it is online, it
announces the release again, a chunk reply arrives, or the disk it was short of has room.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edged.config import UpdateSettings
from edged.mqtt.checks import UpdateRefused


@dataclass
class Pending:
    """A release waiting to be tried again."""

    name: str
    version: str
    topic: str
    payload: bytes
    reason: str
    attempts: int
    failed_at: float  # monotonic
    due: float  # monotonic
    disk: list[tuple[Path, int]] = field(default_factory=list)  # (directory, bytes needed) when short
    silent: bool = False  # the registry did not answer: a reply arriving later says it is back
    free_at_failure: dict[Path, int] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"version": self.version, "attempts": self.attempts, "reason": self.reason,
                "retry_in_s": round(max(0.0, self.due - time.monotonic()), 1),
                "waiting_for_disk": bool(self.disk)}


DISK_MARGIN = 64 << 20  # left free beyond what an update needs
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NotEnoughDisk(UpdateRefused):
    """Refused for now: the disk lacks room. Tried again once it has (`disk`: where, how much)."""

    def __init__(self, message: str, disk: list[tuple[Path, int]], version: str | None = None) -> None:
        super().__init__(message, version)
        self.disk = disk


def disk_full(exc: BaseException | None) -> bool:
    """Whether a full disk (or quota) is behind `exc`, however it was wrapped."""
    while exc is not None:
        if isinstance(exc, NotEnoughDisk) or (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS):
            return True
        exc = exc.__cause__
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def space_needed(downloads: Path, store: Path, total: int) -> list[tuple[Path, int]]:
    """Room for a download of `total` bytes and for the store's copy of it. On one file
    system the store moves the verified download in, so it needs the room once."""
    if os.stat(_existing(downloads)).st_dev == os.stat(_existing(store)).st_dev:
        return [(downloads, total + DISK_MARGIN)]
    return [(downloads, total + DISK_MARGIN), (store, total + DISK_MARGIN)]


def check_disk(downloads: Path, needed: list[tuple[Path, int]], version: str) -> None:
    """NotEnoughDisk unless every directory in `needed` (space_needed) has its room."""
    try:
        downloads.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path, need in needed:
            if (free := free_bytes(path)) < need:
                raise NotEnoughDisk(f"not enough disk in {path}: {need} bytes needed, {free} free",
                                    needed, version)
    except OSError as exc:
        raise NotEnoughDisk(f"cannot check the disk: {exc.strerror or exc}: {exc.filename}", [],
                            version) from exc


def free_bytes(directory: Path) -> int:
    """Free bytes where `directory` is (or would be: its nearest existing parent)."""
    return shutil.disk_usage(_existing(directory)).free


class RetryBook:
    """The releases waiting for another try; used by the update agent's thread only."""

    def __init__(self, settings: UpdateSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._pending: dict[str, Pending] = {}
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._disk_checked = 0.0

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._pending.values()))

    def get(self, name: str) -> Pending | None:
        return self._pending.get(name)

    def delay(self, attempts: int) -> float:
        """min * 2^(attempts - 1), capped at max, then shortened by up to `retry_jitter`."""
        low, high = self.settings.retry_min_s, max(self.settings.retry_min_s, self.settings.retry_max_s)
        base = min(high, low * 2 ** min(attempts - 1, 60))
        return base * (1 - self.settings.retry_jitter * self._rng.random())

    def failed(self, name: str, version: str, topic: str, payload: bytes, reason: str,
               disk: list[tuple[Path, int]] | None = None, silent: bool = False) -> Pending:
        """Record a failed try of this release; a different release of `name` starts the count again."""
        previous = self._pending.get(name)
        attempts = previous.attempts + 1 if previous and previous.payload == payload else 1
        now = time.monotonic()
        pending = Pending(name, version, topic, payload, reason, attempts, now, now + self.delay(attempts),
                          list(disk or []), silent)
        pending.free_at_failure = {path: free_bytes(path) for path, _ in pending.disk}
        self._pending[name] = pending
        return pending

    def forget(self, name: str) -> Pending | None:
        return self._pending.pop(name, None)

    def hurry(self, name: str | None = None, *, since: float, including_disk: bool = False) -> int:
        """Make `name` (or every pending release) due now if it failed before `since` (when
        the news came); returns how many. A release short of disk is left to the disk check
        unless `including_disk`."""
        now, count = time.monotonic(), 0
        for pending in self._pending.values():
            if pending.failed_at >= since:  # news from before the failure says nothing new
                continue
            if (name is None or pending.name == name) and (including_disk or not pending.disk):
                pending.due = min(pending.due, now)
                count += 1
        return count

    def heard_since(self, moment: float) -> int:
        """A chunk reply arrived at `moment`: the registry answers again, so releases that
        failed for its silence before then are due now. (Not those it answered badly: the
        late replies of that very download would retry it in a loop.)"""
        now, count = time.monotonic(), 0
        for pending in self._pending.values():
            if pending.silent and pending.failed_at < moment and pending.due > now:
                pending.due = now
                count += 1
        return count

    def check_disk(self) -> None:
        """Every `disk_poll_s`: a release short of disk is due once every directory has the
        room it needs, if one of them lacked it right after the failure. (When none did, the
        disk filled up and emptied again by itself: the backoff decides, so a disk that is
        simply too small is not retried at every poll.)"""
        now = time.monotonic()
        if now - self._disk_checked < self.settings.disk_poll_s:
            return
        self._disk_checked = now
        for pending in self._pending.values():
            if not pending.disk or pending.due <= now:
                continue
            if all(pending.free_at_failure.get(path, 0) >= need for path, need in pending.disk):
                continue
            try:
                if all(free_bytes(path) >= need for path, need in pending.disk):
                    pending.due = now
            except OSError:
                continue

    def due(self) -> list[Pending]:
        """The releases to try now, oldest failure first."""
        self.check_disk()
        now = time.monotonic()
        return sorted((p for p in self._pending.values() if p.due <= now), key=lambda p: p.failed_at)

    def wait_s(self) -> float | None:
        """How long the agent may sleep before something here could be due (None: no limit)."""
        if not self._pending:
            return None
        now = time.monotonic()
        wait = min(p.due for p in self._pending.values()) - now
        if any(p.disk for p in self._pending.values()):
            wait = min(wait, self.settings.disk_poll_s)
        return max(0.05, wait)
