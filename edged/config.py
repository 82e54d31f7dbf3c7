"""One settings tree for the whole daemon.

Sources, strongest first: command-line flags, `EDGED_<SECTION>__<KEY>`
environment variables, the TOML file (`--config`, else /etc/edged/edged.toml
when present), then the defaults written here. The TOML keys, the variables
and docs/configuration.md use the same names.
"""

from __future__ import annotations

import contextvars
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from edged.errors import EdgedError

DEFAULT_CONFIG = Path("/etc/edged/edged.toml")
# The parsed TOML file of the `load_settings` call in progress (a weaker source than the environment).
_file_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("edged_file", default=None)
# False while a client command (`edged models`, `predict`, ...) loads the settings: the rules
# about what the running daemon needs (updates need MQTT, ...) are not that command's business.
_for_daemon: contextvars.ContextVar[bool] = contextvars.ContextVar("edged_for_daemon", default=True)


class ConfigError(EdgedError):
    """The configuration cannot be used; the message names the field."""


def _is_root() -> bool:
    return os.geteuid() == 0


def _systemd_dir(variable: str) -> Path | None:
    """The directory systemd made for the service (RuntimeDirectory= and friends), if any."""
    value = os.environ.get(variable)
    return Path(value.split(":")[0]) if value else None


def default_socket_path() -> Path:
    if runtime := _systemd_dir("RUNTIME_DIRECTORY"):
        return runtime / "edged.sock"
    if _is_root():
        return Path("/run/edged/edged.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(f"/tmp/edged-{os.getuid()}")  # noqa: S108
    return base / "edged" / "edged.sock"


def default_data_dir() -> Path:
    if state := _systemd_dir("STATE_DIRECTORY"):
        return state
    if _is_root():
        return Path("/var/lib/edged")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edged"


def default_cache_dir() -> Path:
    if cache := _systemd_dir("CACHE_DIRECTORY"):
        return cache
    if _is_root():
        return Path("/var/cache/edged")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edged"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SocketSettings(_Section):
    path: Path = Field(default_factory=default_socket_path, description="Unix socket the API listens on.")
    group: str | None = Field(default=None, description="Group that owns the socket (mode 0660).")
    allowed_users: list[str] = Field(
        default=[], description="If set, only these users (names or uids) may use the socket."
    )
    allowed_groups: list[str] = Field(
        default=[], description="If set, members of these groups (names or gids) may use the socket."
    )
    max_connections: int = Field(default=64, ge=1, le=10_000, description="Open connections at most.")
    max_pending_requests: int = Field(
        default=64, ge=1, le=100_000,
        description="Requests running or waiting for a model at once; more get 503.",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="Time a client has to send one whole request."
    )
    idle_timeout_s: float = Field(
        default=120.0, gt=0, le=86_400, description="A keep-alive connection idle this long is closed."
    )
    max_json_bytes: int = Field(
        default=8 << 20, ge=1024, le=1 << 32,
        description="Largest JSON part of an infer request (413 beyond); big tensors go as binary.",
    )
    max_body_bytes: int = Field(
        default=64 << 20, ge=1024, le=1 << 32, description="Largest request body accepted (413 beyond)."
    )


class StoreSettings(_Section):
    path: Path = Field(
        default_factory=lambda: default_data_dir() / "models", description="Model store directory."
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, le=3600, description="How often the daemon looks for newly activated versions."
    )


class BackendSettings(_Section):
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, le=256,
        description=(
            "Concurrent inferences per model on LiteRT (interpreters). OpenVINO runs one at a time "
            "per model, recompiled after an error (its CPU graph keeps state across requests)."
        ),
    )
    litert_threads: int = Field(default=1, ge=1, le=256, description="Threads per LiteRT interpreter.")
    openvino_performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        default="LATENCY", description="OpenVINO CPU plugin performance hint."
    )
    openvino_threads: int = Field(
        default=0, ge=0, le=1024,
        description="CPU threads per OpenVINO inference (INFERENCE_NUM_THREADS); 0 lets OpenVINO decide.",
    )
    openvino_cache_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / "openvino",
        description="OpenVINO compiled-model cache; keeps restarts fast.",
    )
    probe_runs: int = Field(
        default=30, ge=1, le=10_000, description="Timed warm runs per backend when `backend = auto`."
    )
    fallback_after_errors: int = Field(
        default=3, ge=1, le=1000,
        description="Consecutive runtime errors before a model on `backend = auto` changes backend.",
    )
    fallback_retry_s: float = Field(
        default=300.0, gt=0, description="After a fallback, how long until the faster backend is tried again."
    )


