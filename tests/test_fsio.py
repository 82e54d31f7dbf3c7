"""edged/fsio.py: the one crash-safe write used by the store, signing and the registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged.fsio import atomic_write


def test_crash_during_atomic_write_of_a_new_file_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "pointer.json"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_the_content(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old content that is longer")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    assert target.stat().st_mode & 0o777 == 0o600  # private from its first byte


def test_atomic_write_without_replace_never_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    atomic_write(target, b"first", replace=False)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", replace=False)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]
