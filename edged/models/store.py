"""The on-disk model store: `{root}/{name}/{version}/` plus an active pointer.

Layout:
    {root}/{name}/{version}/manifest.json   what the version holds (hashes, sizes)
    {root}/{name}/{version}/<model files>
    {root}/{name}/.active.json              {"version": ..., "history": [older actives]}
    {root}/{name}/.staging-<pid>-<rand>/    a version being written (never read)

A version appears only by renaming a complete, fsynced staging directory, and
the active pointer changes only by renaming a fsynced temp file, so a crash
at any point leaves either the old state or the new one.

`verify` hashes every file. Within `keep_proofs(name, version)` (one update: staged,
tested, activated, loaded, watched through probation) a file the store has hashed, or
been handed already hashed, is checked again by its stat fingerprint alone until
`verify(full=True)`; a fingerprint that moved sends it back to a full hash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from edged.errors import InvalidInput, ModelNotFound, StoreError
from edged.fsio import Fingerprint, atomic_write, fsync_dir
from edged.models.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestFile,
    check_name,
    guess_format,
    is_valid_name,
    one_line,
    sha256_of,
)
from edged.models.staging import STAGING_PREFIX, copy_hashed, move_unwritten, new_version, put_back

ACTIVE_FILE = ".active.json"
MAX_HISTORY = 32


def version_key(version: str) -> tuple:
    """Natural order: 2 < 10, 1.9 < 1.10; text parts compare as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", version) if p)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # (name, version) -> {file name: fingerprint when its bytes matched}, only inside keep_proofs
        self._proofs: dict[tuple[str, str], dict[str, Fingerprint]] = {}

    # --- reading -----------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # Anything that is not a valid model name (lost+found, a stray folder) is not a model.
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_name(p.name))

    def versions(self, name: str) -> list[str]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        found = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(found, key=version_key)

    def _pointer(self, name: str) -> dict:
        path = self._model_dir(name) / ACTIVE_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {"version": None, "history": []}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable active pointer: {exc}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{path}: malformed active pointer")
        version, history = data.get("version"), data.get("history", [])
        if not (version is None or isinstance(version, str)) or not isinstance(history, list) or not all(
            isinstance(v, str) for v in history
        ):
            raise StoreError(f"{path}: malformed active pointer")
        return {"version": version, "history": list(history)}

    def active(self, name: str) -> str | None:
        return self._pointer(name)["version"]

    def history(self, name: str) -> list[str]:
        """Earlier active versions, most recent first: where rollback goes."""
        return self._pointer(name)["history"]

    def active_versions(self) -> dict[str, str]:
        """Every model that has an active version, mapped to it."""
        result = {}
        for name in self.names():
            version = self.active(name)
            if version is not None:
                result[name] = version
        return result

    def version_dir(self, name: str, version: str) -> Path:
        return self._model_dir(name) / check_name(version, "version")

    def manifest(self, name: str, version: str) -> Manifest:
        path = self.version_dir(name, version) / "manifest.json"
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise StoreError(f"{name} {version}: manifest.json is over {MAX_MANIFEST_BYTES} bytes")
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelNotFound(name, version) from None
        except OSError as exc:
            raise StoreError(f"{name} {version}: cannot read manifest.json: {exc.strerror or exc}") from None
        try:
            manifest = Manifest.from_json(data)
        except InvalidInput as exc:
            raise StoreError(f"{name} {version}: {exc}") from None
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(
                f"{name} {version}: manifest says {manifest.name} {manifest.version}; refusing it"
            )
        return manifest

    def verify(self, name: str, version: str, *, full: bool = False) -> Manifest:
        """Check every file against the manifest; raise StoreError naming the first mismatch.
        Inside `keep_proofs`, a file whose fingerprint is as when it last matched is not
        read again, unless `full`."""
        manifest = self.manifest(name, version)
        directory = self.version_dir(name, version)
        proofs = self._proofs.get((name, version))
        for entry in manifest.files:
            path = directory / entry.name
            try:
                st = path.lstat()
            except FileNotFoundError:
                raise StoreError(f"{name} {version}: {entry.name} is missing") from None
            if not path.is_file() or path.is_symlink():
                raise StoreError(f"{name} {version}: {entry.name} is not a regular file")
            if st.st_size != entry.size:
                raise StoreError(
                    f"{name} {version}: {entry.name} is {st.st_size} bytes, manifest says {entry.size}"
                )
            seen = Fingerprint.of(st)  # taken before the read: a write during it moves it again
            if proofs is not None and not full and proofs.get(entry.name) == seen:
                continue
            try:
                digest = sha256_of(path)
            except OSError as exc:
                reason = exc.strerror or exc
                raise StoreError(f"{name} {version}: cannot read {entry.name}: {reason}") from None
            if digest != entry.sha256:
                raise StoreError(f"{name} {version}: {entry.name} does not match its sha256")
            if proofs is not None:
                proofs[entry.name] = seen
        return manifest

    @contextlib.contextmanager
    def keep_proofs(self, name: str, version: str) -> Iterator[None]:
        """While inside, `verify` of this version trusts what it (or `add_verified`) proved,
        as long as each file's fingerprint stays; leaving forgets it, so verification
        outside one update hashes as always."""
        key = (name, version)
        self._proofs.setdefault(key, {})
        try:
            yield
        finally:
            self._proofs.pop(key, None)

    # --- writing -----------------------------------------------------------
    def add(
        self,
        name: str,
        files: list[Path],
        version: str,
        *,
        labels: list[str] | None = None,
        preprocessing: dict | None = None,
        decoder: dict | None = None,
        description: str = "",
    ) -> Manifest:
        """Copy `files` in as a new version; it appears complete or not at all."""
        check_name(name)
        check_name(version, "version")
        paths = [Path(f) for f in files]
        for path in paths:
            if not path.is_file():
                raise InvalidInput(f"{path}: not a readable file")
        if len({p.name for p in paths}) != len(paths):
            raise InvalidInput("two files share a name")
        for path in paths:
            check_name(path.name, "file name")
        final = self.version_dir(name, version)
        if final.exists():
            raise StoreError(f"{name} {version} already exists in {self.root}")
        # Build (and so validate) the manifest from the sources before anything is written.
        try:
            entries = [ManifestFile(name=p.name, sha256=sha256_of(p), size=p.stat().st_size) for p in paths]
        except OSError as exc:
            raise StoreError(f"cannot read {exc.filename or 'a file to add'}: {exc.strerror or exc}") from exc
        try:
            manifest = Manifest(
                name=name, version=version, format=guess_format(paths), files=entries,
                labels=labels, preprocessing=preprocessing, decoder=decoder, description=description,
            )
        except ValidationError as exc:
            raise InvalidInput(f"invalid model: {one_line(exc)}") from None
        self.clean_staging(name)
        with new_version(self._model_dir(name), final, manifest) as staging:
            for path, entry in zip(paths, entries, strict=True):
                if copy_hashed(path, staging / path.name) != entry:
                    raise StoreError(f"{path} changed while it was being added")
        return manifest

    def add_verified(self, manifest: Manifest, sources: dict[str, tuple[Path, Fingerprint]]) -> None:
        """Move in files the caller has already hashed to the manifest's sha256 (a download,
        checked as it arrived), each with its fingerprint from then. One whose fingerprint is
        still that one, ctime included, is moved in by a rename (no byte read); otherwise
        (another filesystem, a write since, even with its mtime put back) it is copied while
        hashed and checked: one read. The sources' names go once the version is in place
        (a moved one at once; it is put back if the version is not added)."""
        name, version = manifest.name, manifest.version
        final = self.version_dir(name, version)
        if final.exists():
            raise StoreError(f"{name} {version} already exists in {self.root}")
        self.clean_staging(name)
        written: dict[str, Fingerprint] = {}  # taken after the move: nothing of ours moves it again
        moved: dict[Path, Path] = {}  # download -> where it went in the staging directory
        with new_version(self._model_dir(name), final, manifest) as staging:
            try:
                for entry in manifest.files:
                    source, proof = sources[entry.name]
                    target = staging / entry.name
                    earlier = moved.get(source)  # one download for two files of the same bytes
                    if earlier is None and move_unwritten(source, proof, target):
                        moved[source] = target
                    elif copy_hashed(earlier or source, target) != entry:
                        raise StoreError(f"{name} {version}: {entry.name} does not match its sha256")
                    written[entry.name] = Fingerprint.of(target.lstat())
            except BaseException:
                put_back(moved)
                raise
        for source, _proof in sources.values():
            source.unlink(missing_ok=True)
        proofs = self._proofs.get((name, version))
        if proofs is None:
            return
        for entry in manifest.files:
            now = Fingerprint.of((final / entry.name).lstat())
            if now == written[entry.name]:  # else the next verify hashes it
                proofs[entry.name] = now

    def activate(self, name: str, version: str) -> None:
        """Point `name` at `version` (which must verify), keeping the old one in history."""
        self.verify(name, version)
        pointer = self._pointer(name)
        if pointer["version"] == version:
            return
        history = [v for v in pointer["history"] if v != version]
        if pointer["version"] is not None:
            history.insert(0, pointer["version"])
        self._write_pointer(name, version, history[:MAX_HISTORY])

    def rollback(self, name: str) -> str:
        """Go back to the most recent earlier active version that still verifies."""
        pointer = self._pointer(name)
        history = list(pointer["history"])
        while history:
            candidate = history.pop(0)
            try:
                self.verify(name, candidate)
            except (StoreError, ModelNotFound):
                continue
            self._write_pointer(name, candidate, history)
            return candidate
        raise StoreError(f"{name}: no earlier version to roll back to")

    def remove(self, name: str, version: str | None = None) -> None:
        """Remove one version (never the active one), or a whole model."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise ModelNotFound(name)
        if version is None:  # the model disappears atomically, then is deleted at leisure
            trash = self.root / f"{STAGING_PREFIX}{os.getpid()}-rm-{name}"
            os.rename(model_dir, trash)
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            return
        if self.active(name) == version:
            raise StoreError(f"{name} {version} is active: activate another version first")
        target = self.version_dir(name, version)
        if not target.is_dir():
            raise ModelNotFound(name, version)
        trash = model_dir / f"{STAGING_PREFIX}{os.getpid()}-rm-{version}"
        os.rename(target, trash)  # disappears atomically, then is deleted at leisure
        fsync_dir(model_dir)
        shutil.rmtree(trash, ignore_errors=True)
        pointer = self._pointer(name)
        if version in pointer["history"]:
            history = [v for v in pointer["history"] if v != version]
            self._write_pointer(name, pointer["version"], history)

    def clean_staging(self, name: str | None = None) -> None:
        """Delete staging directories (of a model, or at the top: removed models) left by
        processes that no longer run."""
        directory = self.root if name is None else self._model_dir(name)
        if not directory.is_dir():
            return
        for path in directory.glob(f"{STAGING_PREFIX}*"):
            pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True)

    # --- helpers -----------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def _write_pointer(self, name: str, version: str | None, history: list[str]) -> None:
        data = json.dumps({"version": version, "history": history}).encode()
        atomic_write(self._model_dir(name) / ACTIVE_FILE, data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True
