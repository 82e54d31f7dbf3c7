"""Remembers, across a crash, which model a backend was loading, so a crash is not a loop.

A runtime that crashes the whole process while loading or probing a model (LiteRT
segfaulting under QEMU, say) cannot be caught: restarted by systemd, the daemon would
load the same model on the same runtime and crash again, for ever. So every load and
probe is recorded before it starts, in a file of its own under `<store>/.attempts/`
(written, fsynced, renamed into place) and locked (`flock`) by the process loading;
when the load returns, whether it worked or raised, the file is removed. A record whose
lock nobody holds is a load that never returned: the process died in it. That
combination (model, version, backend, device, the runtime's version, a hash of the model's
configuration) is skipped from then on and reported; a new version, a new runtime or a
changed configuration is a new combination and is tried. Deleting a record clears it.

A stop is not a crash: a daemon that exits while a load it left behind is still running
(a SIGTERM while a large model compiles) removes its own records first (`release_own`),
so the next start tries that backend again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edged.backends.base import LoadOptions
from edged.backends.selection import LISTING, Attempt, BackendSkipped, runtime_version
from edged.config import ModelSettings
from edged.errors import EdgedError
from edged.fsio import fsync_dir
from edged.models.store import ModelStore

log = logging.getLogger(__name__)
DIRECTORY = ".attempts"
TEMPORARY_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Combination:
    """What one attempt is remembered by: a change to any field is a new combination."""

    model: str
    version: str
    backend: str
    device: str  # "CPU", "GPU", "AUTO", a delegate library, LISTING: a GPU driver crash spares the CPU
    runtime: str  # "openvino 2026.4.1"
    config: str  # hash of the model's settings and the backend's load options

    @property
    def candidate(self) -> str:
        return f"{self.backend}/{self.device}"

    @property
    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def skip_message(self) -> str:
        what = (f"{self.backend} crashed the daemon while listing its devices for" if self.device == LISTING
                else f"{self.backend} on {self.device} crashed the daemon while loading")
        return (f"{what} {self.model} {self.version} (runtime "
                f"{self.runtime}); not tried again until the model version, the runtime version "
                "or the config changes")


def config_hash(settings: ModelSettings, options: LoadOptions | None) -> str:
    """The model's `[models.X]` table and the load options of one backend, hashed."""
    text = json.dumps({"model": settings.model_dump(mode="json"),
                       "load": dataclasses.asdict(options) if options else None},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Attempts:
    """The attempt records of one store, and what was skipped because of them."""

    def __init__(self, store: ModelStore, on_skip: Callable[[dict], None]) -> None:
        self.store = store
        self.directory = store.root / DIRECTORY
        self.on_skip = on_skip  # called once per skipped combination and process
        self._skipped: dict[str, tuple[str, dict[str, str]]] = {}  # model -> (version, {candidate: why})
        self._reported: set[str] = set()
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._records_lock = threading.Lock()  # _held, _released and writing a record
        self._held: dict[Path, int] = {}  # this process's records of loads not returned: path -> fd
        self._released = False  # release_own was called: the process is exiting, record nothing more
        self.prune()

    def guard(self, model: str, version: str, settings: ModelSettings,
              options: dict[str, LoadOptions]) -> Attempt:
        """The `attempt` hook of `select` for one load of `model` `version`."""
        with self._lock:
            if self._skipped.get(model, (version,))[0] != version:
                del self._skipped[model]  # about another version: no longer true of this one

        def attempt(backend: str, device: str) -> contextlib.AbstractContextManager[object]:
            return self._attempt(Combination(model, version, backend, device, runtime_version(backend),
                                             config_hash(settings, options.get(backend))))
        return attempt

    def skipped(self) -> dict[str, str]:
        """{model: why a backend was not tried}, for the model's status."""
        with self._lock:
            return {model: "; ".join(why.values()) for model, (_, why) in self._skipped.items() if why}

    @contextlib.contextmanager
    def _attempt(self, combination: Combination) -> Iterator[None]:
        if combination.key in self.crashed():
            self._skip(combination)
        record = self._write(combination)
        try:
            yield
        finally:
            if record is not None:
                self._clear(*record)
            with self._lock:  # it returned: whatever was said about this candidate is stale
                self._skipped.get(combination.model, ("", {}))[1].pop(combination.candidate, None)

    def _skip(self, combination: Combination) -> None:
        message = combination.skip_message()
        with self._lock:
            why = self._skipped.setdefault(combination.model, (combination.version, {}))[1]
            why[combination.candidate] = message
            first = combination.key not in self._reported
            self._reported.add(combination.key)
        if first:
            log.error("%s", message, extra={"MODEL": combination.model, "VERSION": combination.version})
            self.on_skip({"model": combination.model, "version": combination.version,
                          "backend": combination.backend, "device": combination.device,
                          "runtime": combination.runtime,
                          "reason": message})
        raise BackendSkipped(message)

    def release_own(self) -> int:
        """Remove the records of this process's loads that have not returned, because the
        process is about to exit on purpose (a stop, not a crash), and record no load from
        now on. How many were removed. The files stay locked until the process ends; a load
        that returns later finds its record gone."""
        with self._records_lock:  # _write holds it: no record appears after this
            self._released = True
            paths = list(self._held)
            for path in paths:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("cannot remove the attempt record %s: %s", path, exc)
            if paths:
                try:
                    fsync_dir(self.directory)
                except OSError as exc:
                    log.warning("cannot sync %s: %s", self.directory, exc)
        return len(paths)

    # --- the files ---------------------------------------------------------------------
    def crashed(self) -> dict[str, dict]:
        """{key: record} of the attempts that never returned (no process holds their lock)."""
        found = {}
        for path, record in self._unlocked("*.json"):
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                found[record["key"]] = record
            else:
                log.warning("%s: not an attempt record; ignored", path)
        return found

    def prune(self) -> None:
        """Drop records that can never match again: their version left the store or their
        runtime was replaced; and temporary files a crash left half written."""
        for path, _ in self._unlocked(f"{TEMPORARY_PREFIX}*"):
            path.unlink(missing_ok=True)
        for path, record in self._unlocked("*.json"):
            try:
                gone = not self.store.version_dir(record["model"], record["version"]).is_dir()
                old = "device" not in record  # written before devices were recorded: never matches
                stale = gone or old or runtime_version(record["backend"]) != record["runtime"]
            except (EdgedError, KeyError, TypeError):
                continue  # not ours to judge; `crashed` says so
            if stale:
                log.info("%s: forgetting the crash of %s %s on %s (%s)", path.name, record["model"],
                         record["version"], record["backend"], "version removed" if gone else
                         "recorded without its device" if old else "runtime changed")
                path.unlink(missing_ok=True)

    def forget(self, model: str) -> int:
        """Delete the crash records of `model` (for `edged models retry`); how many there were.
        The next load of it tries every backend again."""
        count = 0
        for path, record in self._unlocked("*.json"):
            if isinstance(record, dict) and record.get("model") == model:
                path.unlink(missing_ok=True)
                count += 1
        with self._lock:
            self._skipped.pop(model, None)
        return count

    def _unlocked(self, pattern: str) -> Iterator[tuple[Path, object]]:
        """(path, parsed JSON or None) of each file matching `pattern` that no process holds."""
        try:
            paths = sorted(self.directory.glob(pattern))
        except OSError:
            return
        for path in paths:
            try:
                with path.open("rb") as file:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
                    data = file.read()
            except BlockingIOError:
                continue  # a load in progress, in this process or another
            except OSError:
                continue  # removed meanwhile, or unreadable
            try:
                yield path, json.loads(data)
            except ValueError:
                yield path, None

    def _write(self, combination: Combination) -> tuple[int, Path] | None:
        """Create the record, locked, durably; None (and a warning) if the disk refuses, or
        when `release_own` was called (the process is exiting: no crash to remember)."""
        name = f"{combination.key[:16]}-{os.getpid()}-{next(self._numbers)}"
        temporary = self.directory / f"{TEMPORARY_PREFIX}{name}"
        path = self.directory / f"{name}.json"
        record = {**dataclasses.asdict(combination), "key": combination.key, "pid": os.getpid(),
                  "started": round(time.time(), 3)}
        data = json.dumps(record, sort_keys=True).encode()
        fd = -1
        with self._records_lock:  # against release_own
            if self._released:
                return None
            try:
                self.directory.mkdir(exist_ok=True)
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
                os.rename(temporary, path)
                fsync_dir(self.directory)
                self._held[path] = fd
                return fd, path
            except OSError as exc:
                log.warning("cannot record the load of %s %s on %s (%s): a crash in it would not be "
                            "remembered", combination.model, combination.version, combination.backend, exc)
                temporary.unlink(missing_ok=True)
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)  # renamed but not synced: not a crash either
                    os.close(fd)
                return None

    def _clear(self, fd: int, path: Path) -> None:
        with self._records_lock:
            self._held.pop(path, None)
        try:
            path.unlink(missing_ok=True)
            fsync_dir(self.directory)  # else a power cut could bring back a load that returned
        except OSError as exc:
            log.warning("cannot clear the attempt record %s: %s", path, exc)
        finally:
            os.close(fd)
