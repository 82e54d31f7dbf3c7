"""MQTT command parsing and running without a broker: real `Commands` over a real link
(never started), a real control service and a real (tiny) model, fed real paho messages.
What a command may be, what is refused and in which words, which response topics are
allowed, what identifies a repeat. Delivery and replies over a broker are tested end to
end in test_daemon_link.py and test_commands_limits.py."""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config import load_settings
from edged.control import Control, ControlError, NotServing
from edged.errors import EdgedError
from edged.health import Health
from edged.models.manager import ModelManager
from edged.mqtt.commands import (
    MAX_COMMAND_BYTES,
    CommandError,
    Commands,
    ForbiddenTopic,
    ModelsActivate,
    ModelsList,
    ModelsRollback,
    Ping,
    _key,
    _response_topic,
)
from edged.mqtt.link import MqttLink
from edged.mqtt.outbox import Outbox
from tests.conftest import ir_files

DEVICE = "edged/devices/cam-1"


def message(document: object, *, response_topic: str | None = None, correlation: bytes | None = None,
            sender: str | None = None) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=f"{DEVICE}/cmd".encode())
    msg.payload = document if isinstance(document, bytes) else json.dumps(document).encode()
    properties = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if correlation is not None:
        properties.CorrelationData = correlation
    if sender is not None:
        properties.UserProperty = ("sender", sender)
    msg.properties = properties
    return msg


@pytest.fixture
def parts(tiny_store, tmp_path):
    settings = load_settings(None, store={"path": str(tiny_store.root)},
                             backends={"openvino_cache_dir": str(tmp_path / "cache")},
                             mqtt={"enabled": True, "device_id": "cam-1",
                                   "outbox_path": str(tmp_path / "outbox.db")})
    manager = ModelManager(tiny_store, settings)
    manager.load_all()
    outbox = Outbox(settings.mqtt.outbox_path)
    link = MqttLink(settings.mqtt, outbox)
    control = Control(manager)
    yield link, control, Health(manager, tiny_store.root)
    manager.close()
    outbox.close()


@pytest.fixture
def commands(parts) -> Commands:
    link, control, health = parts
    return Commands(link, control, health, None, None, [])


@pytest.mark.parametrize(("document", "kind"), [
    ({"command": "ping"}, Ping),
    ({"command": "ping", "id": 7}, Ping),
    ({"command": "models.list", "id": "a"}, ModelsList),
    ({"command": "models.activate", "model": "tiny", "version": "2"}, ModelsActivate),
    ({"command": "models.rollback", "model": "tiny"}, ModelsRollback),
])
def test_a_valid_command_parses_to_its_type(commands, document, kind):
    command = commands._parse(message(document))
    assert isinstance(command, kind)
    assert command.id == document.get("id")


@pytest.mark.parametrize(("payload", "error"), [
    (b"not json", "command"),
    (b"[1, 2]", "invalid command"),
    ({"command": "reboot"}, "invalid command"),
    ({"command": "ping", "extra": 1}, "invalid command: ping.extra: Extra inputs are not permitted"),
    ({"command": "models.activate", "model": "tiny"},
     "invalid command: models.activate.version: Field required"),
    ({"command": "models.activate", "model": "../etc", "version": "1"}, "models.activate.model"),
    ({"command": "models.rollback", "model": ""}, "models.rollback.model"),
    ({"command": "ping", "response_topic": "x" * 513}, "ping.response_topic"),
    (b"[" * 100_000 + b"]" * 100_000, "command too large"),
    (b"[" * 5000 + b"]" * 5000, "command"),  # nested past the limit: an error, not a RecursionError
])
def test_what_is_wrong_with_a_command_is_a_domain_error_saying_so(commands, payload, error):
    """A domain error (the worker turns it into an error reply), never another exception."""
    with pytest.raises(EdgedError) as caught:
        commands._parse(message(payload))
    assert error in str(caught.value).splitlines()[0]


