"""The in-order hash of a download whose chunks arrive in any order, and the fingerprint a
finished download is handed over with."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from edged.config import load_settings
from edged.errors import EdgedError
from edged.fsio import Fingerprint
from edged.models.manifest import Manifest, ManifestFile
from edged.models.store import ModelStore
from edged.mqtt.download_hash import InOrderHash
from edged.mqtt.link import MqttLink
from edged.mqtt.outbox import Outbox
from edged.mqtt.transfer import Transfer
from tests.conftest import wait_until
from tests.mqtt.registry_peer import ChunkPeer

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


def test_a_fetched_file_s_fingerprint_is_its_stat_under_its_final_name_and_the_store_moves_it_in(
        broker, tmp_path: Path) -> None:
    """A real transfer over a real broker: the fingerprint handed over is taken after the
    rename to `{sha256}.file` (which moves ctime), so the store's check, ctime included,
    finds it unchanged and moves the file in unread."""
    data = os.urandom(300_000)
    peer = ChunkPeer(broker)
    digest = peer.add("model.tflite", data)["sha256"]
    settings = load_settings(None, mqtt={"enabled": True, "host": broker.host, "port": broker.port,
                                         "device_id": "cam-1", "outbox_path": str(tmp_path / "outbox.db")})
    outbox = Outbox(settings.mqtt.outbox_path)
    link = MqttLink(settings.mqtt, outbox)
    transfer = Transfer(link, tmp_path / "downloads", chunk_bytes=65536, window=2, timeout_s=2.0, retries=2)
    try:
        transfer.start()
        link.start()
        wait_until(link.connected.is_set, timeout=10, what="the link")
        path, proof = transfer.fetch(digest, len(data), threading.Event())
        assert path.name == f"{digest}.file" and Fingerprint.of(path.stat()) == proof
        store = ModelStore(tmp_path / "store")
        manifest = Manifest(name="m", version="2", format="tflite",
                            files=[ManifestFile(name="model.tflite", sha256=digest, size=len(data))])
        with store.keep_proofs("m", "2"):
            store.add_verified(manifest, {"model.tflite": (path, proof)})
        assert (store.version_dir("m", "2") / "model.tflite").stat().st_ino == proof.ino  # moved, not copied
    finally:
        link.stop(flush_timeout=1.0)
        outbox.close()
        peer.close()
