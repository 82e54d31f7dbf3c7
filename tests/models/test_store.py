"""Unit tests for the on-disk model store (real files in tmp_path; faults only where needed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edged.errors import EdgedError, InvalidInput, ModelNotFound, StoreError
from edged.models.store import ACTIVE_FILE, MAX_HISTORY, STAGING_PREFIX, ModelStore, version_key
from tests.conftest import ir_files

BAD_NAMES = ["../x", "a/b", ".hidden", "", ".", "..", "-rf", "x" * 65, "/abs", "x\n", "sp ace"]


# --- helpers -----------------------------------------------------------------
def make_file(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Where the test writes the model files it adds (outside the store)."""
    return tmp_path / "src"


def add_tflite(store: ModelStore, src: Path, version: str, name: str = "m", data: bytes | None = None):
    path = make_file(src / f"{name}-{version}", "model.tflite", data or f"tflite {name} {version}".encode())
    return store.add(name, [path], version)


def tree(root: Path) -> list[str]:
    """Every path under root, relative, sorted (empty when root does not exist)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): real, not running."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- version_key -------------------------------------------------------------
@pytest.mark.parametrize(
    ("lower", "higher"),
    [("2", "10"), ("1.9", "1.10"), ("1.2.9", "1.2.10"), ("9", "10"), ("v2", "v10"), ("1", "1.1"),
     ("1.0", "1.0.1"), ("a", "b"), ("10", "a")],
)
def test_version_key_orders_naturally(lower: str, higher: str) -> None:
    assert version_key(lower) < version_key(higher)
    assert not version_key(higher) < version_key(lower)


def test_version_key_sorts_mixed_text_and_numbers_without_error() -> None:
    versions = ["10", "2", "1.10", "1.9", "rc1", "1", "2a", "2-rc10", "2-rc9"]
    expected = ["1", "1.9", "1.10", "2", "2-rc9", "2-rc10", "2a", "10", "rc1"]
    assert sorted(versions, key=version_key) == expected


def test_versions_are_listed_in_natural_order(store: ModelStore, src: Path) -> None:
    for version in ["10", "2", "1.10", "1.9", "1"]:
        add_tflite(store, src, version)
    assert store.versions("m") == ["1", "1.9", "1.10", "2", "10"]


# --- reading an empty store --------------------------------------------------
def test_empty_store_reads_as_empty(store: ModelStore) -> None:
    assert not store.root.exists()
    assert store.names() == []
    assert store.versions("m") == []
    assert store.active("m") is None
    assert store.history("m") == []
    assert store.active_versions() == {}


def test_manifest_of_a_missing_version_is_model_not_found(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    with pytest.raises(ModelNotFound, match="version '2' of model 'm' not found"):
        store.manifest("m", "2")
    with pytest.raises(ModelNotFound):
        store.verify("m", "2")


# --- add ----------------------------------------------------------------------
def test_add_copies_files_and_writes_a_manifest(store: ModelStore, src: Path) -> None:
    data = os.urandom(3000)
    path = make_file(src, "face.tflite", data)
    manifest = store.add("face", [path], "1", labels=["a", "b"], description="a face")

    directory = store.version_dir("face", "1")
    assert directory == store.root / "face" / "1"
    assert sorted(p.name for p in directory.iterdir()) == ["face.tflite", "manifest.json"]
    assert (directory / "face.tflite").read_bytes() == data
    assert not (directory / "face.tflite").is_symlink()
    assert manifest.name == "face"
    assert manifest.version == "1"
    assert manifest.format == "tflite"
    assert manifest.entry == "face.tflite"
    assert manifest.labels == ["a", "b"]
    assert manifest.description == "a face"
    [entry] = manifest.files
    assert entry.name == "face.tflite"
    assert entry.size == len(data)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    # what is on disk is what add returned, and it verifies
    on_disk = json.loads((directory / "manifest.json").read_bytes())
    assert on_disk["files"] == [{"name": "face.tflite", "sha256": entry.sha256, "size": len(data)}]
    assert store.manifest("face", "1") == manifest
    assert store.verify("face", "1") == manifest
    assert store.names() == ["face"]
    assert store.versions("face") == ["1"]
    # adding does not activate
    assert store.active("face") is None


def test_add_is_a_copy_not_a_link(store: ModelStore, src: Path) -> None:
    path = make_file(src, "m.tflite", b"original")
    store.add("m", [path], "1")
    path.write_bytes(b"changed!")
    assert (store.version_dir("m", "1") / "m.tflite").read_bytes() == b"original"
    store.verify("m", "1")


def test_add_guesses_openvino_for_a_real_ir(store: ModelStore, tiny_ir: Path) -> None:
    manifest = store.add("tiny", ir_files(tiny_ir), "1")
    assert manifest.format == "openvino"
    assert manifest.entry == "tiny.xml"
    assert sorted(f.name for f in manifest.files) == ["tiny.bin", "tiny.xml"]
    for entry in manifest.files:
        source = tiny_ir.parent / entry.name
        assert entry.size == source.stat().st_size
        assert entry.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    store.verify("tiny", "1")


def test_add_guesses_onnx(store: ModelStore, src: Path) -> None:
    path = make_file(src, "net.onnx", b"onnx bytes")
    extra = make_file(src, "labels.txt", b"cat\ndog\n")
    manifest = store.add("net", [path, extra], "3")
    assert manifest.format == "onnx"
    assert manifest.entry == "net.onnx"
    assert {f.name for f in manifest.files} == {"net.onnx", "labels.txt"}


def test_add_refuses_an_existing_version_and_keeps_it_intact(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1", data=b"first")
    other = make_file(src / "other", "model.tflite", b"second")
    with pytest.raises(StoreError, match="m 1 already exists"):
        store.add("m", [other], "1")
    assert (store.version_dir("m", "1") / "model.tflite").read_bytes() == b"first"
    store.verify("m", "1")
    assert not any(p.name.startswith(STAGING_PREFIX) for p in (store.root / "m").iterdir())


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_add_refuses_bad_model_names_and_creates_nothing(store: ModelStore, src: Path, bad: str) -> None:
    path = make_file(src, "m.tflite", b"x")
    with pytest.raises(InvalidInput, match="invalid model name"):
        store.add(bad, [path], "1")
    assert tree(store.root) == []
    assert store.names() == []


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_add_refuses_bad_versions_and_creates_nothing(store: ModelStore, src: Path, bad: str) -> None:
    path = make_file(src, "m.tflite", b"x")
    with pytest.raises(InvalidInput, match="invalid version"):
        store.add("m", [path], bad)
    assert tree(store.root) == []


def test_add_accepts_plus_in_versions(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1.0+build.7")
    assert store.versions("m") == ["1.0+build.7"]


def test_add_refuses_a_file_that_does_not_exist(store: ModelStore, src: Path) -> None:
    missing = src / "nope.tflite"
    with pytest.raises(InvalidInput, match=r"nope\.tflite: not a readable file"):
        store.add("m", [missing], "1")
    assert tree(store.root) == []


def test_add_refuses_a_directory_as_a_file(store: ModelStore, src: Path) -> None:
    (src / "dir.tflite").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="not a readable file"):
        store.add("m", [src / "dir.tflite"], "1")
    assert tree(store.root) == []


def test_add_refuses_two_files_with_one_name(store: ModelStore, src: Path) -> None:
    a = make_file(src / "a", "m.tflite", b"a")
    b = make_file(src / "b", "m.tflite", b"b")
    with pytest.raises(InvalidInput, match="share a name"):
        store.add("m", [a, b], "1")
    assert tree(store.root) == []


def test_add_refuses_files_of_no_known_format(store: ModelStore, src: Path) -> None:
    path = make_file(src, "weights.bin", b"x")
    with pytest.raises(InvalidInput, match="cannot tell the model format"):
        store.add("m", [path], "1")
    assert tree(store.root) == []


def test_add_refuses_a_hidden_file_name(store: ModelStore, src: Path) -> None:
    entry = make_file(src, "m.tflite", b"x")
    hidden = make_file(src, ".secret", b"y")
    with pytest.raises(InvalidInput, match="invalid file name"):
        store.add("m", [entry, hidden], "1")
    assert store.versions("m") == []
    assert not (store.root / "m").exists()  # refused before anything was written


def test_add_refuses_an_ir_without_its_bin_as_invalid_input(store: ModelStore, src: Path) -> None:
    xml = make_file(src, "net.xml", b"<net/>")
    with pytest.raises(InvalidInput, match=r"net\.bin"):
        store.add("net", [xml], "1")
    assert store.versions("net") == []


# --- activate -----------------------------------------------------------------
def test_activate_writes_the_pointer_and_keeps_history(store: ModelStore, src: Path) -> None:
    for version in ["1", "2", "3"]:
        add_tflite(store, src, version)
    store.activate("m", "1")
    assert store.active("m") == "1"
    assert store.history("m") == []
    store.activate("m", "2")
    store.activate("m", "3")
    assert store.active("m") == "3"
    assert store.history("m") == ["2", "1"]
    pointer = json.loads((store.root / "m" / ACTIVE_FILE).read_bytes())
    assert pointer == {"version": "3", "history": ["2", "1"]}
    # going back to an older one moves it out of the history, never duplicates it
    store.activate("m", "1")
    assert store.active("m") == "1"
    assert store.history("m") == ["3", "2"]
    assert store.active_versions() == {"m": "1"}
    # only the pointer and the versions: no temp files left beside them
    assert sorted(p.name for p in (store.root / "m").iterdir()) == [ACTIVE_FILE, "1", "2", "3"]


def test_activating_the_active_version_changes_nothing(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    add_tflite(store, src, "2")
    store.activate("m", "1")
    store.activate("m", "2")
    pointer = (store.root / "m" / ACTIVE_FILE).read_bytes()
    store.activate("m", "2")
    assert (store.root / "m" / ACTIVE_FILE).read_bytes() == pointer
    assert store.history("m") == ["1"]


def test_activate_refuses_a_missing_version(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    store.activate("m", "1")
    with pytest.raises(ModelNotFound):
        store.activate("m", "9")
    assert store.active("m") == "1"


def test_activate_refuses_a_corrupted_version(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    add_tflite(store, src, "2")
    store.activate("m", "1")
    (store.version_dir("m", "2") / "model.tflite").write_bytes(b"tampered")
    with pytest.raises(StoreError, match=r"m 2: model\.tflite"):
        store.activate("m", "2")
    assert store.active("m") == "1"
    assert store.history("m") == []


def test_history_is_bounded(store: ModelStore, src: Path) -> None:
    count = MAX_HISTORY + 3
    for i in range(count):
        add_tflite(store, src, str(i))
        store.activate("m", str(i))
    history = store.history("m")
    assert len(history) == MAX_HISTORY
    assert history == [str(i) for i in range(count - 2, count - 2 - MAX_HISTORY, -1)]


def test_activations_are_per_model(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1", name="a")
    add_tflite(store, src, "7", name="b")
    add_tflite(store, src, "1", name="c")
    store.activate("a", "1")
    store.activate("b", "7")
    assert store.names() == ["a", "b", "c"]
    assert store.active_versions() == {"a": "1", "b": "7"}


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"version": "1", "history": 5}'])
def test_an_unreadable_pointer_is_a_store_error(store: ModelStore, src: Path, content: bytes) -> None:
    add_tflite(store, src, "1")
    (store.root / "m" / ACTIVE_FILE).write_bytes(content)
    with pytest.raises(StoreError, match="active pointer"):
        store.active("m")


# --- rollback -----------------------------------------------------------------
def test_rollback_goes_to_the_previous_active_version(store: ModelStore, src: Path) -> None:
    for version in ["1", "2", "3"]:
        add_tflite(store, src, version)
        store.activate("m", version)
    assert store.rollback("m") == "2"
    assert store.active("m") == "2"
    assert store.history("m") == ["1"]
    assert store.rollback("m") == "1"
    assert store.active("m") == "1"
    with pytest.raises(StoreError, match="m: no earlier version to roll back to"):
        store.rollback("m")
    assert store.active("m") == "1"


def test_rollback_skips_a_previous_version_whose_file_was_corrupted(store: ModelStore, src: Path) -> None:
    for version in ["1", "2", "3"]:
        add_tflite(store, src, version)
        store.activate("m", version)
    corrupt = store.version_dir("m", "2") / "model.tflite"
    data = bytearray(corrupt.read_bytes())
    data[0] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    assert store.rollback("m") == "1"
    assert store.active("m") == "1"
    assert store.history("m") == []


def test_rollback_skips_a_previous_version_that_was_deleted_by_hand(store: ModelStore, src: Path) -> None:
    for version in ["1", "2", "3"]:
        add_tflite(store, src, version)
        store.activate("m", version)
    shutil.rmtree(store.version_dir("m", "2"))
    assert store.rollback("m") == "1"


def test_rollback_errors_when_no_version_is_left(store: ModelStore, src: Path) -> None:
    with pytest.raises(StoreError, match="no earlier version"):
        store.rollback("m")
    add_tflite(store, src, "1")
    store.activate("m", "1")
    with pytest.raises(StoreError, match="no earlier version"):
        store.rollback("m")
    add_tflite(store, src, "2")
    store.activate("m", "2")
    (store.version_dir("m", "1") / "model.tflite").unlink()
    with pytest.raises(StoreError, match="no earlier version"):
        store.rollback("m")
    assert store.active("m") == "2"


# --- remove -------------------------------------------------------------------
def test_remove_refuses_the_active_version(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    store.activate("m", "1")
    with pytest.raises(StoreError, match="m 1 is active"):
        store.remove("m", "1")
    assert store.versions("m") == ["1"]
    store.verify("m", "1")


def test_remove_deletes_another_version_and_drops_it_from_history(store: ModelStore, src: Path) -> None:
    for version in ["1", "2", "3"]:
        add_tflite(store, src, version)
        store.activate("m", version)
    store.remove("m", "2")
    assert store.versions("m") == ["1", "3"]
    assert not store.version_dir("m", "2").exists()
    assert store.active("m") == "3"
    assert store.history("m") == ["1"]
    # nothing (no trash directory) is left behind
    assert sorted(p.name for p in (store.root / "m").iterdir()) == [ACTIVE_FILE, "1", "3"]
    assert store.rollback("m") == "1"


def test_remove_a_version_never_activated(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    add_tflite(store, src, "2")
    store.remove("m", "2")
    assert store.versions("m") == ["1"]
    assert store.active("m") is None


def test_remove_missing_things_is_model_not_found(store: ModelStore, src: Path) -> None:
    with pytest.raises(ModelNotFound, match="model 'm' not found"):
        store.remove("m")
    with pytest.raises(ModelNotFound):
        store.remove("m", "1")
    add_tflite(store, src, "1")
    with pytest.raises(ModelNotFound, match="version '2' of model 'm'"):
        store.remove("m", "2")
    assert store.versions("m") == ["1"]


def test_remove_refuses_a_version_that_is_a_path(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1", name="a")
    add_tflite(store, src, "1", name="b")
    with pytest.raises(InvalidInput):
        store.remove("a", "../b")
    assert store.versions("b") == ["1"]


def test_remove_a_whole_model(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1", name="a")
    add_tflite(store, src, "2", name="a")
    store.activate("a", "2")
    add_tflite(store, src, "1", name="b")
    store.remove("a")
    assert not (store.root / "a").exists()
    assert store.names() == ["b"]
    assert store.active("a") is None
    assert store.versions("b") == ["1"]
    assert sorted(p.name for p in store.root.iterdir()) == ["b"]  # nothing left behind


def test_a_whole_model_half_removed_by_a_dead_process_is_gone_and_cleaned(
    store: ModelStore, src: Path
) -> None:
    """`remove` renames the model away first: a kill mid-delete leaves a hidden leftover,
    never half a model."""
    add_tflite(store, src, "1", name="a")
    add_tflite(store, src, "1", name="b")
    leftover = store.root / f"{STAGING_PREFIX}{dead_pid()}-rm-a"
    (store.root / "a").rename(leftover)  # where a `remove` killed before its rmtree leaves the model
    assert store.names() == ["b"]
    assert store.active("a") is None
    store.clean_staging()
    assert sorted(p.name for p in store.root.iterdir()) == ["b"]
    store.verify("b", "1")


# --- verify -------------------------------------------------------------------
@pytest.fixture
def added(store: ModelStore, src: Path) -> Path:
    """Version 1 of "m" with one 4 KiB file; returns that file's path in the store."""
    path = make_file(src, "m.tflite", os.urandom(4096))
    store.add("m", [path], "1")
    store.verify("m", "1")
    return store.version_dir("m", "1") / "m.tflite"


