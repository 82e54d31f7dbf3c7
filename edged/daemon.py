"""Wires the store, the model manager, the socket API, the pipelines and the MQTT
link, and runs until told to stop.

`run()` is three phases: `_start` (models load on a thread while the main thread
watches for a stop), `_serve` (the main loop: reload on SIGHUP, the watchdog, the
status line systemd shows) and `_stop` (every step guarded, see edged.shutdown,
which also catches the signals). The store is synced on a thread of its own, since
loading a new version may take longer than the watchdog allows the loop to be away.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edged import __version__, systemd
from edged.api.routes import Api
from edged.api.server import ApiServer, check_socket_path
from edged.config import ConfigError, Settings
from edged.control import Control
from edged.health import Health
from edged.instance_lock import InstanceLock
from edged.models.lifecycle import ModelEvent, ModelEvents
from edged.models.manager import ModelManager
from edged.models.store import ModelStore
from edged.pipelines.group import Pipelines
from edged.shutdown import Signals, run_steps

if TYPE_CHECKING:
    from edged.mqtt.parts import MqttParts

log = logging.getLogger("edged")


class Daemon:
    def __init__(self, settings: Settings, listener: socket.socket | None = None,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.reload_settings = reload_settings
        # Before anything touches the socket, the store or the outbox. An activated socket is
        # systemd's, handed to one process: it needs no lock of ours (and its directory may be
        # read-only to us).
        self.locks: list[InstanceLock] = []
        if listener is None:
            path = settings.socket.path
            self.locks.append(InstanceLock.for_socket(path))  # says so when its holder's socket is gone
            check_socket_path(path)  # what is wrong with the socket's path is said first
        self.locks.append(InstanceLock(settings.store.path / ".lock",
                                       f"another process is using the model store {settings.store.path} "
                                       "(edged, pid {pid})"))
        self.store = ModelStore(settings.store.path)
        self.mqtt: MqttParts | None = None
        # What happens to models is reported over MQTT, whose parts need the manager: the
        # hooks reach them through _model_event.
        self.manager = ModelManager(self.store, settings, ModelEvents.each(self._model_event))
        self.control = Control(self.manager)  # activate, roll back, trial-load: for every transport
        self.health = Health(self.manager, self.store.root)
        pipe = None
        if settings.mqtt.enabled:
            from edged.mqtt.parts import MqttParts, MqttPipe

            pipe = MqttPipe(settings, self._hello)
        self.pipelines = Pipelines(settings.pipelines, self.manager, pipe)  # results and sensors over MQTT
        # Ready once models are loaded and pipelines started (_start).
        self.api = Api(self.manager, settings, self.health, self.pipelines, startup_done=False)
        self.server = ApiServer(settings.socket, self.api, listener)
        if pipe is not None:
            self.mqtt = MqttParts(settings, pipe, self.manager, self.control, self.health, self.pipelines,
                                  self.reload_config if reload_settings else None)
        self.watchdog = systemd.Watchdog(systemd.inference_check(self.manager), systemd.watchdog_interval())
        self.health.sections.update({  # in this order in the document
            "pipelines": self.pipelines.status, "api": self.api.api_status,
            **(self.mqtt.health_sections() if self.mqtt else {"mqtt": lambda: {"enabled": False}}),
            "watchdog": self.watchdog.status,
        })
        self.health.ready_checks.append(self.api.socket_reachable)
        self.stopping = threading.Event()
        self.restart_needed: list[str] = []  # config sections changed on disk that only a restart applies
        self._reload_lock = threading.Lock()
        self._notify_lock = threading.Lock()  # a reload's READY=1 never follows STOPPING=1
        self._status = ""

    def run(self, signals: Signals | None = None) -> int:
        """Start, serve until SIGTERM or SIGINT, stop; 0, or 1 when a stop step failed.
        `signals`: those `edged run` caught from its first moment (else caught from here)."""
        self.signals = signals or Signals.install()
        # Exiting on purpose with a load in progress (a second SIGTERM, or the exit after a
        # stop that left a compile behind) is not a crash of that load's backend.
        self.signals.before_exit.append(self.manager.attempts.release_own)
        self._loader: threading.Thread | None = None
        try:
            if self._start():
                self._serve()
        finally:
            failed = self._stop()
        return 1 if failed else 0

    def _start(self) -> bool:
        """Everything before READY=1; False when told to stop meanwhile (never ready then)."""
        log.info("starting")
        started = time.monotonic()
        self.store.root.mkdir(parents=True, exist_ok=True)
        self.store.clean_staging()  # whole models a killed `edged models remove` left
        for name in self.store.names():
            self.store.clean_staging(name)
        if self.signals.stop.is_set():
            return False
        if not self.server.inherited:  # ours: answers at once, 503 to inferences until loaded
            self.start_serving()
        if self.mqtt is not None:
            self.mqtt.start()  # loading's events are queued in the outbox
        count = len(self.store.names())
        systemd.status(f"loading {count} model{'' if count == 1 else 's'}")
        # On a thread: a stop ends the wait at once, leaving a load that does not return behind.
        self._loader = self.signals.run_until_stop(self.manager.load_all, "model-loading")
        if self.signals.stop.is_set():
            return False
        if self.mqtt is not None:
            self.mqtt.link.start()  # `online` once the models serve
        if not self.manager.served():
            log.warning("the store %s has no active model: add one with `edged models add`",
                        self.store.root)
        self.pipelines.start_enabled()
        names = ", ".join(
            f"{n} {m.version} ({m.selection.short})" for n, m in sorted(self.manager.served().items())
        )
        line = self.status_line()
        # From this last check to READY=1 nothing waits: told to stop before it, the daemon
        # never says it is ready (no `ready in`, no READY=1); after it, it says both.
        if self.signals.stop.is_set():
            return False
        self.api.startup_done.set()
        if self.server.inherited:  # systemd's: what waited in its backlog gets a ready edged
            self.start_serving()
        log.info("ready in %.2f s: %s", time.monotonic() - started, names or "no models in the store")
        self._tell_systemd(ready=True, line=line)  # the socket answers from here on
        return True

    @property
    def loading_abandoned(self) -> bool:
        """A stop came while models were loading and their load has not returned."""
        return self._loader is not None and self._loader.is_alive()

    def _serve(self) -> None:
        """The main loop: reload on SIGHUP, the socket and locks checked, watchdog, STATUS=."""
        threading.Thread(target=self._sync_loop, name="store-sync", daemon=True).start()
        while not self.signals.stop.is_set():
            if self.signals.take_reload():
                self._reload_on_signal()
            self.server.check_path()  # a socket deleted under us is bound again, or not ready
            for lock in self.locks:  # and a lock file deleted with it is taken again
                lock.check()
            self.watchdog.tick()
            self._tell_systemd()
            self.signals.wait(self.watchdog.tick_s)

    def _stop(self) -> list[str]:
        """Every stop step, each guarded: one that raises is logged and the next runs.
        The names of those that failed."""
        log.info("stopping")
        started = time.monotonic()
        with self._notify_lock:
            self.stopping.set()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("systemd", systemd.stopping), ("pipelines", self.pipelines.stop_all),
            ("socket", lambda: self.server.stop(timeout=self.settings.socket.request_timeout_s)),
        ]
        if self.mqtt is not None:
            steps += self.mqtt.stop_steps()  # each guarded: the outbox is closed whatever failed
        if self.loading_abandoned:  # closing would wait for the load's lock, maybe for ever
            log.warning("stopping: models are still loading; not waiting for them")
            # The process exits with that load running: a stop, not a crash of its backend.
            steps.append(("attempt records", self.manager.attempts.release_own))
        else:
            steps.append(("models", self.manager.close))
        steps += [(f"lock {lock.path}", lock.close) for lock in self.locks]
        failed = run_steps(steps)
        log.info("stopped in %.2f s%s", time.monotonic() - started,
                 f"; failed: {', '.join(failed)}" if failed else "")
        return failed

    def _model_event(self, event: ModelEvent) -> None:
        if self.mqtt is not None:
            self.mqtt.on_model_event(event)

    def _hello(self) -> dict:
        """What the link says when it comes online (retained on its status topic)."""
        return {"version": __version__, "started_at": self.health.started,
                "models": {name: m.version for name, m in self.manager.served().items()}}

    def start_serving(self) -> None:
        self.server.start()
        log.info("listening on %s%s", self.server.path, " (from systemd)" if self.server.inherited else "")

    def _sync_loop(self) -> None:
        """Make the served versions follow the store's active pointers."""
        while not self.stopping.wait(self.settings.store.poll_interval_s):
            try:
                self.manager.sync()
            except Exception:  # the daemon outlives whatever the store throws at it
                log.exception("syncing with the model store failed; serving what is loaded")

    def _reload_on_signal(self) -> None:
        try:
            self.reload_config()
        except ConfigError:
            return  # logged in one line by reload_config
        except Exception:
            log.exception("config reload failed")

    def reload_config(self) -> dict:
        """Read the config again and apply what can change while running; say what cannot.
        RELOADING=1 and READY=1 only while serving: a reload during start-up (the MQTT
        `config.reload` command) leaves READY=1 to the start, and none follows STOPPING=1."""
        with self._reload_lock:
            serving = self.api.startup_done.is_set() and not self.stopping.is_set()
            if serving:
                systemd.reloading()
            try:
                if self.reload_settings is None:
                    raise ConfigError("the daemon was started without a config to read again")
                return self._apply(self.reload_settings())
            except ConfigError as exc:
                log.error("config not reloaded, nothing changed: %s", exc)
                raise
            finally:
                if serving:
                    with self._notify_lock:
                        if not self.stopping.is_set():
                            self._tell_systemd(ready=True)

    def _apply(self, new: Settings) -> dict:
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
        self.restart_needed = needs_restart
        outcome = {"applied": applied, "needs_restart": needs_restart}
        log.info("config reloaded: applied %s; needs a restart: %s",
                 ", ".join(applied) or "nothing", ", ".join(needs_restart) or "nothing")
        if self.mqtt is not None:
            if "pipelines" in applied:
                self.mqtt.pipelines_changed()
            self.mqtt.reporter.event("config_reloaded", **outcome)
        return outcome

    def status_line(self) -> str:
        """One line for `systemctl status`: models, pipelines, broker, what needs attention."""
        served = sorted(self.manager.served().items())
        models = ", ".join(f"{name} {m.version} {m.selection.short}" for name, m in served)
        parts = [f"serving {len(served)} model{'' if len(served) == 1 else 's'}"
                 + (f" ({models})" if models else "")]
        if failed := sorted(self.manager.failures):
            parts.append(f"failed: {', '.join(failed)}")
        if configured := len(self.pipelines.settings):
            running, failures, finished = self.pipelines.counts()
            parts.append(f"{running} of {configured} pipelines running"
                         + (f", {failures} failed" if failures else "")
                         + (f", {finished} finished" if finished else ""))
        if self.mqtt is not None:
            parts.append("MQTT connected" if self.mqtt.link.connected.is_set() else "MQTT not connected")
        if self.api.socket_problem:
            parts.append(f"socket unreachable: {self.server.path}")
        if self.restart_needed:
            parts.append(f"restart needed for: {', '.join(self.restart_needed)}")
        if stuck := self.watchdog.stuck_for():
            parts.append(f"inference stuck for {stuck:.0f} s")
        return "; ".join(parts)

    def _tell_systemd(self, ready: bool = False, line: str | None = None) -> None:
        """READY=1 with the status line when asked; otherwise STATUS= only when the line changed.
        `line`: the status line, when already made."""
        line = self.status_line() if line is None else line
        if ready:
            systemd.ready(line)
        elif line != self._status:
            systemd.status(line)
        self._status = line


def configure_logging(level: str) -> None:
    """Structured entries when stderr is the journal, plain lines on stderr otherwise
    (the same set-up as edged-registry's, in systemd.py)."""
    systemd.configure_logging(level, "edged")
