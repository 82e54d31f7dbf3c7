"""Who is on the other end of the socket, and may they do this?

The kernel tells us the peer's uid and gid (SO_PEERCRED); nothing the client
sends can change that. Users and groups in the config may be names or
numbers and are resolved once, at start-up, so a typo fails loudly.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass, field
from functools import cached_property

from edged.config import ConfigError

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    supplementary: frozenset[int] | None = None  # the process's real groups, from the kernel

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", data)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
            groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
        except OSError:  # an old kernel, or more groups than fit: fall back to the group database
            groups = None
        return cls(pid, uid, gid, groups)

    @cached_property
    def groups(self) -> frozenset[int]:
        if self.supplementary is not None:
            return self.supplementary | {self.gid}
        try:
            name = pwd.getpwuid(self.uid).pw_name
            return frozenset(os.getgrouplist(name, self.gid))
        except KeyError:
            return frozenset({self.gid})


@dataclass(frozen=True)
class Rule:
    """Allowed uids and gids; an empty rule allows everyone who can open the socket."""

    uids: frozenset[int] = field(default_factory=frozenset)
    gids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def build(cls, users: list[str], groups: list[str], where: str) -> Rule:
        return cls(
            frozenset(_resolve(u, pwd.getpwnam, "pw_uid", f"{where}.allowed_users") for u in users),
            frozenset(_resolve(g, grp.getgrnam, "gr_gid", f"{where}.allowed_groups") for g in groups),
        )

    def allows(self, peer: Peer) -> bool:
        if not self.uids and not self.gids:
            return True
        return peer.uid in self.uids or bool(self.gids & peer.groups)


def _resolve(value: str, lookup, attribute: str, where: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return getattr(lookup(value), attribute)
    except KeyError:
        raise ConfigError(f"{where}: no such user or group {value!r}") from None