def test_a_command_over_the_size_limit_is_refused_before_parsing(commands):
    payload = json.dumps({"command": "ping", "id": "x" * MAX_COMMAND_BYTES}).encode()
    with pytest.raises(CommandError, match=f"command too large: {len(payload)} bytes"):
        commands._parse(message(payload))


def test_the_sender_allow_list_checks_the_user_property(parts):
    link, control, health = parts
    commands = Commands(link, control, health, None, None, ["ops"])
    assert isinstance(commands._parse(message({"command": "ping"}, sender="ops")), Ping)
    for sender in ("intruder", None):
        with pytest.raises(CommandError, match=f"sender {sender!r} may not send commands"):
            commands._parse(message({"command": "ping"}, sender=sender))


@pytest.mark.parametrize(("topic", "allowed"), [
    (f"{DEVICE}/replies", True),
    ("edged/replies/operator-1", True),
    ("edged/replies/a/b", True),
    ("edged/replies/", False),  # the prefix itself
    ("edged/replies/+", False),
    ("edged/replies/#", False),
    (f"{DEVICE}/state", False),  # the device's own retained state
    ("edged/devices/cam-2/replies", False),
    ("elsewhere/replies", False),
])
def test_replies_go_only_to_the_reply_namespace_or_the_devices_own_topic(commands, topic, allowed):
    assert commands._allowed(topic) is allowed
    if allowed:
        commands._check_topic(topic)
    else:
        with pytest.raises(ForbiddenTopic, match="command not run"):
            commands._check_topic(topic)


def test_the_response_topic_comes_from_mqtt5_properties_else_from_the_json(commands):
    v5 = message({"command": "ping"}, response_topic="edged/replies/a")
    assert _response_topic(v5, None) == "edged/replies/a"
    v311 = message({"command": "ping", "response_topic": "edged/replies/b"})
    assert _response_topic(v311, None) is None
    assert _response_topic(v311, commands._parse(v311)) == "edged/replies/b"


def test_a_repeat_is_known_by_correlation_data_else_by_the_json_id():
    assert _key(message({"command": "ping"}, correlation=b"\x01\x02")) == b"c:\x01\x02"
    assert _key(message({"command": "ping", "id": 7})) == b"i:7"
    assert _key(message({"command": "ping", "id": "7"})) == b'i:"7"'  # 7 and "7" are not the same
    assert _key(message({"command": "ping"})) is None
    assert _key(message(b"not json")) is None


def test_commands_run_through_the_control_service(commands, tiny_store, tiny_ir):
    assert commands._run(Ping(command="ping")) == "pong"
    assert commands._run(ModelsList(command="models.list")) == {"tiny": {"versions": ["1"], "active": "1"}}
    tiny_store.add("tiny", ir_files(tiny_ir), "2")
    activated = commands._run(ModelsActivate(command="models.activate", model="tiny", version="2"))
    assert activated == {"model": "tiny", "version": "2", "backend": "openvino"}
    with pytest.raises(ControlError, match=r"^tiny has no version '9' in the store$"):
        commands._run(ModelsActivate(command="models.activate", model="tiny", version="9"))
    rolled_back = commands._run(ModelsRollback(command="models.rollback", model="tiny"))
    assert rolled_back == {"model": "tiny", "version": "1", "backend": "openvino"}


def test_a_version_that_does_not_load_is_active_but_not_serving(commands, tiny_store, tmp_path):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"TFL3" + bytes(range(256)) * 4)
    tiny_store.add("tiny", [garbage], "3")
    refused = r"^tiny 3 is active in the store but not serving: tiny 3: "
    with pytest.raises(NotServing, match=refused) as caught:
        commands._run(ModelsActivate(command="models.activate", model="tiny", version="3"))
    assert caught.value.version == "3"
    assert tiny_store.active("tiny") == "3"  # the pointer moved; the old version still serves
    assert commands.control.manager.served()["tiny"].version == "1"
