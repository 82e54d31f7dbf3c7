"""Wires the store, the model manager and the socket API, and runs until told to stop.

Signal handlers only set a flag; the main loop does the work (syncing the
store's active versions) and the single shutdown path.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from edged.api.routes import Api
from edged.api.server import ApiServer
from edged.config import Settings
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.pipelines.group import Pipelines

log = logging.getLogger("edged")


class Daemon:
    def __init__(self, settings: Settings, listener: socket.socket | None = None) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store.path)
        self.manager = ModelManager(self.store, settings)
        self.api = Api(self.manager, settings)
        self.server = ApiServer(settings.socket, self.api, listener)
        self.pipelines = Pipelines(settings.pipelines, self.manager)
        self.api.pipelines = self.pipelines
        self.stopping = threading.Event()

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        started = time.monotonic()
        self.store.root.mkdir(parents=True, exist_ok=True)
        for name in self.store.names():
            self.store.clean_staging(name)
        self.server.start()
        log.info("listening on %s", self.server.path)
        try:
            self.manager.load_all()
            names = ", ".join(
                f"{n} {m.version} ({m.selection.backend})" for n, m in sorted(self.manager.served().items())
            )
            log.info("ready in %.2f s: %s", time.monotonic() - started, names or "no models in the store")
            if not self.manager.served():
                log.warning("the store %s has no active model: add one with `edged models add`",
                            self.store.root)
            self.pipelines.start_enabled()
            if on_ready is not None:
                on_ready()
            while not self.stopping.wait(self.settings.store.poll_interval_s):
                try:
                    self.manager.sync()
                except Exception:  # the daemon outlives whatever the store throws at it
                    log.exception("syncing with the model store failed; serving what is loaded")
        finally:
            log.info("stopping")
            self.pipelines.stop_all()
            self.server.stop(timeout=self.settings.socket.request_timeout_s)
            self.manager.close()
        return 0

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: object) -> None:
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