def test_verify_detects_one_changed_byte(store: ModelStore, added: Path) -> None:
    data = bytearray(added.read_bytes())
    data[2048] ^= 0x01
    added.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"m 1: m\.tflite does not match its sha256"):
        store.verify("m", "1")


def test_verify_detects_a_truncated_file(store: ModelStore, added: Path) -> None:
    with added.open("r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match=r"m\.tflite is 100 bytes, manifest says 4096"):
        store.verify("m", "1")


def test_verify_detects_a_missing_file(store: ModelStore, added: Path) -> None:
    added.unlink()
    with pytest.raises(StoreError, match=r"m 1: m\.tflite is missing"):
        store.verify("m", "1")


def test_verify_refuses_a_symlink_even_to_identical_bytes(
    store: ModelStore, added: Path, tmp_path: Path
) -> None:
    twin = tmp_path / "twin.tflite"
    twin.write_bytes(added.read_bytes())
    added.unlink()
    added.symlink_to(twin)
    with pytest.raises(StoreError, match=r"m\.tflite is not a regular file"):
        store.verify("m", "1")


def test_verify_refuses_a_dangling_symlink(store: ModelStore, added: Path, tmp_path: Path) -> None:
    added.unlink()
    added.symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="not a regular file"):
        store.verify("m", "1")


