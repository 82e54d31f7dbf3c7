"""Sections for serving models on the socket: [socket], [store], [backends], [models.<name>]
and [logging]."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edged.config.base import Section, default_cache_dir, default_data_dir, default_socket_path
from edged.config.devices import DelegateSettings, parse_device


class SocketSettings(Section):
    path: Path = Field(default_factory=default_socket_path, description="Unix socket the API listens on.")
    group: str | None = Field(default=None, description="Group that owns the socket (mode 0660).")
    allowed_users: list[str] = Field(
        default=[], description="If set, only these users (names or uids) may use the socket."
    )
    allowed_groups: list[str] = Field(
        default=[], description="If set, members of these groups (names or gids) may use the socket."
    )
    max_connections: int = Field(
        default=8192, ge=1, le=65_536,
        description="Open connections at most, idle ones included (an idle connection holds no thread).",
    )
    max_connections_per_uid: int = Field(
        default=2048, ge=1, le=65_536,
        description="Open connections at most from one user (peer uid); more get 503.",
    )
    workers: int = Field(
        default=16, ge=2, le=1024,
        description="Threads that serve requests, in turn across users; one user holds at most half of them.",
    )
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
    max_shm_regions_per_uid: int = Field(
        default=64, ge=0, le=4096,
        description="Shared-memory regions one user may register at once (0 turns the extension off).",
    )
    max_shm_bytes_per_uid: int = Field(
        default=1 << 30, ge=0, le=1 << 40,
        description="Total bytes of the shared-memory regions one user may register at once.",
    )


class StoreSettings(Section):
    path: Path = Field(
        default_factory=lambda: default_data_dir() / "models", description="Model store directory."
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, le=3600, description="How often the daemon looks for newly activated versions."
    )


class BackendSettings(Section):
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, le=256,
        description=(
            "Concurrent inferences per model on LiteRT (interpreters; one on a delegate). OpenVINO runs "
            "one at a time per model, recompiled after an error (its CPU graph keeps state across requests)."
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


class ModelSettings(Section):
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
    device: str | None = Field(
        default=None,
        description=(
            "OpenVINO device: CPU, GPU, GPU.1, NPU, AUTO, AUTO:GPU,CPU or HETERO:GPU,CPU. Unset: CPU "
            "with backend = openvino; with auto, every device OpenVINO finds (Core.available_devices), "
            "each probed. One that is absent is skipped with the reason and the next candidate tried."
        ),
    )
    delegate: DelegateSettings | None = Field(
        default=None,
        description=(
            "A LiteRT delegate (a Coral Edge TPU: library = \"libedgetpu.so.1\"). With backend = litert "
            "the model runs on it alone; with auto it is one more candidate beside LiteRT on the CPU."
        ),
    )
    reject_non_finite: bool = Field(
        default=True, description="Refuse inputs holding NaN or Infinity (OpenVINO turns NaN into 0)."
    )
    allowed_users: list[str] = Field(default=[], description="If set, only these users may use the model.")
    allowed_groups: list[str] = Field(default=[], description="If set, only these groups may use the model.")

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str | None) -> str | None:
        if value is not None:
            parse_device(value)
        return value

    @model_validator(mode="after")
    def _device_and_delegate_fit_the_backend(self) -> ModelSettings:
        if self.device is not None and self.backend == "litert":
            raise ValueError("device is an OpenVINO setting: with backend = \"litert\" use delegate, "
                             "or set backend = \"openvino\" or \"auto\"")
        if self.delegate is not None and self.backend == "openvino":
            raise ValueError("delegate is a LiteRT setting: with backend = \"openvino\" use device, "
                             "or set backend = \"litert\" or \"auto\"")
        return self


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
