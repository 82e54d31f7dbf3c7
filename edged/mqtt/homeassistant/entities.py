"""What Home Assistant is told about this device: the retained discovery configs.

Each config follows Home Assistant's MQTT discovery schema (docs/homeassistant.md cites the
pages): it goes to `<prefix>/<component>/<node_id>/<object_id>/config`, names the one
device this edged instance is, and is available while edged's retained `status` says
`online` (its Last Will says `offline`). State topics are edged's own: a pipeline's
results, the retained state document, the health document; the value templates read
the fields edged puts there. Nothing here publishes: `discovery.py` does.

Entities per pipeline come from `SINK_ENTITIES`, keyed by sink kind, and for the `mqtt`
sink from `DECODER_ENTITIES`, keyed by the model's decoder type. A new sink kind that
Home Assistant should show is one function and one entry, as the snapshot sink's `image`
entity is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edged import __version__, strict_json
from edged.config import HomeAssistantSettings, MqttSettings, PipelineSettings
from edged.topics import Topics

COMPONENTS = ("binary_sensor", "sensor", "image")  # the only ones edged publishes, and sweeps
QUOTABLE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a name safe inside a template's '...' string
MAX_CONFIG_BYTES = 8 << 10  # one config; ours are under 1 KiB


@dataclass(frozen=True)
class Entity:
    """One entity: its component (`sensor`, ...), its object id (unique on this device) and
    the keys of its own (name, state topic, value template, units)."""

    component: str
    object_id: str
    keys: dict[str, Any]


def node_id(device_id: str) -> str:
    """The device id as a discovery topic level may hold it (`.` becomes `_`)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", device_id)[:64]


def object_id(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9_-]", "_", part) for part in parts)


# --- per pipeline -----------------------------------------------------------------------
def detector_entities(pipeline: str, results: str) -> list[Entity]:
    """A detector's results: `detections`, each with a `score`."""
    return [
        Entity("binary_sensor", object_id("pipeline", pipeline, "detected"), {
            "name": f"{pipeline} detected", "state_topic": results,
            "value_template": "{{ 'ON' if value_json.detections | length > 0 else 'OFF' }}",
            "payload_on": "ON", "payload_off": "OFF"}),
        Entity("sensor", object_id("pipeline", pipeline, "count"), {
            "name": f"{pipeline} count", "state_topic": results, "state_class": "measurement",
            "value_template": "{{ value_json.detections | length }}"}),
        Entity("sensor", object_id("pipeline", pipeline, "best_score"), {
            "name": f"{pipeline} best score", "state_topic": results, "state_class": "measurement",
            "suggested_display_precision": 2,
            "value_template": "{{ value_json.detections | map(attribute='score') | max | default(0) }}"}),
    ]


def segmentation_entities(pipeline: str, results: str) -> list[Entity]:
    """A mask's `coverage`, a fraction of the frame, shown in percent."""
    return [Entity("sensor", object_id("pipeline", pipeline, "coverage"), {
        "name": f"{pipeline} coverage", "state_topic": results, "state_class": "measurement",
        "unit_of_measurement": "%", "suggested_display_precision": 1,
        "value_template": "{{ (value_json.coverage * 100) | round(2) }}"})]


def classifier_entities(pipeline: str, results: str) -> list[Entity]:
    """The top class's label (`classes` is sorted best first; `None` is Home Assistant's unknown)."""
    return [Entity("sensor", object_id("pipeline", pipeline, "label"), {
        "name": f"{pipeline} label", "state_topic": results,
        "value_template": "{{ value_json.classes[0].label if value_json.classes else None }}"})]


DECODER_ENTITIES: dict[str, Callable[[str, str], list[Entity]]] = {
    "blazeface": detector_entities,
    "segmentation": segmentation_entities,
    "classification": classifier_entities,
}


def results_entities(pipeline: str, decoder: str | None, topics: Topics) -> list[Entity]:
    """An `mqtt` sink's entities: what its model's decoder puts in each result."""
    build = DECODER_ENTITIES.get(decoder or "")
    return build(pipeline, topics.results(pipeline)) if build else []


