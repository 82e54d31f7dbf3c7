"""Where pipeline results go: the configured sinks, built by `build_sinks`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from edged.config import SinkSettings

if TYPE_CHECKING:
    from edged.pipelines.annotate import Seen
    from edged.pipelines.mqtt_port import SharedPort


class Sink(Protocol):
    def write(self, result: dict) -> None: ...

    def close(self) -> None: ...


class ConfiguredSink(Sink, Protocol):
    kind: str
    problem: str  # why it fails now (the pipeline is then `degraded`), or ''

    def details(self) -> dict:
        """Its counters, for the pipeline's status."""
        ...


class FrameSink(ConfiguredSink, Protocol):
    """A sink that also needs the frame behind each result (it draws on it): marked by
    `wants_frames`, so the runner gathers what `Seen` holds only when one is configured."""

    wants_frames: bool

    def write_frame(self, result: dict, seen: Seen) -> None: ...


def wants_frames(sink: Sink) -> bool:
    return getattr(sink, "wants_frames", False)


def build_sinks(settings: list[SinkSettings], pipeline: str,
                mqtt: SharedPort | None = None) -> list[ConfiguredSink]:
    """The sinks a pipeline's config names; ValueError (or OSError) when one cannot work."""
    from edged.pipelines.sinks.jsonl import JsonlSink
    from edged.pipelines.sinks.mqtt import MqttSink
    from edged.pipelines.sinks.snapshot import SnapshotSink

    sinks: list[ConfiguredSink] = []
    try:
        for sink in settings:
            if sink.kind == "mqtt":
                if mqtt is None:
                    raise ValueError("a sink of kind = 'mqtt' needs mqtt.enabled (and a daemon restarted "
                                     "with it)")
                sinks.append(MqttSink(sink, pipeline, mqtt))
            elif sink.kind == "snapshot":
                sinks.append(SnapshotSink(sink, pipeline, mqtt))
            else:
                sinks.append(JsonlSink(sink, pipeline))
    except BaseException:
        for built in sinks:  # no file left open by a pipeline that does not start
            built.close()
        raise
    return sinks
