"""Commands on `edged/devices/{id}/cmd`, answered on the sender's response topic.

A command is untrusted JSON, checked against the schema below before anything
runs; whatever is wrong with it becomes an error reply (`{"ok": false, "error":
...}`), never an exception in the daemon. Replies go to the MQTT v5 response topic
with the correlation data echoed; MQTT 3.1.1 senders put `response_topic` and `id`
in the JSON instead; with neither, the reply goes to `edged/devices/{id}/replies`.
A response topic is where the device publishes on the sender's word, so only topics
under `reply_topic_prefix` (the operators' reply namespace, `edged/replies/` by
default) or the device's own `.../replies` are used: a command naming any other is
refused, not run, and its error goes to `.../replies` instead.

The JSON is parsed by `edged.untrusted_json`, as the socket API's is: a document
nested past its limit is an error reply, never a `RecursionError` in the worker.

QoS 1 may deliver a command twice: a command seen again (same correlation data or
`id`) gets the first reply again and is not run a second time, so a repeated
`models.rollback` rolls back once.

Commands run one at a time on their own thread, never on paho's network thread.
The `command_senders` allow-list checks the user property `sender`, which any
client can set: the broker's ACL on the cmd topic is the real gate.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edged.control import Control
from edged.errors import EdgedError
from edged.health import Health
from edged.mqtt.link import MqttLink
from edged.pipelines.group import Pipelines
from edged.untrusted_json import parse_json

log = logging.getLogger(__name__)
MAX_COMMAND_BYTES = 64 << 10
REMEMBERED_REPLIES = 256
NAME = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | int | None = Field(default=None, description="Echoed in the reply; identifies repeats.")
    response_topic: str | None = Field(default=None, max_length=512, description="For MQTT 3.1.1 senders.")


class Ping(_Command):
    command: Literal["ping"]


class Status(_Command):
    command: Literal["status"]


class ModelsList(_Command):
    command: Literal["models.list"]


class ModelsActivate(_Command):
    command: Literal["models.activate"]
    model: Annotated[str, NAME]
    version: Annotated[str, NAME]


class ModelsRollback(_Command):
    command: Literal["models.rollback"]
    model: Annotated[str, NAME]


class PipelinesRestart(_Command):
    command: Literal["pipelines.restart"]
    pipeline: Annotated[str, NAME]


class ConfigReload(_Command):
    command: Literal["config.reload"]


Command = Annotated[
    Ping | Status | ModelsList | ModelsActivate | ModelsRollback | PipelinesRestart | ConfigReload,
    Field(discriminator="command"),
]
COMMAND = TypeAdapter(Command)


class Commands:
    def __init__(self, link: MqttLink, control: Control, health: Health,
                 pipelines: Pipelines | None, reload_config: Callable[[], dict[str, Any]] | None,
                 allowed_senders: list[str]) -> None:
        self.link = link
        self.control = control
        self.health = health
        self.pipelines = pipelines
        self.reload_config = reload_config
        self.allowed_senders = set(allowed_senders)
        self.counts = {"received": 0, "failed": 0, "repeated": 0, "refused_busy": 0, "refused_topic": 0}
        settings, topics = link.settings, link.topics
        self.own_replies = topics.replies
        self.reply_prefix = settings.reply_topic_prefix.replace("{topic_prefix}", topics.prefix)
        self._replies: collections.OrderedDict[bytes, dict] = collections.OrderedDict()
        self._queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._work, name="mqtt-commands", daemon=True)

    def status(self) -> dict[str, int]:
        """The health document's `commands` section."""
        return dict(self.counts)

    def start(self) -> None:
        self._thread.start()
        self.link.subscribe(self.link.topics.commands, self._receive)

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread.is_alive():  # not when stopped before it started
            self._thread.join(timeout=5)

    # --- receiving (paho's thread: quick) ---------------------------------------------
    def _receive(self, message: mqtt.MQTTMessage) -> None:
        self.counts["received"] += 1
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.counts["refused_busy"] += 1
            self._reply(message, None, {"ok": False, "error": "busy: too many commands waiting; try again"})

    def _work(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._handle(message)
            except Exception:  # a bug in one command must not end the worker
                log.exception("command on %s failed", message.topic)
                self._reply(message, None, {"ok": False, "error": "internal error; see the device log"})

    def _handle(self, message: mqtt.MQTTMessage) -> None:
        key = _key(message)
        if key is not None and key in self._replies:
            self.counts["repeated"] += 1
            self._reply(message, None, self._replies[key])
            return
        command: Any = None
        try:
            self._check_topic(_response_topic(message, None))  # before parsing: no reply goes there
            command = self._parse(message)
            self._check_topic(_response_topic(message, command))
            reply = {"ok": True, "command": command.command, "result": self._run(command)}
        except (CommandError, EdgedError) as exc:
            self.counts["failed"] += 1
            if isinstance(exc, ForbiddenTopic):
                self.counts["refused_topic"] += 1
            reply = {"ok": False, "error": str(exc).splitlines()[0]}
            if command is not None:
                reply["command"] = command.command
            log.warning("command refused: %s", reply["error"])
        if command is not None and command.id is not None:
            reply["id"] = command.id
        if key is not None:
            self._replies[key] = reply
            while len(self._replies) > REMEMBERED_REPLIES:
                self._replies.popitem(last=False)
        self._reply(message, command, reply)

    def _parse(self, message: mqtt.MQTTMessage) -> Any:
        if len(message.payload) > MAX_COMMAND_BYTES:
            raise CommandError(f"command too large: {len(message.payload)} bytes "
                               f"(at most {MAX_COMMAND_BYTES})")
        if self.allowed_senders:
            sender = _user_property(message, "sender")
            if sender not in self.allowed_senders:
                raise CommandError(f"sender {sender!r} may not send commands to this device")
        document = parse_json(message.payload, "command")
        try:
            return COMMAND.validate_python(document)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise CommandError(f"invalid command: {where + ': ' if where else ''}{error['msg']}") from None

    # --- the commands -------------------------------------------------------------------
    def _run(self, command: Any) -> Any:
        match command:
            case Ping():
                return "pong"
            case Status():
                return self.health.document()
            case ModelsList():
                return self.control.models()
            case ModelsActivate(model=name, version=version):
                return self.control.activate(name, version).as_dict()
            case ModelsRollback(model=name):
                return self.control.rollback(name).as_dict()
            case PipelinesRestart(pipeline=name):
                if self.pipelines is None:
                    raise CommandError("this daemon runs no pipelines")
                self.pipelines.restart(name)
                return {"pipeline": name, "state": self.pipelines.status()[name]["state"]}
            case ConfigReload():
                if self.reload_config is None:
                    raise CommandError("this daemon was started without a config file to reload")
                return self.reload_config()
        raise CommandError(f"command {command.command!r} is not handled")  # pragma: no cover

    # --- replying -----------------------------------------------------------------------
    def _allowed(self, topic: str) -> bool:
        return "#" not in topic and "+" not in topic and (
            topic == self.own_replies or (topic.startswith(self.reply_prefix) and topic != self.reply_prefix))

    def _check_topic(self, topic: str | None) -> None:
        if topic is not None and not self._allowed(topic):
            raise ForbiddenTopic(f"response topic {topic[:200]!r} refused: replies go only under "
                                 f"{self.reply_prefix!r} or to {self.own_replies!r}; command not run")

    def _reply(self, message: mqtt.MQTTMessage, command: Any, reply: dict) -> None:
        """Publish `reply` on the response topic if it is allowed, else on the device's own."""
        properties = getattr(message, "properties", None)
        topic = _response_topic(message, command) or self.own_replies
        if not self._allowed(topic):  # refused in _handle already; a busy or repeated one lands here
            topic = self.own_replies
        out = None
        correlation = getattr(properties, "CorrelationData", None)
        if correlation is not None and self.link.settings.protocol == "5":
            out = Properties(PacketTypes.PUBLISH)
            out.CorrelationData = correlation
        self.link.publish_now(topic, reply, out)


class CommandError(EdgedError):
    """A command that cannot be run; the message is the reply's error."""


class ForbiddenTopic(CommandError):
    """A response topic outside the reply namespace: the command is not run."""


def _response_topic(message: mqtt.MQTTMessage, command: Any) -> str | None:
    """The MQTT v5 response topic, else the one in the command's JSON (MQTT 3.1.1)."""
    topic = getattr(getattr(message, "properties", None), "ResponseTopic", None)
    return topic or (command.response_topic if command is not None else None)


def _key(message: mqtt.MQTTMessage) -> bytes | None:
    """What identifies a command across QoS 1 redeliveries: correlation data, else the JSON `id`."""
    correlation = getattr(getattr(message, "properties", None), "CorrelationData", None)
    if correlation:
        return b"c:" + bytes(correlation)
    try:
        small = len(message.payload) <= MAX_COMMAND_BYTES
        document = parse_json(message.payload, "command") if small else None
    except EdgedError:  # the parse in _handle says what is wrong
        return None
    if isinstance(document, dict) and isinstance(document.get("id"), str | int):
        return b"i:" + json.dumps(document["id"]).encode()
    return None


def _user_property(message: mqtt.MQTTMessage, name: str) -> str | None:
    for key, value in getattr(getattr(message, "properties", None), "UserProperty", None) or []:
        if key == name:
            return value
    return None