class ModelSettings(_Section):
    backend: Literal["auto", "openvino", "litert"] = Field(
        default="auto", description="Backend for this model; auto probes and keeps the fastest."
    )
    precision: Literal["f32", "bf16", "f16"] = Field(
        default="f32",
        description=(
            "Inference precision on OpenVINO. f32 is exact; bf16/f16 are faster where the CPU supports "
            "them but give different numbers. LiteRT always runs a float model in f32."
        ),
    )
    reject_non_finite: bool = Field(
        default=True, description="Refuse inputs holding NaN or Infinity (OpenVINO turns NaN into 0)."
    )
    allowed_users: list[str] = Field(default=[], description="If set, only these users may use the model.")
    allowed_groups: list[str] = Field(default=[], description="If set, only these groups may use the model.")


SENSOR_KINDS = ("serial", "fifo", "file", "stdin", "iio", "mqtt")
LINE_KINDS = ("serial", "fifo", "file", "stdin", "mqtt")
SERIAL_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


class SourceSettings(_Section):
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


class SinkSettings(_Section):
    kind: Literal["jsonl", "mqtt"] = Field(
        default="jsonl",
        description=(
            "jsonl: one JSON result per line in a file; mqtt: each result to "
            "edged/devices/{id}/results/{pipeline} (QoS 1, kept in the outbox while the broker is away; "
            "needs mqtt.enabled)."
        ),
    )
    path: Path | None = Field(default=None, description="jsonl: the file results are appended to (required).")
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

    @model_validator(mode="after")
    def _kind_keys_agree(self) -> SinkSettings:
        def changed(*keys: str) -> list[str]:
            return [k for k in keys if getattr(self, k) != type(self).model_fields[k].default]

        if self.kind == "jsonl":
            if self.path is None:
                raise ValueError("path is required for kind = 'jsonl'")
            if wrong := changed("max_rate_hz", "on_change", "change_digits", "heartbeat_s"):
                raise ValueError(f"{', '.join(wrong)}: only for kind = 'mqtt'")
            return self
        if self.path is not None:
            raise ValueError("kind = 'mqtt' takes no path (results go to edged/devices/{id}/results/...)")
        if wrong := changed("max_bytes", "backups"):
            raise ValueError(f"{', '.join(wrong)}: only for kind = 'jsonl'")
        if not self.on_change and (wrong := changed("change_digits", "heartbeat_s")):
            raise ValueError(f"{', '.join(wrong)}: only with on_change = true")
        return self


class QualitySettings(_Section):
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


class PipelineSettings(_Section):
    model: str = Field(description="Name of the model in the store that sees the frames or windows.")
    source: SourceSettings = Field(description="Where frames or sensor samples come from.")
    sinks: list[SinkSettings] = Field(default=[], description="Where results go.")
    quality: QualitySettings = Field(
        default_factory=QualitySettings, description="When the input counts as degraded."
    )
    enabled: bool = Field(default=True, description="Start the pipeline with the daemon.")


DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_device_id() -> str:
    """The host name, cut to what a topic level may hold."""
    import socket

    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].strip("-.") or "edged"
    return name if DEVICE_ID.fullmatch(name) else "edged"


class MqttTlsSettings(_Section):
    enabled: bool = Field(
        default=False, description="Connect with TLS (the broker's certificate is checked)."
    )
    ca_file: Path | None = Field(
        default=None, description="CA certificates that sign the broker's; the system's when unset."
    )
    cert_file: Path | None = Field(default=None, description="Client certificate, for brokers that ask one.")
    key_file: Path | None = Field(default=None, description="Private key of the client certificate.")


