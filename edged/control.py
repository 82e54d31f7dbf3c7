"""The control service: which version of a model serves, for every surface alike.

MLServer's DataPlane serves its REST and gRPC servers alike; this serves the MQTT
commands and the update agent (and any other surface that changes a running daemon's
models), so "activate, sync, check that it serves, else say why" is written once, here.
It sits above the core (the store and the model manager) and below the transports: it
imports neither MQTT nor HTTP, and its errors are domain errors the transports word.

`trial_load` is the update path's: it loads a staged version once, runs the caller's
self-test on that load, and hands the load to the manager, which serves it as it is once
the version is activated (if the store's version is still the one loaded): an update loads
and probes a model once, not twice. An update that stops before the activation drops it
(`drop_trial`); so does a sync once the version is no longer in the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edged.backends.base import LoadedModel
from edged.backends.selection import Selection
from edged.errors import EdgedError
from edged.fsio import Fingerprint
from edged.models.lifecycle import Adopted
from edged.models.manager import ModelManager
from edged.models.manifest import Manifest
from edged.models.store import ModelStore, version_key

SelfTest = Callable[[LoadedModel], None]


class ControlError(EdgedError):
    """An action that cannot be done as asked; the message says why, in one line."""


class NotServing(ControlError):
    """A version the store now says is active that does not serve (it failed to load)."""

    def __init__(self, name: str, version: str, reason: str) -> None:
        super().__init__(f"{name} {version} is active in the store but not serving: {reason}")
        self.version = version
        self.reason = reason


@dataclass(frozen=True)
class Serving:
    model: str
    version: str
    backend: str

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "version": self.version, "backend": self.backend}


class Control:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.store: ModelStore = manager.store

    # --- what the store holds ------------------------------------------------------------
    def models(self) -> dict[str, dict]:
        """{name: {"versions": [...], "active": version or None}} of every model in the store."""
        return {name: {"versions": self.store.versions(name), "active": self.store.active(name)}
                for name in self.store.names()}

    def active(self, name: str) -> str | None:
        """The active version of `name`, None when it has none or is not in the store."""
        return self.store.active(name) if name in self.store.names() else None

    def has(self, name: str, version: str) -> bool:
        return name in self.store.names() and version in self.store.versions(name)

    @property
    def store_root(self) -> Path:
        """Where versions are stored (for the disk space an update needs there)."""
        return self.store.root

    # --- which version serves --------------------------------------------------------------
    def activate(self, name: str, version: str) -> Serving:
        """Make `version` active and serve it; NotServing (it stays active in the store) when
        it does not load."""
        if version not in self.store.versions(name):
            raise ControlError(f"{name} has no version {version!r} in the store")
        self.store.activate(name, version)
        return self.serving(name, version)

    def rollback(self, name: str) -> Serving:
        """Activate the most recent earlier version that verifies and serve it (NotServing,
        with the version rolled back to, when it does not load)."""
        return self.serving(name, self.store.rollback(name))

    def remove(self, name: str, version: str | None = None) -> None:
        """Remove a version that is not active (or the whole model) from the store; what
        served it stops at the next sync."""
        self.store.remove(name, version)

    def serving(self, name: str, version: str) -> Serving:
        """Load what the store now says, and say whether `version` is what serves."""
        self.manager.sync()
        served = self.manager.served().get(name)
        if served is None or served.version != version:
            raise NotServing(name, version, self.manager.failures.get(name, "it did not load"))
        return Serving(name, version, served.selection.backend)

    # --- the update path -------------------------------------------------------------------
    def stage(self, manifest: Manifest, downloads: dict[str, tuple[Path, Fingerprint]]) -> None:
        """Move verified downloads into the store as a new version, not yet active."""
        self.store.add_verified(manifest, downloads)

    def keep_proofs(self, name: str, version: str) -> contextlib.AbstractContextManager[None]:
        """While an update runs: checks of its files cost a stat, not a hash (models/staging.py)."""
        return self.store.keep_proofs(name, version)

    def version_file(self, name: str, version: str, filename: str) -> Path:
        return self.store.version_dir(name, version) / filename

    def trial_load(self, name: str, version: str, self_test: SelfTest | None = None) -> Selection:
        """Load a staged version with the model's settings and backend, run `self_test` on
        that load, and hand it to the manager to serve once `version` is activated. The
        backend selection it ran on; raises EdgedError (the load is closed) when it fails."""
        manifest, loaded, selection = self.manager.load_version(name, version)
        try:
            if self_test is not None:
                self_test(loaded)
        except BaseException:
            loaded.close()
            raise
        self.manager.adopt(name, Adopted(version, manifest, loaded, selection))
        return selection

    def drop_trial(self, name: str, version: str) -> None:
        """Close `version`'s trial load if no activation took it (its update failed, or the
        version already served): a compiled model is not kept for nothing."""
        self.manager.drop_adopted(name, version)

    def verify(self, name: str, version: str, *, full: bool = False) -> None:
        """Its files still match (every byte when `full`, else as `ModelStore.verify` does:
        within an update, a stat per file while the proofs are kept)."""
        self.store.verify(name, version, full=full)

    def infer_internal(self, name: str, version: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """`version`'s outputs for `inputs` (given to its first input) through the path every
        request takes, counted as the daemon's own inference, not a client's."""
        spec = self.manager.get(name, version).loaded.inputs[0]
        return self.manager.infer(name, {spec.name: inputs}, version=version, internal=True).outputs

    def backend_errors(self, name: str) -> int:
        """Inferences of `name` the backend failed so far (clients' and internal ones)."""
        stats = self.manager.stats.get(name)
        return stats.backend_errors if stats is not None else 0

    def prune(self, name: str, keep_versions: int) -> Iterator[str]:
        """Keep `keep_versions` versions: the active one, the rollback target, the newest
        others; yields each version removed."""
        keep = {self.store.active(name), *self.store.history(name)[:1]}
        versions = sorted(self.store.versions(name), key=version_key, reverse=True)
        for version in versions:
            if len(keep) >= keep_versions:
                break
            keep.add(version)
        for version in versions:
            if version not in keep:
                self.store.remove(name, version)
                yield version
