"""The sha256 of a download computed while its chunks arrive, in any order (transfer.py)."""

from __future__ import annotations

import hashlib
import os

from edged.errors import EdgedError


class InOrderHash:
    """sha256 of a file whose chunks arrive out of order, computed while they arrive, so a
    finished download needs no second read. A chunk that comes early is held in memory (at
    most `hold` of them; beyond that it is read back from the file when its turn comes)."""

    def __init__(self, fd: int, size: int, chunk: int, hold: int) -> None:
        self._fd, self._size, self._chunk, self._hold = fd, size, chunk, hold
        self._hash = hashlib.sha256()
        self._next = 0  # the first chunk not yet hashed
        self._held: dict[int, bytes] = {}

    def received(self, index: int, data: bytes, have: set[int]) -> None:
        if index > self._next and len(self._held) < self._hold:
            self._held[index] = data
        elif index == self._next:
            self._hash.update(data)
            self._next += 1
        self.advance(have)

    def advance(self, have: set[int]) -> None:
        while self._next in have:
            offset = self._next * self._chunk
            data = self._held.pop(self._next, None)
            if data is None:
                data = os.pread(self._fd, min(self._chunk, self._size - offset), offset)
            self._hash.update(data)
            self._next += 1

    def hexdigest(self) -> str:
        count = -(-self._size // self._chunk)
        if self._next < count:  # cannot happen once every chunk is in `have`; never trust it
            raise EdgedError(f"hashed {self._next} of {count} chunks")
        return self._hash.hexdigest()
