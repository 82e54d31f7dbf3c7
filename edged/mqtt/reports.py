"""What the fleet sees of this device: health reports, events and the retained state.

- health: the health document (edged/health.py) every `health_interval_s`, and on demand;
- events: model loaded/failed/activated/rolled back, model skipped (a backend that
  crashed the daemon in an earlier start), backend fallback, pipeline source
  lost/recovered, input degraded/recovered, config reloaded; each with a sequence
  number that keeps growing across restarts (kept in the outbox file), so a consumer
  can drop the duplicates QoS 1 allows;
- state: per model the desired version (from the registry) and the active one, its
  sha256, backend, whether it is degraded, and the last update of it that failed (until
  its active version changes); and the device's update group. Retained, and sent only
  when it changes (and again on every connect, for a broker that lost its retained
  messages): a registry that restarts reads from it what events it missed said.

All of it goes through the outbox, so a broker outage delays it and loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any

from edged.health import Health
from edged.models.lifecycle import Loaded, ModelEvent
from edged.models.manager import ModelManager
from edged.models.store import version_key
from edged.mqtt.link import MqttLink
from edged.pipelines.group import Pipelines

log = logging.getLogger(__name__)
# A pipeline moving into (or out of) these states is an event.
# Update events that put a failure into the state document (docs/updates.md).
FAILURE_EVENTS = frozenset({"update_failed", "update_refused", "update_rolled_back"})
PIPELINE_EVENTS = {"reconnecting": ("source_lost", "source_recovered"),
                   "degraded": ("input_degraded", "input_recovered"),
                   "failed": ("pipeline_failed", "pipeline_recovered")}


class Reporter:
    def __init__(self, link: MqttLink, health: Health, manager: ModelManager,
                 pipelines: Pipelines | None, interval_s: float, group: str | None = None) -> None:
        self.link = link
        self.health = health
        self.manager = manager
        self.pipelines = pipelines
        self.interval_s = interval_s
        self.group = group  # updates.group: the registry's rollouts read it from the state
        self._desired: dict[str, str] = {}  # model -> version the registry wants (the update agent says)
        # model -> (its last failed update, the version active when it failed)
        self._failures: dict[str, tuple[dict[str, Any], str | None]] = {}
        self._failures_lock = threading.Lock()
        self._reporting = False  # model events are reported between start() and stop()
        self._last_state = ""
        self._pipeline_states: dict[str, str] = {}
        self._health_now = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-reports", daemon=True)

    def start(self) -> None:
        self._reporting = True
        self.link.on_connected.append(self._on_connected)
        self._pipeline_states = self._current_pipeline_states()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._health_now.set()
        if self._thread.is_alive():  # not when stopped before it started
            self._thread.join(timeout=5)
        self._reporting = False

    # --- the three kinds of message -----------------------------------------------------
    def event(self, kind: str, **data: Any) -> int:
        """Queue one event; returns its sequence number. A failed update also goes into
        the retained state (events are not retained)."""
        sequence = self.link.outbox.next_sequence("events")
        now = time.time()
        self.link.put("event", self.link.topics.events, {
            "seq": sequence, "time": round(now, 6), "device": self.link.settings.device_id,
            "kind": kind, **data,
        })
        if kind in FAILURE_EVENTS and isinstance(data.get("model"), str):
            self._record_failure(kind, data, now)
        return sequence

    def _record_failure(self, kind: str, data: dict[str, Any], now: float) -> None:
        served = self.manager.served().get(data["model"])
        failure = {"version": data.get("version"), "kind": kind, "reason": data.get("reason", ""),
                   "at": round(now, 3)}
        with self._failures_lock:
            self._failures[data["model"]] = (failure, served.version if served is not None else None)
        self.publish_state()

    def _failure(self, name: str, active: str | None) -> dict[str, Any] | None:
        """The last failed update of `name`, forgotten once its active version changed."""
        with self._failures_lock:
            failure, active_then = self._failures.get(name, (None, None))
            if failure is not None and active != active_then:
                del self._failures[name]
                return None
            return failure

    def request_health(self) -> None:
        """Send a health report now (from the reporting thread)."""
        self._health_now.set()

    def publish_health(self) -> None:
        document = self.health.document()
        document["device"] = self.link.settings.device_id
        self.link.put("health", self.link.topics.health, document)

    def publish_state(self, force: bool = False) -> None:
        document = self.state_document()
        text = json.dumps(document, sort_keys=True)
        if text == self._last_state and not force:
            return
        self._last_state = text
        self.link.put("state", self.link.topics.state, document, retain=True, replace=True)

    def set_desired(self, name: str, version: str | None) -> None:
        """The version of `name` the registry wants (None: it withdrew its release), shown in
        the retained state; a new wish is published at once."""
        if version is None:
            self._desired.pop(name, None)
            return
        self._desired[name] = version
        self.publish_state()

    def state_document(self) -> dict[str, Any]:
        models: dict[str, dict[str, Any]] = {}
        served = self.manager.served()
        with self._failures_lock:
            failed = set(self._failures)
        for name in sorted(set(served) | set(self.manager.failures) | set(self._desired) | failed):
            model = served.get(name)
            entry: dict[str, Any] = {"desired": self._desired.get(name), "active": None}
            if model is not None:
                entry.update(active=model.version, sha256=model_digest(model.manifest.files),
                             backend=model.selection.backend)
            error = self.manager.failures.get(name)
            fallback = model is not None and model.selection.reason.startswith("fallback")
            entry["degraded"] = model is None or bool(error) or fallback
            if error or fallback:
                entry["reason"] = error or model.selection.reason  # type: ignore[union-attr]
            entry["failure"] = self._failure(name, entry["active"])
            models[name] = entry
        return {"device": self.link.settings.device_id, "group": self.group, "models": models}

    # --- sources of events --------------------------------------------------------------
    def on_model_event(self, event: ModelEvent) -> None:
        """The model manager's hooks (ModelEvents): every load, failure, swap, fallback and
        skip is an event."""
        if not self._reporting:
            return
        self.event(event.kind, **event.as_dict())
        if isinstance(event, Loaded) and event.previous and event.previous != event.version:
            rolled_back = version_key(event.version) < version_key(event.previous)
            self.event("model_rolled_back" if rolled_back else "model_activated", model=event.model,
                       version=event.version, previous=event.previous)
        self.publish_state()

    def _on_connected(self) -> None:
        self.publish_state(force=True)
        self.request_health()

    def _current_pipeline_states(self) -> dict[str, str]:
        if self.pipelines is None:
            return {}
        return {name: info["state"] for name, info in self.pipelines.status().items()}

    def _check_pipelines(self) -> None:
        if self.pipelines is None:
            return
        statuses = self.pipelines.status()
        for name, info in statuses.items():
            before, now = self._pipeline_states.get(name, "stopped"), info["state"]
            self._pipeline_states[name] = now
            if before == now:
                continue
            if now == "reconnecting" and before in ("stopped", "starting"):
                continue  # a source still opening, not one that was lost
            if now in PIPELINE_EVENTS:
                self.event(PIPELINE_EVENTS[now][0], pipeline=name, state=now,
                           reason=info.get("degraded_reason") or info.get("last_error", ""))
            elif before in PIPELINE_EVENTS and now == "running":
                self.event(PIPELINE_EVENTS[before][1], pipeline=name, state=now)

    def _run(self) -> None:
        next_health = time.monotonic() + self.interval_s  # the first report goes out on connect
        while not self._stop.is_set():
            try:
                self._check_pipelines()
                self.publish_state()
                if time.monotonic() >= next_health or self._health_now.is_set():
                    self._health_now.clear()
                    self.publish_health()
                    next_health = time.monotonic() + self.interval_s
            except Exception:  # reporting must never stop; the next round tries again
                log.exception("MQTT reporting failed")
            self._health_now.wait(min(1.0, max(0.0, next_health - time.monotonic())))


def model_digest(files: list) -> str:
    """The sha256 of a one-file model, or of its sorted `name sha256` lines when it has several."""
    if len(files) == 1:
        return files[0].sha256
    lines = "".join(f"{f.name} {f.sha256}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()
