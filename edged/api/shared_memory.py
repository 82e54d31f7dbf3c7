"""The system shared memory extension: regions a caller registers, kept per uid; a /dev/shm
segment read and written with one kernel copy each way, a sealed memfd in place.

Triton's extension lets a client name a POSIX shared-memory segment (`/dev/shm/<key>`) and
then pass tensors as (region, offset, byte size) instead of in the request. Triton maps any
segment for anyone who reaches its port; edged's socket knows who is calling (SO_PEERCRED),
so a region is registered only when the caller could open the segment itself, and each uid
sees and uses only its own regions (two users may each have a region called "input").

Why no mmap: a segment belongs to its client, who may shrink it at any time, and touching a
mapped page past the new end is a SIGBUS that kills the daemon (Python cannot catch it). So
the daemon keeps only the open fd and copies: `os.preadv` straight into a freshly allocated
array (one kernel copy, the GIL released), `os.pwritev` out after an `fstat` size check (a
write past the end would silently grow the file). A segment that shrank is a short read or a
failed size check, answered with a 400; the daemon never crashes. (Shrunk between the check
and the write, the file grows back within the region the client registered, no further.)

The zero-copy way (an edged extension): a client passes a memfd over the socket (SCM_RIGHTS,
with the register request) sealed against shrinking (F_SEAL_SHRINK). Its pages cannot
vanish, so the daemon maps it: inputs are arrays over the client's memory, outputs are
written straight into it. The client may still change an input while the model reads it;
that only changes its own answer.

Why checks on every use: the segment's size can change after registration, so the bounds
given then are checked against the file then, and each request's offset and size against
the region, and the file's size, every time. An fd is closed only when no request is using
it, so a request never reads a file that another open reused the descriptor for.
"""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from edged.api.access import Peer
from edged.api.tensors import OutputRequest, ShmRef, ShmTensor, Tensor
from edged.backends.base import TensorSpec
from edged.errors import EdgedError, Forbidden, InvalidInput

SHM_DIR = "/dev/shm"  # noqa: S108 - the POSIX shared memory directory, not a temp file
KEY = re.compile(r"/[A-Za-z0-9._-]{1,200}")
MAX_NAME = 255
OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO never blocks the open
ACL = "system.posix_acl_access"
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)  # Linux 5.1; not in Python 3.11's fcntl


