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
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
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
        description="Concurrent inferences per model (OpenVINO infer requests, LiteRT interpreters).",
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


class SourceSettings(_Section):
    kind: Literal["camera", "images"] = Field(
        default="camera",
        description="camera: anything OpenCV opens (V4L2 device, stream URL, video file); images: a folder.",
    )
    uri: str = Field(
        min_length=1, max_length=4096,
        description="/dev/videoN or a device index, an rtsp:// or http:// URL, a video file, or a folder.",
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


class SinkSettings(_Section):
    kind: Literal["jsonl"] = Field(default="jsonl", description="jsonl: one JSON result per line in a file.")
    path: Path = Field(description="The file results are appended to.")
    max_bytes: int = Field(default=10 << 20, ge=4096, description="Size at which the file is rotated.")
    backups: int = Field(default=3, ge=0, le=100, description="Rotated files kept (path.1, path.2, ...).")


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


class PipelineSettings(_Section):
    model: str = Field(description="Name of the model in the store that sees the frames.")
    source: SourceSettings = Field(description="Where frames come from.")
    sinks: list[SinkSettings] = Field(default=[], description="Where results go.")
    quality: QualitySettings = Field(
        default_factory=QualitySettings, description="When the input counts as degraded."
    )
    enabled: bool = Field(default=True, description="Start the pipeline with the daemon.")


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")


class Settings(BaseSettings):
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
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")

    @field_validator("models", "pipelines")
    @classmethod
    def _model_names(cls, value: dict) -> dict:
        from edged.models.manifest import check_name

        for name in value:
            check_name(name)
        return value

    def model(self, name: str) -> ModelSettings:
        return self.models.get(name) or ModelSettings()

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


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; raise ConfigError naming the field or file line at fault."""
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
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
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except (ValueError, EdgedError) as exc:  # e.g. an environment variable that is not valid JSON
        first = str(exc).splitlines()[0]
        env = re.search(r'field "(\w+)" from source "EnvSettingsSource"', first)
        if env:
            first = (f"an EDGED_{env.group(1).upper()}__* environment variable cannot be parsed "
                     f"(lists and tables are JSON, e.g. '[\"alice\"]')")
        raise ConfigError(f"invalid configuration: {first}") from None
    finally:
        _file_data.reset(token)


def _describe(exc: ValidationError, path: Path | None) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        env = "EDGED_" + "__".join(str(p).upper() for p in err["loc"])
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
        parts.append(f"{field}: {err['msg']}{shown} [set in {path or 'defaults'} or {env}]")
    return "invalid configuration: " + "; ".join(parts)
