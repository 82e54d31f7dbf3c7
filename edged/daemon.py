"""Wires the store, the model manager, the socket API, the pipelines and the MQTT
link, and runs until told to stop.

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

from edged import __version__
from edged.api.routes import Api
from edged.api.server import ApiServer
from edged.config import ConfigError, Settings
from edged.health import Health
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.pipelines.group import Pipelines

log = logging.getLogger("edged")


class Daemon:
    def __init__(self, settings: Settings, listener: socket.socket | None = None,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.reload_settings = reload_settings
        self.store = ModelStore(settings.store.path)
        self.manager = ModelManager(self.store, settings)
        self.health = Health(self.manager, self.store.root)
        self.api = Api(self.manager, settings, self.health)
        self.server = ApiServer(settings.socket, self.api, listener)
        self.pipelines = Pipelines(settings.pipelines, self.manager)
        self.api.pipelines = self.pipelines
        self.api.startup_done.clear()  # ready once models are loaded and pipelines started
        self.mqtt = MqttParts(self) if settings.mqtt.enabled else None
        self.pipelines.use_mqtt(self.mqtt)  # results and sensor topics over the link
        self.health.sections["mqtt"] = self.mqtt.link.status if self.mqtt else (lambda: {"enabled": False})
        self.stopping = threading.Event()

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        started = time.monotonic()
        self.store.root.mkdir(parents=True, exist_ok=True)
        for name in self.store.names():
            self.store.clean_staging(name)
        self.server.start()
        log.info("listening on %s", self.server.path)
        try:
            if self.mqtt is not None:
                self.mqtt.start_reporting()  # loading's events are queued in the outbox
            self.manager.load_all()
            if self.mqtt is not None:
                self.mqtt.link.start()  # `online` once the models serve
            names = ", ".join(
                f"{n} {m.version} ({m.selection.backend})" for n, m in sorted(self.manager.served().items())
            )
            log.info("ready in %.2f s: %s", time.monotonic() - started, names or "no models in the store")
            if not self.manager.served():
                log.warning("the store %s has no active model: add one with `edged models add`",
                            self.store.root)
            self.pipelines.start_enabled()
            self.api.startup_done.set()
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
            if self.mqtt is not None:
                self.mqtt.stop()
            self.manager.close()
        return 0

    def reload_config(self) -> dict:
        """Read the config again and apply what can change while running; say what cannot."""
        if self.reload_settings is None:
            raise ConfigError("no config to reload: the daemon was started without one")
        new = self.reload_settings()
        applied, needs_restart = [], []
        for section in type(new).model_fields:
            if getattr(new, section) == getattr(self.settings, section):
                continue
            if section == "pipelines":
                self.pipelines.apply(new.pipelines)
            elif section == "logging":
                logging.getLogger().setLevel(new.logging.level.upper())
            else:
                needs_restart.append(section)
                continue
            setattr(self.settings, section, getattr(new, section))
            applied.append(section)
        outcome = {"applied": applied, "needs_restart": needs_restart}
        log.info("config reloaded: applied %s; needs a restart: %s",
                 ", ".join(applied) or "nothing", ", ".join(needs_restart) or "nothing")
        if self.mqtt is not None:
            self.mqtt.reporter.event("config_reloaded", **outcome)
        return outcome

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: object) -> None:
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


class MqttParts:
    """The MQTT side of a daemon: the link, its outbox, reports and commands."""

    def __init__(self, daemon: Daemon) -> None:
        from edged.mqtt.commands import Commands
        from edged.mqtt.link import MqttLink
        from edged.mqtt.outbox import Outbox
        from edged.mqtt.reports import Reporter

        settings = daemon.settings.mqtt
        self.outbox = Outbox(settings.outbox_path, settings.outbox_max_messages, settings.outbox_max_bytes)
        self.link = MqttLink(settings, self.outbox, lambda: {
            "version": __version__, "started_at": daemon.health.started,
            "models": {name: m.version for name, m in daemon.manager.served().items()},
        })
        self.reporter = Reporter(self.link, daemon.health, daemon.manager, daemon.pipelines,
                                 settings.health_interval_s)
        self.commands = Commands(self.link, daemon.manager, daemon.health, daemon.pipelines,
                                 daemon.reload_config if daemon.reload_settings else None,
                                 settings.command_senders) if settings.commands else None
        self.updates = None
        if daemon.settings.updates.enabled:
            from edged.mqtt.updates import UpdateAgent

            self.updates = UpdateAgent(daemon.settings.updates, self.reporter, daemon.manager)
        daemon.health.sections["updates"] = self.update_status

    # What pipelines use (edged.pipelines.mqtt_port.MqttPort), without importing edged.mqtt.
    @property
    def connected(self) -> threading.Event:
        return self.link.connected

    def put_result(self, pipeline: str, document: dict) -> bool:
        return self.link.put("result", self.link.topics.results(pipeline), document)

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        self.link.subscribe(topic_filter, lambda message: handler(message.topic, message.payload))

    def start_reporting(self) -> None:
        self.reporter.start()
        if self.commands is not None:
            self.commands.start()
        if self.updates is not None:
            self.updates.start()

    def update_status(self) -> dict:
        from edged.mqtt.updates import describe

        return describe(self.updates)

    def stop(self) -> None:
        if self.updates is not None:
            self.updates.stop()
        if self.commands is not None:
            self.commands.stop()
        self.reporter.stop()
        self.link.stop()
        self.outbox.close()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