def test_verify_refuses_a_directory_in_place_of_a_file(store: ModelStore, added: Path) -> None:
    added.unlink()
    added.mkdir()
    with pytest.raises(StoreError, match="not a regular file"):
        store.verify("m", "1")


def test_verify_refuses_a_manifest_copied_to_another_version(store: ModelStore, added: Path) -> None:
    shutil.copytree(store.version_dir("m", "1"), store.root / "m" / "2")
    assert store.versions("m") == ["1", "2"]
    with pytest.raises(StoreError, match="m 2: manifest says m 1"):
        store.verify("m", "2")
    with pytest.raises(StoreError):
        store.activate("m", "2")
    assert store.active("m") is None


def test_verify_refuses_a_manifest_copied_to_another_model(store: ModelStore, added: Path) -> None:
    shutil.copytree(store.root / "m", store.root / "other")
    with pytest.raises(StoreError, match="other 1: manifest says m 1"):
        store.verify("other", "1")


@pytest.mark.parametrize("content", [b"", b"{broken", b'{"name": "m"}', b"[]"])
def test_verify_refuses_a_broken_manifest(store: ModelStore, added: Path, content: bytes) -> None:
    (added.parent / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match="m 1: invalid manifest") as info:
        store.verify("m", "1")
    assert "\n" not in str(info.value)


