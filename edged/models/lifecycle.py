"""What the manager keeps per model, and the hooks it tells what happens to one.

`ModelState` is everything about one model name in one object: the version served, why
it cannot be served, the version not to try again, the pending load, an update's tested
load waiting to be adopted, the statistics. `ModelEvents` is given to the manager when it
is built (MLServer's `on_model_load/unload` hooks): one typed callable per lifecycle step,
so what reports on models (MQTT events, the retained state) needs no hook appended from
outside and cannot mistake one event's fields for another's.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar

from edged.backends.base import LoadedModel
from edged.backends.selection import Selection
from edged.config import ModelSettings
from edged.metrics import ModelStats
from edged.models.manifest import Manifest

log = logging.getLogger("edged.models.manager")


class ServedModel:
    """One loaded version, counted in and out so it is closed only when idle."""

    def __init__(
        self, manifest: Manifest, loaded: LoadedModel, selection: Selection, settings: ModelSettings
    ) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.loaded = loaded
        self.selection = selection
        self.settings = settings
        self.loaded_at = time.time()
        self.retry_at: float | None = None  # set after a fallback: when to probe again
        self.consecutive_errors = 0
        self._lock = threading.Lock()
        self._inflight = 0
        self._retired = False

    def acquire(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            close = self._retired and self._inflight == 0
        if close:
            self.loaded.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._inflight == 0
        if close:
            self.loaded.close()

    def describe(self) -> dict:
        return {
            "version": self.version,
            "format": self.manifest.format,
            "sha256": self.manifest.files[0].sha256 if len(self.manifest.files) == 1 else None,
            "loaded_at": self.loaded_at,
            **self.selection.as_dict(),
        }


@dataclass
class Adopted:
    """A version loaded and tested before its activation (an update's trial load): served
    as it is once activated, instead of being loaded and probed a second time, if the
    store's version is still the one loaded (its manifest, so its files' hashes, equal):
    one removed and added again with other files is loaded afresh."""

    version: str
    manifest: Manifest  # as verified when it was loaded
    loaded: LoadedModel
    selection: Selection


@dataclass
class ModelState:
    """Everything the manager knows about one model name."""

    name: str
    served: ServedModel | None = None
    failure: str | None = None  # why it cannot be served (a served older version may still serve)
    failed_version: str | None = None  # not tried again until another version is activated
    pending: bool = False  # active in the store, first load not finished
    adopted: Adopted | None = None
    stats: ModelStats | None = None  # from its first load on

    def drop_adopted(self, version: str | None = None) -> None:
        """Close the adopted load (only `version`'s, when given)."""
        adopted = self.adopted
        if adopted is not None and version in (None, adopted.version):
            self.adopted = None
            adopted.loaded.close()

    def drop_removed(self, versions: Callable[[str], Collection[str]]) -> None:
        """Close the adopted load of a version no longer in the store (`versions`)."""
        if self.adopted is None:
            return
        try:
            held = versions(self.name)
        except OSError:  # the store changing under the listing: decided at the next sync
            return
        if self.adopted.version not in held:
            self.drop_adopted()

    def take_adopted(self, version: str, verify: Callable[[str, str], Manifest]) -> Adopted | None:
        """The adopted load of `version`, handed to the caller to serve, if `verify(name,
        version)` (the store's manifest, its files checked) is the one it was loaded from;
        else it is closed. Another version's adopted load is left waiting for its own
        activation."""
        adopted = self.adopted
        if adopted is None or adopted.version != version:
            return None
        self.adopted = None
        try:
            if verify(self.name, version) == adopted.manifest:
                return adopted
        except BaseException:
            adopted.loaded.close()
            raise
        adopted.loaded.close()  # removed and added again with other files since
        return None


# --- the lifecycle events: their fields are what MQTT events carry ------------------------

@dataclass(frozen=True)
class _Event:
    kind: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Loaded(_Event):
    kind: ClassVar[str] = "model_loaded"
    model: str
    version: str
    why: str  # activated, retry after fallback, fallback from ...
    previous: str | None
    backend: str
    reason: str
    device: str = "CPU"


@dataclass(frozen=True)
class Failed(_Event):
    kind: ClassVar[str] = "model_failed"
    model: str
    version: str | None
    error: str


@dataclass(frozen=True)
class Unloaded(_Event):
    kind: ClassVar[str] = "model_unloaded"
    model: str
    version: str


@dataclass(frozen=True)
class Fallback(_Event):
    kind: ClassVar[str] = "backend_fallback"
    model: str
    version: str
    from_backend: str
    to_backend: str
    error: str
    from_device: str = "CPU"
    to_device: str = "CPU"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "from": self.from_backend,
                "to": self.to_backend, "error": self.error, "from_device": self.from_device,
                "to_device": self.to_device}


@dataclass(frozen=True)
class Skipped(_Event):
    """A backend not loaded because it crashed the daemon before (models/attempts.py)."""

    kind: ClassVar[str] = "model_skipped"
    model: str
    version: str
    backend: str
    runtime: str
    reason: str
    device: str = "CPU"


ModelEvent = Loaded | Failed | Unloaded | Fallback | Skipped


def _ignore(event: Any) -> None:
    pass


@dataclass(frozen=True)
class ModelEvents:
    """The manager's lifecycle hooks, given when it is built; each defaults to nothing."""

    on_loaded: Callable[[Loaded], None] = _ignore
    on_failed: Callable[[Failed], None] = _ignore
    on_unloaded: Callable[[Unloaded], None] = _ignore
    on_fallback: Callable[[Fallback], None] = _ignore
    on_skipped: Callable[[Skipped], None] = _ignore

    @classmethod
    def each(cls, hook: Callable[[ModelEvent], None]) -> ModelEvents:
        """One callable for every kind (it tells them apart by type or `kind`)."""
        return cls(hook, hook, hook, hook, hook)


def tell(hook: Callable[[Any], None], event: _Event) -> None:
    """Call one hook; a hook that raises must never break loading or serving."""
    try:
        hook(event)
    except Exception:
        log.exception("model event hook failed on %s", event.kind)

