"""Keeps Home Assistant's retained discovery configs for this device true to the daemon.

Configs are derived state: `refresh()` builds the whole set (entities.py) from the
pipelines' config and the models the manager knows, and publishes what changed, retained,
outside the outbox (on every connect everything is published again, so nothing needs to
wait out a broker outage on disk). What is gone gets an empty retained config, which
makes Home Assistant remove the entity:

- while connected, a pipeline or model that disappears (config reload, a model removed)
  is cleared at once, from the difference with what this connection published;
- whatever is retained on the broker from before (a pipeline removed while edged was
  stopped or the broker away) arrives on the subscription to this node's config topics
  with the retain flag set: any such config that is not wanted now is cleared. No wait,
  no record file: the broker's retained messages are the record.

Home Assistant's own birth message (`<prefix>/status` = `online`) publishes everything
again, for a broker that kept no retained messages.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edged.config import PipelineSettings, Settings
from edged.errors import EdgedError
from edged.models.manager import ModelManager
from edged.mqtt.homeassistant.entities import (
    MAX_CONFIG_BYTES,
    QUOTABLE,
    SINK_ENTITIES,
    Catalogue,
    Entity,
)
from edged.mqtt.link import MqttLink

log = logging.getLogger(__name__)


class Discovery:
    def __init__(self, settings: Settings, link: MqttLink, manager: ModelManager,
                 pipelines: Callable[[], dict[str, PipelineSettings]]) -> None:
        """`pipelines`: the pipelines' current config (it changes at a reload)."""
        self.catalogue = Catalogue(settings.homeassistant, settings.mqtt)
        self.link = link
        self.manager = manager
        self.pipelines = pipelines
        self.birth_topic = f"{settings.homeassistant.discovery_prefix}/status"
        self._published: dict[str, bytes] = {}  # topic -> config, on this connection
        self._said: set[str] = set()  # "why no entities" lines already logged, said once each
        self.cleared = 0  # stale configs cleared (removed entities)
        self._lock = threading.Lock()

    def start(self) -> None:
        self.link.subscribe(self.catalogue.config_filter, self._on_config)
        self.link.subscribe(self.birth_topic, self._on_birth)
        self.link.on_connected.append(self.republish)

    # --- what should be there -----------------------------------------------------------
    def wanted(self) -> dict[str, bytes]:
        """Every config this device should have retained now: `{topic: payload}`."""
        entities: list[Entity] = []
        for name, pipeline in sorted(self.pipelines().items()):
            entities += self._pipeline_entities(name, pipeline)
        for name in sorted(self.manager.status()):
            if QUOTABLE.fullmatch(name):  # always, for a name the store accepted
                entities += self.catalogue.model_entities(name)
        configs: dict[str, bytes] = {}
        for entity in entities:
            topic, payload = self.catalogue.topic(entity), self.catalogue.config(entity)
            if topic in configs:  # e.g. pipelines "a.b" and "a_b": one object id
                self._say(topic, f"Home Assistant: two entities would share {topic}; the second is left out")
            elif len(payload) > MAX_CONFIG_BYTES:
                self._say(topic, f"Home Assistant: the config for {topic} is {len(payload)} bytes, "
                                 f"over {MAX_CONFIG_BYTES}; left out")
            else:
                configs[topic] = payload
        return configs

    def _pipeline_entities(self, name: str, pipeline: PipelineSettings) -> list[Entity]:
        if not any(sink.kind in SINK_ENTITIES for sink in pipeline.sinks):
            self._say(f"pipeline {name}", f"Home Assistant: pipeline {name} has no sink of kind "
                                          f"{' or '.join(SINK_ENTITIES)}, so no entities (nothing of it "
                                          "reaches the broker)")
            return []
        decoder = self._decoder(pipeline.model)
        entities = self.catalogue.pipeline_entities(name, pipeline, decoder)
        if not entities:
            self._say(f"pipeline {name} {decoder}",
                      f"Home Assistant: pipeline {name}'s model {pipeline.model} has "
                      + (f"decoder {decoder!r}" if decoder else "no decoder (raw outputs)")
                      + ", which no entity reads; no entities for it")
        return entities

    def _decoder(self, model: str) -> str | None:
        """The decoder type of the model's served version, or else of its active version in the
        store (a model that failed to load keeps its entities)."""
        served = self.manager.served().get(model)
        try:
            if served is not None:
                manifest = served.manifest
            elif (version := self.manager.store.active(model)) is not None:
                manifest = self.manager.store.manifest(model, version)
            else:
                return None
        except EdgedError:
            return None  # not in the store: the pipeline says so itself
        return (manifest.decoder or {}).get("type")

    # --- publishing ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Publish what changed since the last refresh on this connection; clear what is gone.
        Called when the pipelines or the models change; does nothing while disconnected (the
        next connect publishes everything)."""
        with self._lock:
            if not self.link.connected.is_set():
                return
            wanted = self.wanted()
            problems = [self._clear(topic) for topic in self._published.keys() - wanted.keys()]
            problems += [self.link.publish_retained(topic, payload) for topic, payload in wanted.items()
                         if self._published.get(topic) != payload]
            self._published = wanted
        if failed := [p for p in problems if p]:
            log.warning("Home Assistant: %d discovery messages not sent (%s); all go again on the "
                        "next connect", len(failed), failed[0])

    def republish(self) -> None:
        """Every config again (a new connection; Home Assistant came online)."""
        with self._lock:
            self._published = {}
        self.refresh()
        log.info("Home Assistant: published %d discovery configs under %s/",
                 len(self._published), self.catalogue.prefix)

    def _clear(self, topic: str) -> str:
        """An empty retained config: Home Assistant removes the entity. '' or why not sent."""
        problem = self.link.publish_retained(topic, b"")
        if not problem:
            self.cleared += 1
            log.info("Home Assistant: removed %s (its pipeline or model is gone)", topic)
        return problem

    # --- the subscriptions (paho's thread) ----------------------------------------------
    def _on_config(self, message: mqtt.MQTTMessage) -> None:
        """A retained config of this node from before: cleared unless still wanted. Live
        copies of our own publishing come without the retain flag and are left alone."""
        if not message.retain or not message.payload:
            return
        if not self.catalogue.config_pattern.fullmatch(message.topic):
            return  # a component edged never publishes: not ours to clear
        with self._lock:
            if message.topic in self._published or message.topic in self.wanted():
                return
            problem = self._clear(message.topic)
        if problem:  # the connection went meanwhile: the next one gets the retained copy again
            log.warning("Home Assistant: could not remove %s (%s); trying on the next connect",
                        message.topic, problem)

    def _on_birth(self, message: mqtt.MQTTMessage) -> None:
        if message.payload == b"online":
            self.republish()

    # --- reporting ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"enabled": True, "node_id": self.catalogue.node_id, "entities": len(self._published),
                    "cleared": self.cleared}

    def _say(self, key: str, line: str) -> None:
        """One log line per situation, not one per refresh."""
        if key not in self._said:
            self._said.add(key)
            log.info("%s", line)
