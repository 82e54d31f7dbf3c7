"""[pipelines.<name>]: a pipeline, its sinks and its input quality rules (the source is in
sources.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edged.config.base import Section
from edged.config.sources import SourceSettings


class SinkSettings(Section):
    kind: Literal["jsonl", "mqtt", "snapshot"] = Field(
        default="jsonl",
        description=(
            "jsonl: one JSON result per line in a file; mqtt: each result to "
            "edged/devices/{id}/results/{pipeline} (QoS 1, kept in the outbox while the broker is away; "
            "needs mqtt.enabled); snapshot: the newest frame in which something was detected, annotated, "
            "as a JPEG in a directory (latest.jpg and a bounded history) and, with mqtt.enabled, "
            "retained on edged/devices/{id}/snapshots/{pipeline} (docs/snapshots.md)."
        ),
    )
    path: Path | None = Field(
        default=None,
        description=(
            "jsonl: the file results are appended to (required); snapshot: the directory for latest.jpg "
            "and the history (optional with mqtt.enabled: then snapshots go to MQTT only)."
        ),
    )
    max_bytes: int = Field(default=10 << 20, ge=4096, description="jsonl: size at which the file is rotated.")
    backups: int = Field(
        default=3, ge=0, le=100, description="jsonl: rotated files kept (path.1, path.2, ...)."
    )
    max_rate_hz: float = Field(
        default=0.0, ge=0, le=1000,
        description="mqtt: results published per second at most, the rest dropped (counted); 0: all.",
    )
    on_change: bool = Field(
        default=False,
        description=(
            "mqtt: publish a result only when it differs from the last one published "
            "(its frame or window number and time aside)."
        ),
    )
    change_digits: int = Field(
        default=2, ge=0, le=9,
        description=(
            "mqtt, on_change: numbers closer than 10^-change_digits count as unchanged "
            "(2: box jitter under 1% of the frame, score changes under 0.01)."
        ),
    )
    heartbeat_s: float = Field(
        default=0.0, ge=0, le=86400,
        description="mqtt, on_change: publish an unchanged result after this long without one; 0: never.",
    )
    history: int = Field(
        default=10, ge=0, le=1000,
        description=("snapshot: the newest snapshots kept as files named by their UTC time, beside "
                     "latest.jpg (a second name for the newest); 0: latest.jpg only."),
    )
    min_interval_s: float = Field(
        default=1.0, ge=0.1, le=86400,
        description="snapshot: seconds between two snapshots at least; frames in between are not drawn.",
    )
    jpeg_quality: int = Field(default=85, ge=40, le=100, description="snapshot: JPEG quality (40-100).")
    max_jpeg_bytes: int = Field(
        default=512 << 10, ge=16 << 10, le=16 << 20,
        description="snapshot: a JPEG's size at most; a larger one is encoded again at a lower quality, "
                    "then smaller.",
    )
    max_side: int = Field(
        default=1280, ge=64, le=8192,
        description="snapshot: the picture's longer side in pixels at most; larger frames are scaled down.",
    )
    min_score: float = Field(
        default=0.5, ge=0, le=1,
        description="snapshot: a detection or class scoring this or more counts as something detected.",
    )
    min_coverage: float = Field(
        default=0.01, ge=0, le=1,
        description="snapshot: a segmentation mask covering this share of the frame or more counts as "
                    "something detected.",
    )
    labels: list[str] = Field(
        default=[], max_length=1000,
        description="snapshot, classifiers: only these labels count as something detected; empty: any.",
    )

    @model_validator(mode="after")
    def _kind_keys_agree(self) -> SinkSettings:
        def changed(*keys: str) -> list[str]:
            return [k for k in keys if getattr(self, k) != type(self).model_fields[k].default]

        mqtt_keys = ("max_rate_hz", "on_change", "change_digits", "heartbeat_s")
        jsonl_keys = ("max_bytes", "backups")
        snapshot_keys = ("history", "min_interval_s", "jpeg_quality", "max_jpeg_bytes", "max_side",
                         "min_score", "min_coverage", "labels")
        if self.kind == "snapshot":
            if wrong := changed(*mqtt_keys, *jsonl_keys):
                raise ValueError(f"{', '.join(wrong)}: not for kind = 'snapshot'")
            return self
        if wrong := changed(*snapshot_keys):
            raise ValueError(f"{', '.join(wrong)}: only for kind = 'snapshot'")
        if self.kind == "jsonl":
            if self.path is None:
                raise ValueError("path is required for kind = 'jsonl'")
            if wrong := changed(*mqtt_keys):
                raise ValueError(f"{', '.join(wrong)}: only for kind = 'mqtt'")
            return self
        if self.path is not None:
            raise ValueError("kind = 'mqtt' takes no path (results go to edged/devices/{id}/results/...)")
        if wrong := changed(*jsonl_keys):
            raise ValueError(f"{', '.join(wrong)}: only for kind = 'jsonl'")
        if not self.on_change and (wrong := changed("change_digits", "heartbeat_s")):
            raise ValueError(f"{', '.join(wrong)}: only with on_change = true")
        return self


class QualitySettings(Section):
    frozen_after_s: float = Field(
        default=10.0, gt=0, description="The same picture this long makes the pipeline degraded."
    )
    frozen_tolerance: int = Field(
        default=2, ge=0, le=255, description="Grey-level change below which two frames count as the same."
    )
    dark_below: float = Field(default=8.0, ge=0, le=255, description="Mean grey level counted as black.")
    bright_above: float = Field(
        default=247.0, ge=0, le=255, description="Mean grey level counted as saturated."
    )
    for_s: float = Field(
        default=2.0, ge=0, description="How long black or saturated frames last before degraded."
    )
    stuck_after_s: float = Field(
        default=60.0, ge=0,
        description="Sensors: every channel unchanged this long makes the pipeline degraded; 0: never.",
    )
    stuck_tolerance: float = Field(
        default=0.0, ge=0, description="Sensors: a change this small or smaller counts as unchanged."
    )


class PipelineSettings(Section):
    model: str = Field(description="Name of the model in the store that sees the frames or windows.")
    source: SourceSettings = Field(description="Where frames or sensor samples come from.")
    sinks: list[SinkSettings] = Field(default=[], description="Where results go.")
    quality: QualitySettings = Field(
        default_factory=QualitySettings, description="When the input counts as degraded."
    )
    enabled: bool = Field(default=True, description="Start the pipeline with the daemon.")

    @model_validator(mode="after")
    def _snapshots_need_pictures(self) -> PipelineSettings:
        if self.source.is_sensor and any(sink.kind == "snapshot" for sink in self.sinks):
            raise ValueError("a sink of kind = 'snapshot' draws on pictures; a sensor source has none")
        return self
