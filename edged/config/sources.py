"""[pipelines.<name>.source]: where a pipeline's frames or sensor samples come from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edged.config.base import Section

SENSOR_KINDS = ("serial", "fifo", "file", "stdin", "iio", "mqtt")
LINE_KINDS = ("serial", "fifo", "file", "stdin", "mqtt")
SERIAL_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


class SourceSettings(Section):
    kind: Literal["camera", "images", "serial", "fifo", "file", "stdin", "iio", "mqtt"] = Field(
        default="camera",
        description=(
            "camera: anything OpenCV opens (V4L2 device, stream URL, video file); images: a folder; "
            "serial, fifo, file (followed like `tail -F`), stdin: sensor samples as CSV or JSON lines; "
            "iio: the channels of a Linux IIO device; mqtt: CSV or JSON lines in the messages of an "
            "MQTT topic (needs mqtt.enabled)."
        ),
    )
    uri: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description=(
            "/dev/videoN or a device index, an rtsp:// or http:// URL, a video file, or a folder; "
            "for sensors the serial device, FIFO or file, the IIO device (`iio:device0` or its name), "
            "or for mqtt the topic filter (`sensors/+/vibration`; not starting with `$`). "
            "Required for every kind but stdin."
        ),
    )
    loop: bool = Field(default=False, description="Start a video file or an image folder again at its end.")
    realtime: bool = Field(
        default=False,
        description=(
            "Play a video file at its own frame rate and drop frames like a live camera; "
            "otherwise every frame is read as fast as the pipeline takes it."
        ),
    )
    read_timeout_s: float = Field(
        default=5.0, gt=0, le=600, description="A stream that delivers nothing this long is reopened."
    )
    reopen_backoff_s: float = Field(
        default=1.0, gt=0, le=3600, description="First wait before reopening a lost source; doubles to 30 s."
    )
    format: Literal["csv", "jsonl"] = Field(
        default="csv",
        description="Sensor lines: comma-separated numbers, or one JSON list of numbers or object per line.",
    )
    fields: list[str] = Field(
        default=[], description="jsonl: the object keys read as channels, in order; empty: lines are lists."
    )
    columns: list[int] = Field(
        default=[], description=(
            "csv: the columns read as channels (0 is the first), in order; empty: every column, "
            "and a line must then hold exactly `channels` values (1 unless set)."
        ),
    )
    channels: int = Field(
        default=0, ge=0, le=4096,
        description=(
            "Values per sensor sample; 0: as many as `fields`, `columns` or `iio_channels` name "
            "(every channel the IIO device has), else 1."
        ),
    )
    window: int = Field(
        default=1, ge=1, le=100_000, description="Sensor samples per model input (the window, N)."
    )
    stride: int = Field(
        default=1, ge=1, le=100_000,
        description="New samples between two windows once the first is full; `window` for no overlap.",
    )
    baud: int = Field(default=115200, description="serial: bits per second (9600, 115200, ...).")
    from_start: bool = Field(
        default=False, description="file: read what the file already holds, not only what is appended."
    )
    iio_channels: list[str] = Field(
        default=[],
        description=(
            "iio: channels to read, e.g. `in_temp`, `in_voltage0` (from their `_input` or `_raw` "
            "file); empty: every input channel, in name order."
        ),
    )
    sample_rate_hz: float = Field(
        default=10.0, gt=0, le=1000, description="iio: how often the channels are read."
    )
    iio_base_dir: Path = Field(
        default=Path("/sys/bus/iio/devices"), description="iio: where the kernel lists IIO devices."
    )

    @property
    def is_sensor(self) -> bool:
        return self.kind in SENSOR_KINDS

    @property
    def sample_channels(self) -> int:
        """Values per sample; 0 for an IIO device whose channels are found when it is opened."""
        named = self.fields or self.columns or self.iio_channels
        if self.channels or named:
            return self.channels or len(named)
        return 0 if self.kind == "iio" else 1

    @model_validator(mode="after")
    def _sensor_keys_agree(self) -> SourceSettings:
        if self.kind != "stdin" and self.uri is None:
            raise ValueError(f"uri is required for kind = {self.kind!r}")
        if self.kind == "stdin" and self.uri is not None:
            raise ValueError("kind = 'stdin' takes no uri")
        if self.fields and self.format != "jsonl":
            raise ValueError("fields are for format = 'jsonl'; csv takes columns")
        if self.columns and self.format != "csv":
            raise ValueError("columns are for format = 'csv'; jsonl takes fields")
        if any(column < 0 for column in self.columns):
            raise ValueError("columns count from 0 and cannot be negative")
        named = self.fields or self.columns or self.iio_channels
        if self.channels and named and self.channels != len(named):
            raise ValueError(f"channels = {self.channels} but {len(named)} fields, columns or iio_channels")
        if self.kind == "serial" and self.baud not in SERIAL_RATES:
            raise ValueError(f"baud {self.baud} is not one of {', '.join(map(str, SERIAL_RATES))}")
        if self.kind == "mqtt":
            _check_topic_filter(str(self.uri))
        return self


def _check_topic_filter(text: str) -> None:
    """An MQTT topic filter a client may subscribe to (MQTT 5, 4.7), minus the broker's `$` topics."""
    if text.startswith("$"):
        raise ValueError(f"topic filter {text!r}: topics starting with '$' are the broker's")
    if "\0" in text:
        raise ValueError(f"topic filter {text!r}: holds a NUL character")
    levels = text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"topic filter {text!r}: '#' must be a whole level, the last one")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {text!r}: '+' must be a whole level")
