"""A paho-mqtt client set up from `[mqtt]` settings: shared by the daemon's link and the registry."""

from __future__ import annotations

import contextlib
import socket
import ssl

import paho.mqtt.client as mqtt

from edged.config import ConfigError, MqttSettings


def build_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """A paho 2.x client with the protocol, credentials and TLS of `settings`; not connected."""
    v5 = settings.protocol == "5"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         clean_session=None if v5 else settings.clean_start)
    password = settings.password.get_secret_value() if settings.password else None
    if settings.password_file is not None:
        try:
            lines = settings.password_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {settings.password_file}: {exc}") from None
        password = lines[0] if lines else ""
    if settings.username is not None or password is not None:
        client.username_pw_set(settings.username or "", password)
    if settings.tls.enabled:
        tls = settings.tls
        try:
            client.tls_set(ca_certs=str(tls.ca_file) if tls.ca_file else None,
                           certfile=str(tls.cert_file) if tls.cert_file else None,
                           keyfile=str(tls.key_file) if tls.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls: cannot load the certificates: {exc}") from None
    return client


def no_delay(client: mqtt.Client) -> None:
    """Send each packet at once: with Nagle's algorithm a small message written right after
    another waits for the peer's delayed ACK (~40 ms per chunk request or event)."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
