"""The registry as a real `python -m edged.registry` subprocess against a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.registry.store import RegistryStore
from edged.signing import MAX_ENVELOPE_BYTES, Release, load_public_key, trusted_keys, verify_envelope
from tests.broker import Broker, Message, Subscriber
from tests.daemon_process import ChildProcess, environment, to_toml


class Registry:
    """One registry: its store, its config file pointing at `broker`, and its commands."""

    def __init__(self, workdir: Path, broker: Broker, settings: dict | None = None) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.broker = broker
        self.config = workdir / "registry.toml"
        values: dict = {"root": str(self.root), "reload_interval_s": 0.2, "connect_timeout_s": 5,
                        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2,
                                 "reconnect_max_s": 1.0}}
        for key, value in (settings or {}).items():
            if isinstance(value, dict):
                values.setdefault(key, {}).update(value)
            else:
                values[key] = value
        self.config.write_text(to_toml(values))
        self.env = environment()
        self.servers: list[ChildProcess] = []

    def run(self, *args: str | Path, expect: int | None = 0,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run one command with this registry's config; check its exit code unless expect is None."""
        command = [sys.executable, "-m", "edged.registry", *map(str, args), "--config", str(self.config)]
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=timeout,
                              cwd=self.workdir)
        if expect is not None:
            assert done.returncode == expect, (
                f"{' '.join(map(str, args))}: exit {done.returncode}, wanted {expect}\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    @property
    def public_key_text(self) -> str:
        return (self.root / "keys" / "registry.pub").read_text().strip()

    def trusted(self) -> dict:
        return trusted_keys([self.public_key_text])

    def verify(self, payload: bytes) -> Release:
        """A retained release as a device checks it: signature with the pinned key, then schema."""
        return Release.parse(verify_envelope(payload, self.trusted(), MAX_ENVELOPE_BYTES))

    def manifest(self, name: str, version: str) -> dict:
        return json.loads((self.root / "models" / name / version / "manifest.json").read_text())

    def serve(self, watcher: Subscriber) -> ChildProcess:
        """Start `serve` and return once it says online on its retained status topic (`watcher`
        subscribes to it); fail at once, with its log, if it exits first."""
        started = time.time()
        server = ChildProcess([sys.executable, "-m", "edged.registry", "serve", "--config", str(self.config)],
                              self.workdir / f"serve-{len(self.servers)}.log", name="serve", env=self.env,
                              cwd=self.workdir)
        self.servers.append(server)

        def online() -> bool:
            return any(m.payload and m.json()["state"] == "online" and m.json()["time"] >= started - 1
                       for m in watcher.messages("edged/registry/status"))

        server.wait_for(online, 20, "serve to come online")
        return server

    def serve_log(self, index: int = -1) -> str:
        return self.servers[index].output() if self.servers else ""

    def stop(self) -> None:
        for server in self.servers:
            server.stop(timeout=15)


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator:
    """make_registry(broker, settings=None, keygen=True) -> Registry; its `serve`s stop after the test."""
    made: list[Registry] = []

    def make(broker: Broker, settings: dict | None = None, keygen: bool = True) -> Registry:
        workdir = tmp_path / f"registry-{len(made)}"
        workdir.mkdir()
        registry = Registry(workdir, broker, settings)
        made.append(registry)
        if keygen:  # in-process, to keep the tests fast: test_cli.py runs the real `keygen`
            RegistryStore(registry.root).create_key()
        return registry

    yield make
    for registry in made:
        registry.stop()


@pytest.fixture
def registry(make_registry, broker) -> Registry:
    """A registry with its signing key, on this test's broker."""
    return make_registry(broker)


def retained_on(subscriber_factory, broker: Broker, topic: str, timeout: float = 10) -> Message | None:
    """What the broker retains on `topic`, or None: a fresh subscriber gets the retained message
    right after its SUBACK, so a marker it publishes to the same topic afterwards arrives after
    it (mosquitto keeps each client's messages in order). No waiting for a silence."""
    client = subscriber_factory(broker, topic)
    marker = f"marker-{uuid.uuid4().hex}".encode()
    client.publish(topic, marker)
    client.wait_for(lambda m: m.payload == marker, timeout, topic=topic)
    before = []
    for message in client.messages(topic):
        if message.payload == marker:
            break
        before.append(message)
    client.close()
    assert all(m.retain for m in before), before
    return before[-1] if before and before[-1].payload else None


def fetch(client: Subscriber, payload: bytes | dict, device: str, timeout: float = 10, **props) -> Message:
    """One chunk request from `device` (the client must be subscribed to its fetch topic)."""
    correlation = uuid.uuid4().bytes
    response_topic = props.pop("response_topic", f"edged/devices/{device}/fetch")
    client.publish("edged/registry/fetch", payload, response_topic=response_topic,
                   correlation_data=correlation, **props)
    return client.wait_for(lambda m: m.correlation_data == correlation, timeout,
                           topic=f"edged/devices/{device}/fetch")


def user_properties(message: Message) -> dict[str, str]:
    return dict(message.user_properties)


def public_key_of(registry: Registry):
    return load_public_key(registry.public_key_text)
