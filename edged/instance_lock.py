"""One edged per socket and per store: `flock`ed files that say who holds them.

The kernel drops a `flock` when its process ends, even after `kill -9`, so a lock is
never stale. A held socket lock is checked against the socket itself: when its
holder's socket is gone from the path (deleted under it), the error says so, rather
than claiming that another process serves where nothing answers. A lock file deleted
under the daemon (the cleaner that takes a socket takes its lock too) is taken again
by `InstanceLock.check()`, or a second edged would find a free lock at the path.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

from edged.errors import EdgedError

log = logging.getLogger(__name__)
SOCKET_LOCK = "another process is serving on {path} (edged, pid {{pid}})"

class InUse(EdgedError):
    """Another edged holds the socket or the store."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def hold_lock(path: Path, message: str) -> IO[str]:
    """flock `path` for as long as the file stays open; the kernel drops it when the process ends.

    `message` (with `{pid}`, the holder's) is the error when another process holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise InUse(message.format(pid=holder), holder) from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


def hold_socket_lock(path: Path) -> IO[str]:
    """The lock beside the socket `path`; refused with what is wrong when another edged holds it."""
    try:
        return hold_lock(path.with_name(path.name + ".lock"), SOCKET_LOCK.format(path=path))
    except InUse as exc:
        why = unreachable(path)
        if why is None:
            raise
        raise InUse(f"edged (pid {exc.holder}) holds the lock of {path}, but its socket is gone: {why}. "
                    "A running edged binds its socket again within seconds; if it stays gone, "
                    f"stop pid {exc.holder} first", exc.holder) from None


def unreachable(path: Path) -> str | None:
    """Why nobody can connect to `path`, or None when something answers (or is busy)."""
    if not path.is_socket():
        return f"{path} is not a socket" if path.exists() or path.is_symlink() else f"{path} does not exist"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except TimeoutError:
        return None  # a full backlog: something listens
    except OSError as exc:
        return f"nothing listens on {path} ({exc.strerror})"
    finally:
        probe.close()
    return None


class InstanceLock:
    """A lock held for the daemon's life, and the check that its file is still at its path."""

    def __init__(self, path: Path, message: str, file: IO[str] | None = None) -> None:
        self.path = path
        self.message = message
        self.file = file or hold_lock(path, message)
        self._problem: str | None = None

    @classmethod
    def for_socket(cls, socket_path: Path) -> InstanceLock:
        return cls(socket_path.with_name(socket_path.name + ".lock"), SOCKET_LOCK.format(path=socket_path),
                   hold_socket_lock(socket_path))

    def check(self) -> None:
        """Take the lock again on a new file when ours was deleted from its path."""
        held = os.fstat(self.file.fileno())
        try:
            found = self.path.lstat()
            if (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino):
                return
        except FileNotFoundError:
            pass
        try:
            new = hold_lock(self.path, self.message)
        except (InUse, OSError) as exc:
            if str(exc) != self._problem:  # once per distinct problem
                log.error("lock file %s was deleted and cannot be taken again: %s", self.path, exc)
                self._problem = str(exc)
            return
        self.file.close()
        self.file = new
        self._problem = None
        log.warning("lock file %s was deleted under the daemon; took it again", self.path)

    def close(self) -> None:
        self.file.close()
