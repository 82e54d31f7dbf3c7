"""[updates]: signed model releases from the registry, over MQTT."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from edged.config.base import Section, default_data_dir


class UpdateSettings(Section):
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
        description="After activation, how long errors and the self-test are watched before keeping it; its "
        "files are checked by stat each second and hashed in full once at the end.",
    )
    probation_max_errors: int = Field(
        default=3, ge=1, le=1_000_000, description="Inference errors during probation that cause a rollback."
    )
    pin_confirm_s: float = Field(
        default=10.0, gt=0, le=600,
        description="After each (re)connect, how long a model pinned by its device release waits for "
        "that release to be retained again (it comes right after the subscription) before taking it "
        "as withdrawn while the device was offline, and following the other releases again.",
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