class MqttSettings(_Section):
    enabled: bool = Field(
        default=False, description="Connect to a broker. Off by default: the socket API needs no broker."
    )
    host: str = Field(
        default="localhost", min_length=1, max_length=253, description="Broker host name or address."
    )
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    device_id: str = Field(
        default_factory=default_device_id,
        description="This device's name in topics (edged/devices/{id}/...) and its MQTT client id.",
    )
    topic_prefix: str = Field(
        default="edged", pattern=r"^[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64}){0,3}$",
        description="First level(s) of every topic.",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT version; commands reply through v5 response topics (3.1.1: see docs)."
    )
    username: str | None = Field(default=None, max_length=256, description="User name for the broker.")
    password: SecretStr | None = Field(
        default=None, description="Password for the broker; password_file keeps it out of the config."
    )
    password_file: Path | None = Field(
        default=None, description="File whose first line is the password (e.g. a systemd credential)."
    )
    tls: MqttTlsSettings = Field(default_factory=MqttTlsSettings, description="TLS to the broker.")
    keepalive_s: int = Field(
        default=30, ge=5, le=3600, description="Keepalive; the broker declares the Last Will after 1.5x this."
    )
    clean_start: bool = Field(
        default=True, description="Start a new session on connect (false keeps subscriptions on the broker)."
    )
    session_expiry_s: int = Field(
        default=0, ge=0, le=2**32 - 1, description="MQTT v5: how long the broker keeps a dropped session."
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, le=3600, description="First wait before reconnecting.")
    reconnect_max_s: float = Field(
        default=60.0, gt=0, le=86400, description="Longest wait between reconnects (jittered, doubling)."
    )
    health_interval_s: float = Field(
        default=30.0, ge=1, le=86400, description="Seconds between health reports."
    )
    outbox_path: Path = Field(
        default_factory=lambda: default_data_dir() / "outbox.db",
        description="Store-and-forward file for events, results and health while the broker is away.",
    )
    outbox_max_messages: int = Field(
        default=100_000, ge=100, le=10_000_000,
        description="Messages the outbox holds before dropping (health first, events last).",
    )
    outbox_max_bytes: int = Field(
        default=64 << 20, ge=1 << 20, le=1 << 36, description="Bytes the outbox holds before dropping."
    )
    commands: bool = Field(default=True, description="Accept commands on edged/devices/{id}/cmd.")
    command_senders: list[str] = Field(
        default=[],
        description=(
            "If set, only commands whose user property 'sender' names one of these client ids are run. "
            "A hint only: the broker's ACL is the real gate."
        ),
    )
    reply_topic_prefix: str = Field(
        default="{topic_prefix}/replies/", max_length=256, pattern=r"^[^#+$/\x00][^#+\x00]*/$",
        description=(
            "Command replies go only to response topics under this prefix (ending in '/'; "
            "{topic_prefix} is replaced) or to the device's own .../replies; a command naming any "
            "other response topic is refused, not run, and answered on .../replies."
        ),
    )

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not DEVICE_ID.fullmatch(value):
            raise ValueError("a device id is 1-64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit")
        return value


