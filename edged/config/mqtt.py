"""[mqtt]: the link to a broker; edged-registry uses the same section."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from edged.config.base import Section, default_data_dir

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_device_id() -> str:
    """The host name, cut to what a topic level may hold."""
    import socket

    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].strip("-.") or "edged"
    return name if DEVICE_ID.fullmatch(name) else "edged"


class MqttTlsSettings(Section):
    enabled: bool = Field(
        default=False, description="Connect with TLS (the broker's certificate is checked)."
    )
    ca_file: Path | None = Field(
        default=None, description="CA certificates that sign the broker's; the system's when unset."
    )
    cert_file: Path | None = Field(default=None, description="Client certificate, for brokers that ask one.")
    key_file: Path | None = Field(default=None, description="Private key of the client certificate.")


class MqttSettings(Section):
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
