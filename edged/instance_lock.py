"""One edged per socket and per store: `flock`ed files that say who holds them.

The kernel drops a `flock` when its process ends, even after `kill -9`, so a lock is
never stale. A held socket lock is checked against the socket itself: when its
holder's socket is gone from the path (deleted under it), the error says so, rather
than claiming that another process serves where nothing answers.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from edged.errors import EdgedError


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
        return hold_lock(path.with_name(path.name + ".lock"),
                         f"another process is serving on {path} (edged, pid {{pid}})")
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
