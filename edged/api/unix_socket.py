"""The socket's path: bound safely, and watched, since it can vanish under a running daemon.

A tmpfiles cleaner (or a careless `rm`) may delete the socket file while the daemon
runs: the listener keeps working, but nobody can reach it any more, and nothing would
say so. `PathWatch.check()`, called every second or so, compares the path's inode
with the one bound: a socket the daemon bound itself is bound again at the same path
(mode 0660, same group) and served; systemd's socket (socket activation) cannot be, so
the problem is reported (logged once, and readiness turns false) until a restart.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
from pathlib import Path

from edged.config import ConfigError
from edged.errors import EdgedError

log = logging.getLogger(__name__)
SOCKET_MODE = 0o660


class SocketInUse(EdgedError):
    """Another process answers on the socket path."""


def resolve_group(group: str | None) -> int:
    """The gid for `socket.group` (-1 to leave the group alone)."""
    if not group:
        return -1
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket.group: no such group {group!r}") from None


def check_socket_path(path: Path) -> bool:
    """Refuse a path that is not a socket, or that another process answers on.

    True when a stale socket (nobody listening) is there, to be replaced.
    """
    if not (path.exists() or path.is_symlink()):
        return False
    if not path.is_socket() or path.is_symlink():
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return True
    except TimeoutError:
        raise SocketInUse(f"a process holds {path} but does not answer; stop it first") from None
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        return exc.errno == errno.ECONNREFUSED
    else:
        raise SocketInUse(f"another process is serving on {path}")
    finally:
        probe.close()


def bind_unix_socket(path: Path, group: str | None, mode: int = SOCKET_MODE) -> socket.socket:
    """Bind `path` with its final mode and group already set, replacing only a stale socket.

    The socket is bound under a temporary name, given its mode and group, and
    renamed into place, so there is never a moment when it is reachable with
    looser permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if check_socket_path(path):
        log.info("replacing stale socket %s", path)
    gid = resolve_group(group)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(temporary))
        os.chmod(temporary, mode)
        if gid != -1:
            os.chown(temporary, -1, gid)
        os.rename(temporary, path)
    except BaseException:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    listener.listen(1024)
    return listener


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what is at `path` now, or None when nothing is."""
    try:
        found = path.lstat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


class PathWatch:
    """Notices the socket's path deleted or replaced, and binds it again when it may."""

    def __init__(self, path: Path, group: str | None, inherited: bool) -> None:
        self.path = path
        self.group = group
        self.inherited = inherited
        self.bound = identity(path)  # right after binding (or at start, for systemd's)
        self.problem: str | None = None  # why the socket cannot be reached; None while it can
        self.rebinds = 0

    def owns_path(self) -> bool:
        """Whether the path is still the socket we bound (and so ours to remove)."""
        return self.bound is not None and identity(self.path) == self.bound

    def check(self) -> socket.socket | None:
        """A new listener when the path had to be bound again; else None (see `problem`)."""
        now = identity(self.path)
        if now == self.bound:
            return None
        what = "deleted" if now is None else "replaced by another file"
        if self.inherited:
            self._report(f"socket {self.path} was {what} under the daemon; it is systemd's (socket "
                         "activation) and cannot be bound again: not ready until edged.socket and "
                         "edged are restarted (systemctl restart edged.socket edged)")
            return None
        try:
            listener = bind_unix_socket(self.path, self.group)
        except (OSError, EdgedError) as exc:
            self._report(f"socket {self.path} was {what} under the daemon and cannot be bound again: "
                         f"{exc}; not ready, trying again every second")
            return None
        self.bound = identity(self.path)
        self.problem = None
        self.rebinds += 1
        group = f", group {self.group}" if self.group else ""
        log.warning("socket %s was %s under the daemon (a tmpfiles cleaner?); bound it again "
                    "(mode %o%s)", self.path, what, SOCKET_MODE, group)
        return listener

    def _report(self, problem: str) -> None:
        if problem != self.problem:  # once per distinct problem, not every second
            log.error("%s", problem)
            self.problem = problem
