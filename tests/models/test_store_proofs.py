"""Hash once: the store keeps the proof of what it (or a download) hashed for the length of
one update (`keep_proofs`), checks it again with a `stat`, and hashes again whenever that
`stat` moved or a full check is asked for. Bytes read are this process's own `rchar`
(/proc/self/io), real files in tmp_path."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from edged.errors import StoreError
from edged.fsio import Fingerprint
from edged.models.manifest import Manifest, ManifestFile
from edged.models.store import STAGING_PREFIX, ModelStore

SIZE = 4 << 20


def rchar() -> int:
    """Bytes this process has read so far (files, sockets, pipes)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def read_by(action) -> int:
    before = rchar()
    action()
    return rchar() - before


def download(directory: Path, data: bytes) -> tuple[Path, Fingerprint]:
    """A file as the transfer hands it over: named by its sha256, with its fingerprint when hashed."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{hashlib.sha256(data).hexdigest()}.file"
    path.write_bytes(data)
    return path, Fingerprint.of(path.stat())


def manifest_for(files: dict[str, bytes], version: str = "2") -> Manifest:
    return Manifest(name="m", version=version, format="tflite", files=[
        ManifestFile(name=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        for name, data in files.items()])


@pytest.fixture
def model_bytes() -> bytes:
    return os.urandom(SIZE)


def test_a_download_is_linked_in_unread_and_checked_by_stat_until_a_full_check(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    source, proof = download(tmp_path / "downloads", model_bytes)
    manifest = manifest_for({"model.tflite": model_bytes})
    with store.keep_proofs("m", "2"):
        assert read_by(lambda: store.add_verified(manifest, {"model.tflite": (source, proof)})) < SIZE // 4
        stored = store.version_dir("m", "2") / "model.tflite"
        assert stored.stat().st_ino == proof.ino and not source.exists()  # moved in, not copied
        assert read_by(lambda: store.verify("m", "2")) < SIZE // 4
        store.activate("m", "2")  # verifies too
        assert read_by(lambda: store.verify("m", "2", full=True)) >= SIZE
        assert read_by(lambda: store.verify("m", "2")) < SIZE // 4
    assert read_by(lambda: store.verify("m", "2")) >= SIZE  # outside an update: every byte, as always
    assert store.manifest("m", "2") == manifest


def test_a_file_changed_with_its_size_and_mtime_put_back_is_caught_by_the_stat_check(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    source, proof = download(tmp_path / "downloads", model_bytes)
    with store.keep_proofs("m", "2"):
        store.add_verified(manifest_for({"model.tflite": model_bytes}), {"model.tflite": (source, proof)})
        stored = store.version_dir("m", "2") / "model.tflite"
        before = stored.stat()
        with stored.open("r+b") as f:  # one byte flipped in place: same size, same inode
            f.seek(SIZE // 2)
            f.write(bytes([model_bytes[SIZE // 2] ^ 0xFF]))
        os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back; ctime cannot be
        after = stored.stat()
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns,
                                                                    before.st_ino)
        with pytest.raises(StoreError, match=r"model\.tflite does not match its sha256"):
            store.verify("m", "2")


def test_a_touched_but_intact_file_is_hashed_again_and_passes(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    source, proof = download(tmp_path / "downloads", model_bytes)
    with store.keep_proofs("m", "2"):
        store.add_verified(manifest_for({"model.tflite": model_bytes}), {"model.tflite": (source, proof)})
        os.utime(store.version_dir("m", "2") / "model.tflite")
        assert read_by(lambda: store.verify("m", "2")) >= SIZE  # the stat moved: every byte again
        assert read_by(lambda: store.verify("m", "2")) < SIZE // 4  # and the new stat is the proof


def test_a_download_written_after_it_was_hashed_is_copied_hashed_and_refused(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    source, proof = download(tmp_path / "downloads", model_bytes)
    source.write_bytes(bytes(SIZE))  # same size, other bytes: its mtime moved
    with store.keep_proofs("m", "2"), pytest.raises(StoreError, match="does not match its sha256"):
        store.add_verified(manifest_for({"model.tflite": model_bytes}), {"model.tflite": (source, proof)})
    assert store.versions("m") == []
    assert not [p for p in (store.root / "m").iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert source.exists()  # the caller decides what becomes of its download


def test_a_download_on_another_filesystem_is_copied_in_one_read(
        store: ModelStore, model_bytes: bytes) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm tmpfs here")
    shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="edged-test-"))
    try:
        source, proof = download(shm, model_bytes)
        store.root.mkdir(parents=True, exist_ok=True)
        if proof.dev == store.root.stat().st_dev:
            pytest.skip("/dev/shm is on the store's filesystem here")
        config = bytes(100)
        other, other_proof = download(shm, config)
        manifest = manifest_for({"model.tflite": model_bytes, "config.bin": config})
        with store.keep_proofs("m", "2"):
            read = read_by(lambda: store.add_verified(
                manifest, {"model.tflite": (source, proof), "config.bin": (other, other_proof)}))
            assert SIZE <= read < 2 * SIZE
            assert read_by(lambda: store.verify("m", "2")) < SIZE // 4
        assert not source.exists() and not other.exists()
        assert store.verify("m", "2") == manifest
    finally:
        for path in shm.iterdir():
            path.unlink()
        shm.rmdir()


def rewritten_with_mtime_put_back(path: Path, data: bytes) -> None:
    """Write `data` (the same size) over `path` in place and set its mtime back: only its
    ctime says it was written."""
    before = path.stat()
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size,
                                                                before.st_mtime_ns)


def test_a_download_rewritten_with_its_mtime_put_back_is_copied_hashed_and_refused(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    source, proof = download(tmp_path / "downloads", model_bytes)
    rewritten_with_mtime_put_back(source, bytes(SIZE))  # other bytes between download and staging
    with store.keep_proofs("m", "2"), pytest.raises(StoreError, match="does not match its sha256"):
        store.add_verified(manifest_for({"model.tflite": model_bytes}), {"model.tflite": (source, proof)})
    assert store.versions("m") == []
    assert source.exists() and source.stat().st_ino == proof.ino  # not moved: left to the caller


def test_a_download_rewritten_alike_with_its_mtime_put_back_is_copied_not_moved(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    source, proof = download(tmp_path / "downloads", model_bytes)
    rewritten_with_mtime_put_back(source, model_bytes)  # the same bytes: accepted, but read to know it
    manifest = manifest_for({"model.tflite": model_bytes})
    with store.keep_proofs("m", "2"):
        assert read_by(lambda: store.add_verified(manifest, {"model.tflite": (source, proof)})) >= SIZE
        assert (store.version_dir("m", "2") / "model.tflite").stat().st_ino != proof.ino
        assert read_by(lambda: store.verify("m", "2")) < SIZE // 4  # what the copy hashed is the proof
    assert not source.exists()
    assert store.verify("m", "2") == manifest


def test_a_failed_add_puts_a_download_it_moved_back(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    first, first_proof = download(tmp_path / "downloads", model_bytes)
    other = os.urandom(1000)
    second, second_proof = download(tmp_path / "downloads", other)
    second.write_bytes(bytes(1000))  # damaged after it was hashed
    manifest = manifest_for({"a.tflite": model_bytes, "b.bin": other})
    with pytest.raises(StoreError, match=r"b\.bin does not match its sha256"):
        store.add_verified(manifest, {"a.tflite": (first, first_proof), "b.bin": (second, second_proof)})
    assert first.read_bytes() == model_bytes and first.stat().st_ino == first_proof.ino
    assert store.versions("m") == []


def test_one_download_for_two_files_of_the_same_bytes_is_moved_once_and_copied_once(
        store: ModelStore, tmp_path: Path, model_bytes: bytes) -> None:
    source, proof = download(tmp_path / "downloads", model_bytes)
    manifest = manifest_for({"a.tflite": model_bytes, "b.bin": model_bytes})
    with store.keep_proofs("m", "2"):
        read = read_by(lambda: store.add_verified(manifest, {"a.tflite": (source, proof),
                                                             "b.bin": (source, proof)}))
        assert SIZE <= read < 2 * SIZE
        assert read_by(lambda: store.verify("m", "2")) < SIZE // 4
    assert (store.version_dir("m", "2") / "a.tflite").stat().st_ino == proof.ino
    assert not source.exists()
    assert store.verify("m", "2") == manifest