def test_verify_without_a_manifest_is_model_not_found(store: ModelStore, added: Path) -> None:
    (added.parent / "manifest.json").unlink()
    with pytest.raises(ModelNotFound):
        store.verify("m", "1")


# --- crashes ------------------------------------------------------------------
def test_crash_before_the_final_rename_leaves_no_version(
    store: ModelStore, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_tflite(store, src, "1")
    store.activate("m", "1")
    pointer = (store.root / "m" / ACTIVE_FILE).read_bytes()
    renames: list[tuple[str, str]] = []

    def crash(source, target, *args, **kwargs):
        renames.append((str(source), str(target)))
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "rename", crash)
    path = make_file(src / "v2", "model.tflite", b"version two")
    with pytest.raises(StoreError, match="simulated crash"):  # an OSError, in one line
        store.add("m", [path], "2")
    monkeypatch.undo()

    # the crash hit the staging -> version rename, nothing else
    assert len(renames) == 1
    assert Path(renames[0][0]).name.startswith(f"{STAGING_PREFIX}{os.getpid()}-")
    assert renames[0][1] == str(store.version_dir("m", "2"))
    assert store.versions("m") == ["1"]
    assert not store.version_dir("m", "2").exists()
    assert store.active("m") == "1"
    assert (store.root / "m" / ACTIVE_FILE).read_bytes() == pointer
    assert sorted(p.name for p in (store.root / "m").iterdir()) == [ACTIVE_FILE, "1"]
    # and the store works as before: the same version can be added now
    store.add("m", [path], "2")
    store.activate("m", "2")
    assert store.active("m") == "2"


