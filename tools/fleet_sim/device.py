"""One simulated device: edged's own MQTT, update, store and model parts, wired as
`edged.daemon.Daemon` wires them, minus the socket API, the pipelines' sources, systemd
and the store-sync thread.

Per device, all real and all its own: a `ModelStore` directory (with version 1 added and
activated as `edged models add` would), a `ModelManager` and `Control` over it, `Health`,
an on-disk SQLite outbox and an `MqttLink` (`MqttPipe`), and `MqttParts`: the reporter
(retained status with its Last Will, retained state, health every `health_interval_s`,
events), the command handler and the update agent with its chunk transfer into its own
download directory. Only the compiled model is shared within a process (shared_model.py).

Differences from a daemon, and why they do not matter here: no instance locks (each store
has one user), no socket (nothing serves clients), no store-sync thread (only the update
agent changes the store, and `Control.activate` syncs the manager itself).

`tap` counts every chunk reply that reaches the device, also those the transfer drops
(a late reply to a request it already asked again): the bytes the broker delivered.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from edged import __version__
from edged.config import Settings
from edged.control import Control
from edged.health import Health
from edged.models.lifecycle import ModelEvent, ModelEvents
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.mqtt.parts import MqttParts, MqttPipe
from edged.pipelines.group import Pipelines
from edged.shutdown import run_steps


class SimDevice:
    def __init__(self, device_id: str, workdir: Path, settings: dict[str, Any]) -> None:
        """`settings`: the daemon's settings tree as a dict ([mqtt], [updates], ...); the
        paths under `workdir` are filled in here."""
        self.device_id = device_id
        self.workdir = workdir
        tree = {section: dict(values) for section, values in settings.items()}
        tree.setdefault("store", {})["path"] = str(workdir / "store")
        tree.setdefault("socket", {})["path"] = str(workdir / "edged.sock")  # never bound
        tree.setdefault("mqtt", {}).update(device_id=device_id, outbox_path=str(workdir / "outbox.db"))
        tree.setdefault("updates", {})["download_dir"] = str(workdir / "downloads")
        self.settings = Settings(**tree)
        self.store = ModelStore(self.settings.store.path)
        self.parts: MqttParts | None = None
        self.manager = ModelManager(self.store, self.settings, ModelEvents.each(self._model_event))
        self.control = Control(self.manager)
        self.health = Health(self.manager, self.store.root)
        self.pipe = MqttPipe(self.settings, self._hello)
        self.pipelines = Pipelines(self.settings.pipelines, self.manager, self.pipe)
        self.parts = MqttParts(self.settings, self.pipe, self.manager, self.control, self.health,
                               self.pipelines, None)
        self.health.sections.update({"pipelines": self.pipelines.status, **self.parts.health_sections()})
        self.delivered_bytes = 0
        self.delivered_chunks = 0
        self._tap_lock = threading.Lock()

    def add_model(self, name: str, files: list[Path], version: str) -> None:
        """What `edged models add NAME FILES --version V` and `activate` do."""
        self.store.root.mkdir(parents=True, exist_ok=True)
        if version not in self.store.versions(name):
            self.store.add(name, files, version)
        self.store.activate(name, version)

    def start(self) -> None:
        """The daemon's `_start` order: parts (events queue in the outbox), the models'
        first load, then the link (`online` once the models serve)."""
        assert self.parts is not None
        self.parts.start()
        self.pipe.link.subscribe(self.pipe.link.topics.chunk_replies, self._tap)
        self.manager.load_all()
        self.pipe.link.start()

    def stop(self) -> list[str]:
        """The daemon's stop steps for these parts; the names of those that failed."""
        steps = self.parts.stop_steps() if self.parts is not None else []
        return run_steps([*steps, ("models", self.manager.close)])

    def figures(self) -> dict[str, Any]:
        agent = self.parts.updates if self.parts is not None else None
        transfer = agent.transfer if agent is not None else None
        return {"accepted_bytes": transfer.bytes_received if transfer else 0,
                "chunks_retried": transfer.chunks_retried if transfer else 0,
                "delivered_bytes": self.delivered_bytes, "delivered_chunks": self.delivered_chunks,
                "connections": self.pipe.link.attempts.connections,
                "active": {n: m.version for n, m in self.manager.served().items()}}

    def _tap(self, message: Any) -> None:
        with self._tap_lock:
            self.delivered_bytes += len(message.payload)
            self.delivered_chunks += 1

    def _model_event(self, event: ModelEvent) -> None:
        if self.parts is not None:
            self.parts.on_model_event(event)

    def _hello(self) -> dict[str, Any]:
        return {"version": __version__, "started_at": self.health.started,
                "models": {name: m.version for name, m in self.manager.served().items()}}