def snapshot_entities(pipeline: str, decoder: str | None, topics: Topics) -> list[Entity]:
    """A snapshot sink's newest annotated frame (retained JPEG bytes), as an `image` entity."""
    return [Entity("image", object_id("pipeline", pipeline, "snapshot"), {
        "name": f"{pipeline} snapshot", "image_topic": topics.snapshots(pipeline),
        "content_type": "image/jpeg"})]


# sink kind -> its entities, given the pipeline's name, its model's decoder type and the topics
SINK_ENTITIES: dict[str, Callable[[str, str | None, Topics], list[Entity]]] = {
    "mqtt": results_entities,
    "snapshot": snapshot_entities,
}


# --- per model --------------------------------------------------------------------------
def model_entities(model: str, topics: Topics) -> list[Entity]:
    """Diagnostics: the active version (retained state document) and the clients' p95 latency
    (health document, every mqtt.health_interval_s)."""
    entry = f"value_json.models.get('{model}', {{}})"
    return [
        Entity("sensor", object_id("model", model, "version"), {
            "name": f"{model} version", "state_topic": topics.state, "entity_category": "diagnostic",
            "value_template": f"{{{{ {entry}.get('active') }}}}"}),
        Entity("sensor", object_id("model", model, "latency_p95"), {
            "name": f"{model} p95 latency", "state_topic": topics.health, "entity_category": "diagnostic",
            "device_class": "duration", "unit_of_measurement": "ms", "state_class": "measurement",
            "suggested_display_precision": 1,
            "value_template": f"{{{{ {entry}.get('latency', {{}}).get('p95_ms') }}}}"}),
    ]


# --- the configs ------------------------------------------------------------------------
class Catalogue:
    """Builds every discovery config of this device: `{topic: payload}`."""

    def __init__(self, settings: HomeAssistantSettings, mqtt: MqttSettings) -> None:
        self.prefix = settings.discovery_prefix
        self.node_id = node_id(mqtt.device_id)
        self.topics = Topics(mqtt.topic_prefix, mqtt.device_id)
        self.device = {"identifiers": [f"edged_{self.node_id}"],
                       "name": settings.device_name or mqtt.device_id,
                       "manufacturer": "edged", "model": "edged", "sw_version": __version__}
        self.origin = {"name": "edged", "sw_version": __version__}
        self.availability = {"availability_topic": self.topics.status,
                             "availability_template": "{{ value_json.state }}",
                             "payload_available": "online", "payload_not_available": "offline"}
        # Our own config topics, and no one else's: what the sweep may clear.
        self.config_pattern = re.compile(
            re.escape(f"{self.prefix}/") + f"({'|'.join(COMPONENTS)})"
            + re.escape(f"/{self.node_id}/") + r"[A-Za-z0-9_-]{1,200}/config")

    @property
    def config_filter(self) -> str:
        """Every discovery config of this node, whatever the component."""
        return f"{self.prefix}/+/{self.node_id}/+/config"

    def topic(self, entity: Entity) -> str:
        return f"{self.prefix}/{entity.component}/{self.node_id}/{entity.object_id}/config"

    def pipeline_entities(self, name: str, pipeline: PipelineSettings, decoder: str | None) -> list[Entity]:
        """What each of its sinks shows: nothing for a pipeline without a sink Home Assistant reads."""
        entities: list[Entity] = []
        for kind in dict.fromkeys(sink.kind for sink in pipeline.sinks):  # each kind once
            if build := SINK_ENTITIES.get(kind):
                entities += build(name, decoder, self.topics)
        return entities

    def model_entities(self, name: str) -> list[Entity]:
        return model_entities(name, self.topics)

    def config(self, entity: Entity) -> bytes:
        """The config's JSON: the entity's keys, its ids, the device, origin and availability."""
        return strict_json.dumpb({
            **entity.keys, "unique_id": f"edged_{self.node_id}_{entity.object_id}",
            **self.availability, "device": self.device, "origin": self.origin,
        })