class UpdateSettings(_Section):
    enabled: bool = Field(
        default=False,
        description="Follow the registry's signed releases and install them (needs [mqtt], public_keys).",
    )
    public_keys: list[str] = Field(
        default=[], max_length=16,
        description="Registry public keys trusted to sign releases (base64, from `edged-registry keygen`).",
    )
    group: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="The rollout group this device belongs to (edged/registry/groups/{group}/...).",
    )
    models: list[str] = Field(
        default=[], description="Models to follow; empty: every model the registry publishes."
    )
    max_model_bytes: int = Field(
        default=512 << 20, ge=1 << 10, le=1 << 40, description="Largest model (all its files) accepted."
    )
    chunk_bytes: int = Field(
        default=1 << 20, ge=4 << 10, le=64 << 20,
        description="Chunk size asked of the registry; kept below the broker's packet limit.",
    )
    window: int = Field(default=8, ge=1, le=256, description="Chunk requests in flight at once.")
    chunk_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="A chunk with no reply in this time is asked again."
    )
    chunk_retries: int = Field(default=5, ge=0, le=100, description="Retries of a chunk before giving up.")
    retry_min_s: float = Field(
        default=30.0, gt=0, le=86400,
        description=(
            "First wait before a failed release, or one refused for lack of disk, is tried again; "
            "doubles each time."
        ),
    )
    retry_max_s: float = Field(
        default=3600.0, gt=0, le=604800, description="Longest wait between tries of a failed release."
    )
    retry_jitter: float = Field(
        default=0.2, ge=0, le=1,
        description=(
            "Each wait is shortened by up to this fraction at random, so a fleet does not retry at once."
        ),
    )
    disk_poll_s: float = Field(
        default=5.0, gt=0, le=3600,
        description=(
            "How often free space is checked for a release waiting for disk; it is retried once freed."
        ),
    )
    probation_s: float = Field(
        default=60.0, ge=0, le=86400,
        description="After activation, how long errors and the self-test are watched before keeping it.",
    )
    probation_max_errors: int = Field(
        default=3, ge=1, le=1_000_000, description="Inference errors during probation that cause a rollback."
    )
    keep_versions: int = Field(default=3, ge=2, le=100, description="Versions kept per model (for rollback).")
    download_dir: Path = Field(
        default_factory=lambda: default_data_dir() / "downloads",
        description="Where chunks of a download in progress are kept (resumed after a restart).",
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        from edged.models.manifest import check_name

        for name in value:
            check_name(name)
        return value

    @field_validator("public_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        from edged.signing import SignatureError, load_public_key

        for index, text in enumerate(value):
            try:
                load_public_key(text)
            except SignatureError as exc:
                raise ValueError(f"key {index + 1}: {exc}") from None
        return value


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")


class TomlSettings(BaseSettings):
    """Settings whose TOML file (read by `load_toml_settings`) is weaker than the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, InitSettingsSource(settings_cls, _file_data.get() or {}))


class Settings(TomlSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGED_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    socket: SocketSettings = Field(default_factory=SocketSettings, description="The local API socket.")
    store: StoreSettings = Field(default_factory=StoreSettings, description="The model store.")
    backends: BackendSettings = Field(default_factory=BackendSettings, description="Inference runtimes.")
    models: dict[str, ModelSettings] = Field(
        default={}, description="Per-model settings, keyed by model name ([models.face])."
    )
    pipelines: dict[str, PipelineSettings] = Field(
        default={}, description="Continuous inference pipelines, keyed by name ([pipelines.door])."
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="The link to an MQTT broker.")
    updates: UpdateSettings = Field(
        default_factory=UpdateSettings, description="Model updates from the registry, over MQTT."
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")

    @field_validator("models", "pipelines")
    @classmethod
    def _model_names(cls, value: dict) -> dict:
        from edged.models.manifest import check_name

        for name in value:
            check_name(name)
        return value

    @model_validator(mode="after")
    def _updates_need_mqtt_and_keys(self) -> Settings:
        if not _for_daemon.get():
            return self
        if self.updates.enabled and not self.mqtt.enabled:
            raise ValueError("updates.enabled needs mqtt.enabled: releases arrive over MQTT")
        if self.updates.enabled and not self.updates.public_keys:
            raise ValueError("updates.enabled needs updates.public_keys (from `edged-registry keygen`)")
        return self

    @model_validator(mode="after")
    def _mqtt_pipelines_need_mqtt(self) -> Settings:
        if self.mqtt.enabled or not _for_daemon.get():
            return self
        for name, pipeline in self.pipelines.items():
            if pipeline.source.kind == "mqtt":
                raise ValueError(f"pipeline {name!r} reads its source over MQTT: it needs mqtt.enabled")
            if any(sink.kind == "mqtt" for sink in pipeline.sinks):
                raise ValueError(f"pipeline {name!r} publishes results over MQTT: it needs mqtt.enabled")
        return self

    def model(self, name: str) -> ModelSettings:
        return self.models.get(name) or ModelSettings()

def load_settings(path: Path | None = None, for_daemon: bool = True, **overrides: Any) -> Settings:
    """Build the daemon's settings; raise ConfigError naming the field or file line at fault.
    `for_daemon=False` (client commands) skips the rules about what a running daemon needs."""
    token = _for_daemon.set(for_daemon)
    try:
        return load_toml_settings(Settings, path, DEFAULT_CONFIG, "EDGED_", "configuration", **overrides)
    finally:
        _for_daemon.reset(token)


_T = TypeVar("_T", bound=TomlSettings)


def load_toml_settings(cls: type[_T], path: Path | None, default_path: Path, env_prefix: str,
                       what: str, **overrides: Any) -> _T:
    """`cls` from `path` (else `default_path` when present), the environment and `overrides`."""
    if path is None and default_path.exists():
        path = default_path
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    token = _file_data.set(data)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid {what}: " + _describe(exc, path, env_prefix)) from None
    except (ValueError, EdgedError) as exc:  # e.g. an environment variable that is not valid JSON
        first = str(exc).splitlines()[0]
        env = re.search(r'field "(\w+)" from source "EnvSettingsSource"', first)
        if env:
            annotation = getattr(cls.model_fields.get(env.group(1)), "annotation", None)
            nested = typing.get_origin(annotation) is dict or (
                isinstance(annotation, type) and issubclass(annotation, BaseModel))
            variable = f"{env_prefix}{env.group(1).upper()}{'__*' if nested else ''}"
            first = (f"the {variable} environment variable cannot be parsed "
                     f"(lists and tables are JSON, e.g. '[\"alice\"]')")
        raise ConfigError(f"invalid {what}: {first}") from None
    finally:
        _file_data.reset(token)


def _describe(exc: ValidationError, path: Path | None, env_prefix: str) -> str:
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across sections: its message names the keys
            parts.append(err["msg"].removeprefix("Value error, "))
            continue
        field = ".".join(str(p) for p in err["loc"])
        env = env_prefix + "__".join(str(p).upper() for p in err["loc"])
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
        parts.append(f"{field}: {err['msg']}{shown} [set in {path or 'defaults'} or {env}]")
    return "; ".join(parts)