class RegionNotFound(EdgedError):
    """The caller has no region of that name (another uid's regions are never visible)."""


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int  # where the region starts in the segment
    byte_size: int
    fd: int
    users: int = 0  # requests reading or writing it now
    dropped: bool = False  # unregistered: the fd closes once `users` falls to 0
    map: mmap.mmap | None = None  # a sealed memfd's mapping: tensors are read in place

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class Regions:
    """Every uid's registered regions, within `max_regions` and `max_bytes` per uid
    (`socket.max_shm_regions_per_uid`, `socket.max_shm_bytes_per_uid`; 0 regions: off)."""

    def __init__(self, max_regions: int, max_bytes: int) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._by_uid: dict[int, dict[str, Region]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_regions > 0

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise InvalidInput("the system shared memory extension is off here "
                               "(socket.max_shm_regions_per_uid = 0)")

    # --- registration -----------------------------------------------------------------
    def register(self, peer: Peer, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open `key` under /dev/shm for `peer` as region `name`, or say why not."""
        self._check_request(name, offset, byte_size)
        if not KEY.fullmatch(key) or key in ("/.", "/.."):
            raise InvalidInput(f"key {key[:60]!r} must be one name under {SHM_DIR}: '/' then 1 to 200 of "
                               "A-Z a-z 0-9 . _ - (not '.' or '..')")
        with self._lock:
            self._check_room(peer.uid, name, byte_size)
        path = f"{SHM_DIR}/{key[1:]}"
        fd = _open(path)
        try:
            info = os.fstat(fd)  # the opened file itself: nothing can swap it after the check
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"{path} is not a regular file, so not a shared memory segment")
            _check_access(peer, path, fd, info)
            if offset + byte_size > info.st_size:
                raise InvalidInput(f"failed to register shared memory region {name!r}: offset {offset} + "
                                   f"byte_size {byte_size} is past the end of {path} ({info.st_size} bytes)")
            with self._lock:
                self._check_room(peer.uid, name, byte_size)
                self._by_uid.setdefault(peer.uid, {})[name] = Region(name, key, offset, byte_size, fd)
        except BaseException:
            os.close(fd)
            raise

    def register_memfd(self, peer: Peer, name: str, fd: int, offset: int, byte_size: int) -> None:
        """Map a memfd the caller passed over the socket (SCM_RIGHTS) as region `name`.

        Only a memfd sealed against shrinking (F_SEAL_SHRINK) is taken: its pages can then
        never vanish under the mapping, so inputs are read in place (no copy) and outputs
        written straight into it, with no SIGBUS possible. Takes ownership of `fd`."""
        try:
            self._check_request(name, offset, byte_size)
            info = os.fstat(fd)
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = None
            if not stat.S_ISREG(info.st_mode) or seals is None:
                raise InvalidInput("the descriptor passed is not a memfd made with MFD_ALLOW_SEALING")
            if not seals & fcntl.F_SEAL_SHRINK:
                raise InvalidInput("the memfd passed is not sealed against shrinking: add F_SEAL_SHRINK "
                                   "(fcntl F_ADD_SEALS) before registering it")
            if offset + byte_size > info.st_size:
                raise InvalidInput(f"failed to register shared memory region {name!r}: offset {offset} + "
                                   f"byte_size {byte_size} is past the memfd's end ({info.st_size} bytes)")
            writable = not seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            mapped = mmap.mmap(fd, offset + byte_size, access=access)
            with self._lock:
                try:
                    self._check_room(peer.uid, name, byte_size)
                except BaseException:
                    mapped.close()
                    raise
                region = Region(name, f"memfd:{info.st_ino}", offset, byte_size, fd, map=mapped)
                self._by_uid.setdefault(peer.uid, {})[name] = region
        except BaseException:
            os.close(fd)
            raise

    def _check_request(self, name: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not 0 < len(name) <= MAX_NAME:
            raise InvalidInput(f"a region name must have 1 to {MAX_NAME} characters")
        if offset < 0 or byte_size <= 0:
            raise InvalidInput(f"offset must be 0 or more and byte_size over 0, not {offset} and {byte_size}")

    def _check_room(self, uid: int, name: str, byte_size: int) -> None:
        regions = self._by_uid.get(uid, {})
        if name in regions:
            raise InvalidInput(f"shared memory region {name!r} already in manager: unregister it first")
        if len(regions) >= self.max_regions:
            raise InvalidInput(f"uid {uid} already has {len(regions)} shared memory regions, the most "
                               "socket.max_shm_regions_per_uid allows: unregister one first")
        total = sum(r.byte_size for r in regions.values()) + byte_size
        if total > self.max_bytes:
            raise InvalidInput(f"region {name!r} of {byte_size} bytes would bring uid {uid}'s shared memory "
                               f"to {total} bytes, over socket.max_shm_bytes_per_uid ({self.max_bytes})")

    def unregister(self, uid: int, name: str | None = None) -> None:
        """Drop one region of `uid`'s, or all of them; a name it does not have is no error (as in Triton)."""
        self._check_enabled()
        with self._lock:
            regions = self._by_uid.get(uid, {})
            for gone in list(regions) if name is None else [name] if name in regions else []:
                self._drop(regions.pop(gone))

    def status(self, uid: int, name: str | None = None) -> list[dict]:
        self._check_enabled()
        with self._lock:
            regions = self._by_uid.get(uid, {})
            if name is None:
                return [r.status() for r in regions.values()]
            if name not in regions:
                raise RegionNotFound(f"Unable to find system shared memory region: {name!r}")
            return [regions[name].status()]

    def close(self) -> None:
        """Release every region (the daemon's stop); safe to call again."""
        with self._lock:
            for regions in self._by_uid.values():
                for region in regions.values():
                    self._drop(region)
            self._by_uid.clear()

    def _drop(self, region: Region) -> None:
        """With the lock held: unregistered; its fd closes now, or when its last user is done."""
        region.dropped = True
        if region.users == 0 and region.fd >= 0:
            if region.map is not None:
                try:
                    region.map.close()
                except BufferError:  # an array still views it: unmapped when that array goes
                    pass
                region.map = None
            os.close(region.fd)
            region.fd = -1

    # --- use ----------------------------------------------------------------------------
    def output_places(self, uid: int, outputs: dict[str, OutputRequest] | None,
                      specs: list[TensorSpec]) -> dict[str, np.ndarray]:
        """Checks that every output region named exists and holds its place (before the model
        runs for nothing). Returns, for outputs going to a writable sealed memfd with a shape
        the model fixes, the array there that the runtime may write itself (no copy after)."""
        self._check_enabled()
        fixed = {spec.name: spec for spec in specs if -1 not in spec.shape}
        places = {}
        for name, ref in (outputs or {}).items():
            if not isinstance(ref, ShmRef):
                continue
            with self._borrowed(uid, ref) as (region, start):
                spec = fixed.get(name)
                if spec is None or region.map is None or start % spec.dtype.itemsize:
                    continue
                count = math.prod(spec.shape)
                if count * spec.dtype.itemsize <= ref.byte_size:
                    view = np.frombuffer(region.map, spec.dtype, count, start).reshape(spec.shape)
                    if view.flags.writeable:  # not a memfd sealed against writes
                        places[name] = view
        return places

    def read_inputs(self, uid: int, inputs: dict[str, Tensor]) -> dict[str, np.ndarray]:
        """The inputs with those in shared memory read into fresh arrays (a /dev/shm region)
        or viewed where they are (a sealed memfd)."""
        self._check_enabled()
        return {name: self.read(uid, value) if isinstance(value, ShmTensor) else value
                for name, value in inputs.items()}

    def read(self, uid: int, tensor: ShmTensor) -> np.ndarray:
        with self._borrowed(uid, tensor.ref) as (region, start):
            if region.map is not None:  # a sealed memfd: the tensor is read where it is
                count = tensor.ref.byte_size // tensor.dtype.itemsize
                return np.frombuffer(region.map, tensor.dtype, count, start).reshape(tensor.shape)
            array = np.empty(tensor.shape, tensor.dtype)  # bounded: byte_size fits the region
            view = memoryview(array.reshape(-1).view(np.uint8))
            done = 0
            while done < len(view):
                got = _io(os.preadv, region, [view[done:]], start + done)
                if got == 0:
                    raise InvalidInput(f"shared memory region {region.name!r} ({region.key}) shrank: it ends "
                                       f"{start + done} bytes in, the tensor needs {start + len(view)}")
                done += got
        return array

    def write_outputs(self, uid: int, wanted: dict[str, OutputRequest], outputs: dict[str, np.ndarray],
                      places: dict[str, np.ndarray]) -> None:
        """Copy the outputs to their regions, but for those the runtime already wrote in place."""
        for name, ref in wanted.items():
            if isinstance(ref, ShmRef) and outputs[name] is not places.get(name):
                self.write(uid, name, ref, outputs[name])

    def write(self, uid: int, name: str, ref: ShmRef, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        if len(data) > ref.byte_size:
            raise InvalidInput(f"shared memory size specified with the request for output {name!r} "
                               f"({ref.byte_size} bytes) should be at least {len(data)} bytes to hold "
                               "the results")
        with self._borrowed(uid, ref) as (region, start):
            if region.map is not None:  # a sealed memfd: it cannot have shrunk
                try:
                    region.map[start : start + len(data)] = data
                except TypeError:  # mapped read-only: the memfd is sealed against writes
                    raise InvalidInput(f"shared memory region {region.name!r} is sealed against writes: "
                                       f"output {name!r} cannot go there") from None
                return
            size = os.fstat(region.fd).st_size
            if size < start + len(data):
                raise InvalidInput(f"shared memory region {region.name!r} ({region.key}) shrank to {size} "
                                   f"bytes: output {name!r} needs bytes up to {start + len(data)}")
            done = 0
            while done < len(data):
                done += _io(os.pwritev, region, [data[done:]], start + done)

    @contextmanager
    def _borrowed(self, uid: int, ref: ShmRef) -> Iterator[tuple[Region, int]]:
        """`uid`'s region named by `ref`, kept open while in use, and where `ref` starts in
        its file once checked against the region's bounds."""
        with self._lock:
            region = self._by_uid.get(uid, {}).get(ref.region)
            if region is None:
                raise RegionNotFound(f"Unable to find shared memory region: {ref.region!r}")
            if ref.offset + ref.byte_size > region.byte_size:
                raise InvalidInput(f"Invalid offset + byte size for shared memory region: {ref.region!r} "
                                   f"(offset {ref.offset} + {ref.byte_size} bytes is past its "
                                   f"{region.byte_size})")
            region.users += 1
        try:
            yield region, region.offset + ref.offset
        finally:
            with self._lock:
                region.users -= 1
                if region.dropped:
                    self._drop(region)


def _open(path: str) -> int:
    try:
        return os.open(path, OPEN_FLAGS)
    except OSError as exc:
        why = {
            errno.ENOENT: f"there is no {path}: create the segment first (shm_open)",
            errno.ELOOP: f"{path} is a symbolic link: register the segment itself",
            errno.EISDIR: f"{path} is a directory, not a shared memory segment",
            errno.EACCES: f"edged (uid {os.geteuid()}) may not open {path} for reading and writing: "
                          "let the daemon's user or group read and write it",
        }.get(exc.errno, f"edged cannot open {path}: {exc.strerror}")
        raise InvalidInput(why) from None


def _check_access(peer: Peer, path: str, fd: int, info: os.stat_result) -> None:
    """Forbidden unless the peer's own credentials would let it open the file for reading and
    writing: the owner, group or other bits, chosen as the kernel chooses them."""
    if peer.uid == 0:
        return
    if peer.uid == info.st_uid:
        bits = info.st_mode >> 6
    elif _has_acl(fd):  # its group bits are then only a mask: judging them would be guessing
        raise Forbidden(f"{path} has a POSIX ACL, which edged does not evaluate: only its owner "
                        f"(uid {info.st_uid}) may register it")
    elif info.st_gid in peer.groups:
        bits = info.st_mode >> 3
    else:
        bits = info.st_mode
    if bits & 0o6 != 0o6:
        raise Forbidden(f"uid {peer.uid} may not read and write {path} (owner {info.st_uid}, group "
                        f"{info.st_gid}, mode {stat.S_IMODE(info.st_mode):04o}), so may not register it")


def _has_acl(fd: int) -> bool:
    try:
        os.getxattr(fd, ACL)
    except OSError:  # ENODATA: none; ENOTSUP: the file system has none
        return False
    return True


def _io(call: Callable[..., int], region: Region, buffers: list[memoryview], offset: int) -> int:
    try:
        return call(region.fd, buffers, offset)
    except OSError as exc:
        raise InvalidInput(f"shared memory region {region.name!r} ({region.key}): {exc.strerror}") from None
