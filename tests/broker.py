"""A real Mosquitto broker per test, and a paho client that records what it receives.

Every broker listens on 127.0.0.1 only, on a free port of its own, with a config, log,
password/ACL files and certificates generated in its own directory: tests never touch a
shared broker and never depend on the machine's mosquitto.conf.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import hashlib
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

HOST = "127.0.0.1"
MODES = ("anonymous", "password", "tls")

# The test user is always on a password-mode broker: the fixtures' own clients and the
# start-up probe connect as it, whatever users a test asks for.
TEST_USER = "tester"
TEST_USER_ACL = ["readwrite #"]
# The other users unless a test names its own: the daemon, and a guest that may only read
# device status.
DEFAULT_ACL: dict[str, list[str]] = {
    "edged": ["readwrite edged/#"],
    "guest": ["read edged/devices/+/status"],
}


class MosquittoMissing(RuntimeError):
    """The mosquitto binary is not installed."""


def find_mosquitto() -> str:
    """The mosquitto binary; a clear error when it is missing (tools/setup.sh installs it)."""
    path = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise MosquittoMissing("mosquitto is not installed: the MQTT tests need a real broker "
                           "(tools/setup.sh installs it; or `apt-get install mosquitto`)")
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def password_hash(password: str) -> str:
    """Mosquitto 2.0's `$7$` format (PBKDF2-SHA512), the same as `mosquitto_passwd` writes,
    without a subprocess per user."""
    salt = os.urandom(12)
    iterations = 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# --- certificates -------------------------------------------------------------------------

def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
                 issuer_key: ec.EllipticCurvePrivateKey | None,
                 extensions: Iterable[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer or name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=30)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_certificates(directory: Path, client_name: str = "tester") -> dict[str, Path]:
    """A fresh CA, a server certificate for 127.0.0.1/localhost and a client certificate,
    as PEM files in `directory`.

    Keys: ca, ca_key, server_cert, server_key, client_cert, client_key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("edged test CA", ca_key, None, None, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ])

    def leaf(name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ca.subject, ca_key, [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
            (x509.SubjectAlternativeName(san), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ])
        return cert, key

    server, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                              [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))])
    client, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName(client_name)])

    paths = {name: directory / f"{name}.pem" for name in
             ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")}
    for name, cert in (("ca", ca), ("server_cert", server), ("client_cert", client)):
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for name, key in (("ca_key", ca_key), ("server_key", server_key), ("client_key", client_key)):
        _write_key(paths[name], key)
    return paths


# --- the broker ----------------------------------------------------------------------------

class ConnectFailed(Exception):
    """A client could not connect: refused in the CONNACK (`reason_code` set) or the
    connection failed or dropped before any CONNACK (`reason_code` None)."""

    def __init__(self, message: str, reason_code: ReasonCode | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


def _die_with_parent() -> None:
    """Runs in the broker's child process: SIGTERM it if pytest dies, so no stray broker is
    left holding a port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Broker:
    """One mosquitto process on 127.0.0.1:`port`, in `directory`.

    mode: "anonymous" (anyone), "password" (no anonymous; see below), "tls" (anonymous over
    TLS with certificates made here; `require_certificate` asks clients for one signed by
    `ca_file`).
    Password mode: `users` (name -> password) and `acl` (name -> rules such as
    "read edged/#"). Neither given: users edged and guest with DEFAULT_ACL. Users without
    an acl: each may read and write everything. The test user (TEST_USER, "readwrite #")
    is added to either unless named; `users` ends up holding every password.
    The port is chosen once and kept by restart(); persistence is off unless asked, so a
    restarted broker forgets retained messages and sessions. With persistence on, mosquitto
    saves on stop() (SIGTERM), not on kill().
    max_packet_size / message_size_limit: mosquitto's options of those names. extra_config:
    lines added at the end of the config (after the listener, so listener options apply).
    verbose: log every packet.
    acl_text: Mosquitto ACL lines written verbatim after the generated `user` blocks (password
    mode), e.g. `pattern` lines or an operator's ACL file as documented; its users' passwords
    go in `users`.
    """

    def __init__(self, directory: Path, mode: str = "anonymous", *,
                 users: dict[str, str] | None = None,
                 acl: dict[str, list[str]] | None = None,
                 require_certificate: bool = False,
                 persistence: bool = False,
                 max_packet_size: int | None = None,
                 message_size_limit: int | None = None,
                 extra_config: str = "",
                 verbose: bool = False,
                 acl_text: str = "") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if acl_text and mode != "password":
            raise ValueError("acl_text needs mode='password'")
        self.binary = find_mosquitto()
        self.host = HOST
        self.port = free_port()
        self.mode = mode
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.config_file = directory / "mosquitto.conf"
        self.log_file = directory / "mosquitto.log"
        self.persistence = persistence
        self.persistence_file = directory / "mosquitto.db"
        self.require_certificate = require_certificate
        self.users: dict[str, str] = {}
        self.acl: dict[str, list[str]] = {}
        self.ca_file: Path | None = None
        self.client_cert_file: Path | None = None
        self.client_key_file: Path | None = None
        self.certificates: dict[str, Path] = {}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

        lines = ["# written by tests/broker.py for one test broker",
                 # Security settings are global (one listener), as in mosquitto 2.0's default.
                 "per_listener_settings false",
                 # As root, mosquitto would switch to the `mosquitto` user, which cannot read
                 # this directory; naming the current user keeps it as it is.
                 f"user {pwd.getpwuid(os.getuid()).pw_name}",
                 f"persistence {str(persistence).lower()}",
                 "log_dest stderr",
                 "log_timestamp true",
                 "log_timestamp_format %H:%M:%S",
                 "connection_messages true",
                 # As docs/mqtt.md recommends: small messages are not held back by Nagle.
                 "set_tcp_nodelay true"]
        log_types = ["all"] if verbose else ["error", "warning", "notice", "information",
                                             "subscribe", "unsubscribe"]
        lines += [f"log_type {kind}" for kind in log_types]
        if persistence:
            lines += [f"persistence_location {directory}/", f"persistence_file {self.persistence_file.name}"]
        if max_packet_size is not None:
            lines.append(f"max_packet_size {max_packet_size}")
        if message_size_limit is not None:
            lines.append(f"message_size_limit {message_size_limit}")

        if mode == "password":
            if acl is None:
                acl = DEFAULT_ACL if users is None else {name: ["readwrite #"] for name in users}
            self.acl = {TEST_USER: TEST_USER_ACL} | {name: list(rules) for name, rules in acl.items()}
            users = {name: secrets.token_urlsafe(12) for name in self.acl} | dict(users or {})
            self.users = users
            password_file = directory / "passwd"
            password_file.write_text("".join(f"{name}:{password_hash(pw)}\n" for name, pw in users.items()))
            password_file.chmod(0o600)
            acl_file = directory / "acl"
            acl_file.write_text("".join(f"user {name}\n" + "".join(f"topic {rule}\n" for rule in rules) + "\n"
                                        for name, rules in self.acl.items()) + acl_text)
            lines += ["allow_anonymous false", f"password_file {password_file}", f"acl_file {acl_file}"]
        else:
            lines.append("allow_anonymous true")

        # Only ever loopback: the address is part of the listener line.
        lines.append(f"listener {self.port} {HOST}")
        if mode == "tls":
            self.certificates = make_certificates(directory / "certs")
            self.ca_file = self.certificates["ca"]
            self.client_cert_file = self.certificates["client_cert"]
            self.client_key_file = self.certificates["client_key"]
            lines += [f"cafile {self.ca_file}",
                      f"certfile {self.certificates['server_cert']}",
                      f"keyfile {self.certificates['server_key']}",
                      f"require_certificate {str(require_certificate).lower()}"]
        if extra_config:
            lines.append(extra_config.strip())
        self.config_file.write_text("\n".join(lines) + "\n")

    def __repr__(self) -> str:
        return f"<Broker {self.mode} {self.host}:{self.port} {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def credentials(self, user: str | None = None) -> tuple[str | None, str | None]:
        """(username, password) a client should use: `user`, or the test user in password mode."""
        if self.mode != "password":
            return (user, None)
        user = user or TEST_USER
        return (user, self.users.get(user))

    def log(self, tail: int | None = None) -> str:
        """The broker's log (every start appended), or its last `tail` lines."""
        if not self.log_file.exists():
            return ""
        text = self.log_file.read_text(errors="replace")
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def start(self, timeout: float = 10.0) -> Broker:
        """Run mosquitto and return once it accepts an MQTT connection."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self.starts += 1
        with self.log_file.open("ab") as log:
            log.write(f"--- tests/broker.py: start #{self.starts} on {HOST}:{self.port} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config_file)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        problem = "no TCP connection"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode} on start "
                                   f"(port {self.port}):\n{self.log()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    pass
            except OSError as exc:
                problem = f"TCP connect: {exc}"
                time.sleep(0.01)
                continue
            try:
                self._probe(max(0.1, deadline - time.monotonic()))
                return self
            except ConnectFailed as exc:
                problem = f"MQTT connect: {exc}"
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections within {timeout} s ({problem}):\n"
                           f"{self.log()}")

    def _probe(self, timeout: float) -> None:
        """One real MQTT connect and clean disconnect, as the tests' clients will do."""
        client = new_client(self, f"probe-{uuid.uuid4().hex[:8]}")
        outcome: list[ReasonCode] = []
        client.on_connect = lambda _c, _u, _f, reason, _p: outcome.append(reason)
        try:
            try:
                client.connect(self.host, self.port, keepalive=10)
            except (OSError, ValueError) as exc:
                _close_sockets_of(exc)
                raise ConnectFailed(repr(exc)) from exc
            deadline = time.monotonic() + min(timeout, 2.0)
            while not outcome and time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise ConnectFailed("mosquitto exited (something else answered on its port?)")
                if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    raise ConnectFailed("connection dropped before CONNACK")
            if not outcome:
                raise ConnectFailed("no CONNACK")
            if outcome[0].is_failure:
                raise ConnectFailed(f"refused: {outcome[0]}", outcome[0])
            client.disconnect()
        finally:
            client._reset_sockets()  # close now rather than when garbage collected

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves persistence and tells clients), then wait; SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, with no clean goodbye to clients and nothing saved."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = 10.0) -> Broker:
        """stop() then start(), on the same port."""
        self.stop()
        return self.start(timeout)


# --- a client that records -------------------------------------------------------------------

def new_client(broker: Broker, client_id: str, *, username: str | None = None, password: str | None = None,
               anonymous: bool = False, protocol: int = mqtt.MQTTv5, tls: bool | None = None,
               client_cert: bool = True, ca_file: Path | None = None) -> mqtt.Client:
    """A paho 2.x client set up for `broker`'s mode: its credentials, its CA and client certificate.

    In password mode the user defaults to the test user and the password to the user's own;
    anonymous=True sends no credentials. tls=None means "TLS if the broker is in tls mode";
    tls=False forces plain TCP.
    """
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if not anonymous and (username is not None or broker.mode == "password"):
        user, own_password = broker.credentials(username)
        client.username_pw_set(user, password if password is not None else own_password)
    use_tls = broker.mode == "tls" if tls is None else tls
    if use_tls:
        with_cert = client_cert and broker.client_cert_file is not None
        ca_file = ca_file or broker.ca_file  # None: the system's CAs
        client.tls_set(ca_certs=str(ca_file) if ca_file else None,
                       certfile=str(broker.client_cert_file) if with_cert else None,
                       keyfile=str(broker.client_key_file) if with_cert else None)
    return client


@dataclass(frozen=True)
class Message:
    """One received PUBLISH, as plain data."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None = None
    received_at: float = field(default_factory=time.monotonic)
    dup: bool = False  # the broker sent it again (an unacknowledged delivery to this client)

    def _property(self, name: str) -> Any:
        return getattr(self.properties, name, None) if self.properties is not None else None

    @property
    def correlation_data(self) -> bytes | None:
        return self._property("CorrelationData")

    @property
    def response_topic(self) -> str | None:
        return self._property("ResponseTopic")

    @property
    def content_type(self) -> str | None:
        return self._property("ContentType")

    @property
    def user_properties(self) -> list[tuple[str, str]]:
        return list(self._property("UserProperty") or [])

    @property
    def message_expiry_interval(self) -> int | None:
        return self._property("MessageExpiryInterval")

    def text(self) -> str:
        return self.payload.decode()

    def json(self) -> Any:
        return json.loads(self.payload)

    def __str__(self) -> str:
        payload = self.payload[:120]
        more = "..." if len(self.payload) > 120 else ""
        return f"{self.topic} qos={self.qos} retain={self.retain} {payload!r}{more}"


def publish_properties(*, response_topic: str | None = None, correlation_data: bytes | None = None,
                       user_properties: Iterable[tuple[str, str]] | None = None,
                       content_type: str | None = None,
                       message_expiry_interval: int | None = None) -> Properties | None:
    """MQTT v5 PUBLISH properties from keyword arguments (None when there are none)."""
    props = Properties(PacketTypes.PUBLISH)
    values = {"ResponseTopic": response_topic, "CorrelationData": correlation_data,
              "ContentType": content_type, "MessageExpiryInterval": message_expiry_interval}
    given = False
    for name, value in values.items():
        if value is not None:
            setattr(props, name, value)
            given = True
    for pair in user_properties or ():
        props.UserProperty = tuple(pair)  # paho appends each one
        given = True
    return props if given else None


def _close_sockets_of(exc: BaseException) -> None:
    """Close the sockets a failed connect() left in its frames.

    paho drops the TLS socket without closing it when the handshake fails (e.g. an unknown
    CA); its ResourceWarning would fail the test that expected the failure.
    """
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


def _matches(topic_filter: str | None, topic: str) -> bool:
    return topic_filter is None or mqtt.topic_matches_sub(topic_filter, topic)


class Subscriber:
    """A connected paho client that records every message it receives, thread-safely.

    It subscribes to `topics` (a filter or a list) and re-subscribes after every reconnect,
    so it keeps watching across a broker restart (reconnect within ~0.5 s). The waits raise
    AssertionError with what was received and the broker's log tail.
    """

    def __init__(self, broker: Broker, topics: str | Iterable[str] | None = "#", *, qos: int = 1,
                 client_id: str | None = None, username: str | None = None, password: str | None = None,
                 anonymous: bool = False, protocol: int = mqtt.MQTTv5, tls: bool | None = None,
                 client_cert: bool = True, ca_file: Path | None = None, timeout: float = 10.0,
                 keep_session: bool = False) -> None:
        self.broker = broker
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:10]}"
        self.qos = qos
        self.protocol = protocol
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._filters: list[str] = []
        self._pending: set[int] = set()
        self._acks: dict[int, ReasonCode | None] = {}
        self._connack: ReasonCode | None = None
        self._connected = False
        self._dropped: str | None = None
        self.connects = 0
        self.disconnects: list[ReasonCode] = []

        self.client = new_client(broker, self.client_id, username=username, password=password,
                                 anonymous=anonymous, protocol=protocol, tls=tls, client_cert=client_cert,
                                 ca_file=ca_file)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._filters = [topics] if isinstance(topics, str) else list(topics or [])

        try:
            # A new session on every (re)connect: what it watches is exactly `topics`. (v3.1.1
            # clients have clean_session=True from mqtt.Client already.)
            # With keep_session (v5), the broker keeps the subscription and queues QoS 1 messages
            # while this client is away: nothing is missed across a broker restart with persistence.
            session: dict[str, Any] = {"clean_start": True} if protocol == mqtt.MQTTv5 else {}
            if keep_session and protocol == mqtt.MQTTv5:
                expiry = Properties(PacketTypes.CONNECT)
                expiry.SessionExpiryInterval = 3600
                session = {"clean_start": False, "properties": expiry}
            self.client.connect(broker.host, broker.port, keepalive=30, **session)
        except (OSError, ValueError) as exc:  # refused, TLS handshake failed, ...
            _close_sockets_of(exc)
            self.client._reset_sockets()
            raise ConnectFailed(f"cannot connect to {broker!r}: {exc!r}") from exc
        self.client.loop_start()
        with self._cond:
            done = self._cond.wait_for(lambda: self._connack is not None or self._dropped is not None,
                                       timeout)
        if not done or not self._connected:
            reason = self._connack
            self.close()
            if reason is not None and reason.is_failure:
                raise ConnectFailed(f"{broker!r} refused {self.client_id}: {reason}", reason)
            raise ConnectFailed(f"no CONNACK from {broker!r} ({self._dropped or 'timeout'})\n"
                                f"{broker.log(tail=10)}")
        self.wait_connected(timeout)

    # paho callbacks (network thread)

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode,
                    _props: Properties | None) -> None:
        with self._cond:
            self._connack = reason
            self._connected = not reason.is_failure
            if self._connected:
                self.connects += 1
                # Network thread: paho only queues the packet, so holding the lock is safe.
                for topic_filter in self._filters:
                    self._pending.add(self._send_subscribe(topic_filter))
            self._cond.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode,
                       _props: Properties | None) -> None:
        with self._cond:
            self._connected = False
            self._dropped = str(reason)
            self.disconnects.append(reason)
            self._pending.clear()
            self._cond.notify_all()

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[ReasonCode],
                      _props: Properties | None) -> None:
        with self._cond:
            self._pending.discard(mid)
            self._acks[mid] = reasons[0] if reasons else None
            self._cond.notify_all()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                          getattr(msg, "properties", None), dup=bool(msg.dup))
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode,
                    _props: Properties | None) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def _send_subscribe(self, topic_filter: str) -> int:
        result, mid = self.client.subscribe(topic_filter, qos=self.qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise AssertionError(f"subscribe {topic_filter!r} failed: {mqtt.error_string(result)}")
        return mid

    # the test's side

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    def wait_connected(self, timeout: float = 10.0, *, connects: int = 1) -> None:
        """Until connected, `connects` times in all, with every subscription acknowledged.

        After a broker restart, wait_connected(connects=previous + 1) waits for the new connection
        even if the client has not noticed the old one is gone yet.
        """
        with self._cond:
            if not self._cond.wait_for(
                    lambda: self._connected and self.connects >= connects and not self._pending, timeout):
                raise AssertionError(f"{self.client_id} not connected and subscribed after {timeout} s "
                                     f"({self.connects} of {connects} connects; last drop: {self._dropped})\n"
                                     f"{self.broker.log(tail=15)}")

    def wait_disconnected(self, timeout: float = 10.0) -> None:
        """Until the client has noticed the connection is gone (e.g. after broker.stop())."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._connected, timeout):
                raise AssertionError(f"{self.client_id} still connected after {timeout} s")

    def subscribe(self, topic_filter: str, timeout: float = 5.0) -> ReasonCode | None:
        """Subscribe (also after reconnects) and wait for the SUBACK; returns its reason code
        (a failure such as "Not authorized" is returned, not raised)."""
        with self._cond:
            if topic_filter not in self._filters:
                self._filters.append(topic_filter)
        mid = self._send_subscribe(topic_filter)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, timeout):
                raise AssertionError(f"no SUBACK for {topic_filter!r} within {timeout} s")
            return self._acks[mid]

    def messages(self, topic: str | None = None) -> list[Message]:
        """What was received so far, oldest first; `topic` may be a filter with + and #."""
        with self._cond:
            return [m for m in self._messages if _matches(topic, m.topic)]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def _received_summary(self) -> str:
        shown = [str(m) for m in self._messages[-20:]]
        return "\n  ".join(shown) if shown else "(nothing)"

    def wait_for(self, predicate: Callable[[Message], bool] | None = None, timeout: float = 5.0, *,
                 topic: str | None = None) -> Message:
        """The first message so far or to come that is on `topic` (a filter) and satisfies `predicate`."""
        def found() -> Message | None:
            return next((m for m in self._messages
                         if _matches(topic, m.topic) and (predicate is None or predicate(m))), None)

        with self._cond:
            if self._cond.wait_for(lambda: found() is not None, timeout):
                return found()
            raise AssertionError(f"{self.client_id}: no message on {topic or 'any topic'} matching the "
                                 f"predicate within {timeout} s; received:\n  {self._received_summary()}"
                                 f"\nbroker log tail:\n{self.broker.log(tail=10)}")

    def wait_count(self, n: int, timeout: float = 5.0, *, topic: str | None = None) -> list[Message]:
        """The first `n` messages on `topic` (a filter), once at least that many arrived."""
        with self._cond:
            def matching() -> list[Message]:
                return [m for m in self._messages if _matches(topic, m.topic)]

            if self._cond.wait_for(lambda: len(matching()) >= n, timeout):
                return matching()[:n]
            raise AssertionError(f"{self.client_id}: {len(matching())} of {n} messages on "
                                 f"{topic or 'any topic'} within {timeout} s; received:\n  "
                                 f"{self._received_summary()}")

    def publish(self, topic: str, payload: bytes | str | dict | list | None = b"", qos: int = 1,
                retain: bool = False, properties: Properties | None = None, *,
                timeout: float = 5.0, **props: Any) -> ReasonCode | None:
        """Publish and wait until sent (qos 0) or acknowledged; returns the PUBACK/PUBCOMP
        reason code (None for qos 0). dict/list payloads are sent as JSON; `props` are
        publish_properties() keywords."""
        if isinstance(payload, dict | list):
            payload = json.dumps(payload)
        if props:
            if properties is not None:
                raise ValueError("give properties or keyword properties, not both")
            properties = publish_properties(**props)
        with self._cond:
            drops = len(self.disconnects)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        with self._cond:
            # on_publish runs for qos 0 too (once written), so one wait covers every qos.
            self._cond.wait_for(lambda: info.mid in self._acks or len(self.disconnects) > drops, timeout)
            if info.mid in self._acks:
                return self._acks[info.mid] if qos > 0 else None
            if len(self.disconnects) > drops:
                raise AssertionError(f"connection dropped while publishing to {topic}: "
                                     f"{self.disconnects[drops]}")
            raise AssertionError(f"publish to {topic} not acknowledged within {timeout} s")

    def request_message(self, topic: str, payload: Any, timeout: float = 10.0, *,
                        response_topic: str | None = None,
                        user_properties: Iterable[tuple[str, str]] | None = None,
                        qos: int = 1) -> Message:
        """Send a JSON request with an MQTT v5 response topic and fresh correlation data; the reply."""
        response_topic = response_topic or f"edged/replies/{self.client_id}"
        if not any(mqtt.topic_matches_sub(f, response_topic) for f in self._filters):
            granted = self.subscribe(response_topic, timeout)
            if granted is not None and granted.is_failure:
                raise AssertionError(f"subscription to {response_topic} refused: {granted}")
        correlation = uuid.uuid4().bytes
        self.publish(topic, json.dumps(payload), qos=qos, response_topic=response_topic,
                     correlation_data=correlation, user_properties=user_properties, timeout=timeout)
        return self.wait_for(lambda m: m.correlation_data == correlation, timeout, topic=response_topic)

    def request(self, topic: str, payload: Any, timeout: float = 10.0, **kwargs: Any) -> Any:
        """request_message() and decode the reply as JSON."""
        return self.request_message(topic, payload, timeout, **kwargs).json()

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