def test_crash_during_the_first_add_of_a_model_leaves_no_version(
    store: ModelStore, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "rename", crash)
    path = make_file(src, "m.tflite", b"x")
    with pytest.raises(StoreError, match="simulated crash"):  # an OSError, in one line
        store.add("m", [path], "1")
    monkeypatch.undo()
    assert store.versions("m") == []
    assert store.active("m") is None
    assert store.active_versions() == {}
    assert list((store.root / "m").iterdir()) == []


def test_a_staging_dir_left_by_a_dead_process_is_never_listed_and_is_cleaned(
    store: ModelStore, src: Path
) -> None:
    add_tflite(store, src, "1")
    store.activate("m", "1")
    staging = store.root / "m" / f"{STAGING_PREFIX}{dead_pid()}-abc123"
    make_file(staging, "model.tflite", b"half a mod")
    (staging / "manifest.json").write_text('{"name": "m", "ver')
    assert store.versions("m") == ["1"]
    assert store.names() == ["m"]
    assert store.active("m") == "1"

    store.clean_staging("m")
    assert not staging.exists()
    assert store.versions("m") == ["1"]
    assert store.active("m") == "1"
    store.verify("m", "1")


def test_add_cleans_staging_dirs_of_dead_processes(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    staging = store.root / "m" / f"{STAGING_PREFIX}{dead_pid()}-xyz"
    make_file(staging, "model.tflite", b"partial")
    add_tflite(store, src, "2")
    assert not staging.exists()
    assert store.versions("m") == ["1", "2"]


def test_clean_staging_keeps_a_live_process_staging_dir(store: ModelStore, src: Path) -> None:
    add_tflite(store, src, "1")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = store.root / "m" / f"{STAGING_PREFIX}{proc.pid}-busy"
        make_file(live, "model.tflite", b"being written")
        garbage = store.root / "m" / f"{STAGING_PREFIX}not-a-pid"
        garbage.mkdir()
        store.clean_staging("m")
        assert live.is_dir()
        assert (live / "model.tflite").read_bytes() == b"being written"
        assert not garbage.exists()
        assert store.versions("m") == ["1"]
    finally:
        proc.kill()
        proc.wait()
    store.clean_staging("m")
    assert not live.exists()


def test_clean_staging_of_an_unknown_model_does_nothing(store: ModelStore) -> None:
    store.clean_staging("m")
    assert not store.root.exists()


def test_crash_while_replacing_the_pointer_keeps_the_old_one(
    store: ModelStore, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_tflite(store, src, "1")
    add_tflite(store, src, "2")
    store.activate("m", "1")
    pointer_path = store.root / "m" / ACTIVE_FILE
    before = pointer_path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.activate("m", "2")
    monkeypatch.undo()

    assert pointer_path.read_bytes() == before
    assert store.active("m") == "1"
    assert store.history("m") == []
    assert sorted(p.name for p in (store.root / "m").iterdir()) == [ACTIVE_FILE, "1", "2"]


def test_store_errors_are_edged_errors() -> None:
    assert issubclass(StoreError, EdgedError)
    assert issubclass(InvalidInput, EdgedError)
    assert issubclass(ModelNotFound, EdgedError)
