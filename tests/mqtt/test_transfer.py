"""The in-order hash of a download whose chunks arrive in any order."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from edged.errors import EdgedError
from edged.mqtt.download_hash import InOrderHash

CHUNK = 1000


@pytest.mark.parametrize(("size", "hold", "on_disk"), [
    (10_500, 2, set()),  # more early chunks than it may hold: the rest is read back from the file
    (10_500, 100, set()),  # all held in memory
    (10_500, 2, {0, 1, 5, 10}),  # a resumed download: some chunks were already on disk
    (1_000, 2, set()),
])
def test_any_arrival_order_gives_the_file_hash(tmp_path: Path, size: int, hold: int, on_disk: set[int]):
    data = random.Random(size + hold).randbytes(size)
    count = -(-size // CHUNK)
    path = tmp_path / "file.part"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        have = set()
        for index in on_disk:
            os.pwrite(fd, data[index * CHUNK:(index + 1) * CHUNK], index * CHUNK)
            have.add(index)
        hashing = InOrderHash(fd, size, CHUNK, hold=hold)
        hashing.advance(have)
        order = [i for i in range(count) if i not in on_disk]
        random.Random(7).shuffle(order)
        for index in order:
            piece = data[index * CHUNK:(index + 1) * CHUNK]
            os.pwrite(fd, piece, index * CHUNK)
            have.add(index)
            hashing.received(index, piece, have)
        assert hashing.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_a_digest_before_every_chunk_is_hashed_is_refused(tmp_path: Path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 3 * CHUNK)
        hashing = InOrderHash(fd, 3 * CHUNK, CHUNK, hold=4)
        hashing.received(1, bytes(CHUNK), {1})
        with pytest.raises(EdgedError, match="hashed 0 of 3 chunks"):
            hashing.hexdigest()
    finally:
        os.close(fd)
