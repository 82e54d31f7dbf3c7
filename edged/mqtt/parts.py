"""The daemon's MQTT side, built in two complete pieces because pipelines and MQTT need
each other: `MqttPipe` (the outbox and the link: what pipelines publish results to and
read sensor topics from) comes first, the pipelines are built on it, then `MqttParts`
(reports, commands, updates) on both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from edged.config import Settings
from edged.control import Control
from edged.health import Health
from edged.models.lifecycle import ModelEvent
from edged.models.manager import ModelManager
from edged.mqtt.commands import Commands
from edged.mqtt.link import MqttLink
from edged.mqtt.outbox import Outbox
from edged.mqtt.reports import Reporter
from edged.pipelines.group import Pipelines
from edged.shutdown import run_steps


class MqttPipe:
    """The outbox and the link; to pipelines, an `edged.pipelines.mqtt_port.MqttPort`."""

    def __init__(self, settings: Settings, hello: Callable[[], dict[str, Any]]) -> None:
        mqtt = settings.mqtt
        self.outbox = Outbox(mqtt.outbox_path, mqtt.outbox_max_messages, mqtt.outbox_max_bytes)
        self.link = MqttLink(mqtt, self.outbox, hello)

    @property
    def connected(self) -> threading.Event:
        return self.link.connected

    def put_result(self, pipeline: str, document: dict) -> bool:
        return self.link.put("result", self.link.topics.results(pipeline), document)

    def put_snapshot(self, pipeline: str, jpeg: bytes) -> bool:
        # Retained, so a dashboard that subscribes later sees the newest at once; `replace`
        # keeps one waiting in the outbox while the broker is away, not every one since.
        return self.link.put("result", self.link.topics.snapshots(pipeline), jpeg, retain=True, replace=True)

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        self.link.subscribe(topic_filter, lambda message: handler(message.topic, message.payload))


class MqttParts:
    """Reports, commands, updates and Home Assistant discovery over the link; started before
    the models load (their events are queued in the outbox) and stopped in reverse order."""

    def __init__(self, settings: Settings, pipe: MqttPipe, manager: ModelManager, control: Control,
                 health: Health, pipelines: Pipelines,
                 reload_config: Callable[[], dict[str, Any]] | None) -> None:
        self.pipe = pipe
        self.link = pipe.link
        self.reporter = Reporter(self.link, health, manager, pipelines, settings.mqtt.health_interval_s,
                                 group=settings.updates.group)
        self.commands = Commands(self.link, control, health, pipelines, reload_config,
                                 settings.mqtt.command_senders) if settings.mqtt.commands else None
        self.discovery = None
        if settings.homeassistant.enabled:
            from edged.mqtt.homeassistant.discovery import Discovery

            self.discovery = Discovery(settings, self.link, manager, lambda: pipelines.settings)
        self.updates = None
        if settings.updates.enabled:
            from edged.mqtt.updates import UpdateAgent

            self.updates = UpdateAgent(settings.updates, self.link, control,
                                       self.reporter.event, self.reporter.set_desired)

    def health_sections(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """This transport's sections of the health document, in the order the document
        has always shown them: commands (when enabled), updates, mqtt."""
        from edged.mqtt.updates import describe

        sections: dict[str, Callable[[], dict[str, Any]]] = {}
        if self.commands is not None:
            sections["commands"] = self.commands.status
        sections["updates"] = lambda: describe(self.updates)
        sections["mqtt"] = self.link.status
        if self.discovery is not None:
            sections["homeassistant"] = self.discovery.status
        return sections

    def on_model_event(self, event: ModelEvent) -> None:
        self.reporter.on_model_event(event)
        self.pipelines_changed()  # a model's entities come and go with it

    def pipelines_changed(self) -> None:
        """The pipelines' config or the models changed: Home Assistant's entities follow."""
        if self.discovery is not None:
            self.discovery.refresh()

    def start(self) -> None:
        self.reporter.start()
        if self.commands is not None:
            self.commands.start()
        if self.updates is not None:
            self.updates.start()
        if self.discovery is not None:
            self.discovery.start()

    def stop_steps(self) -> list[tuple[str, Callable[[], object]]]:
        """The stop, in reverse order of the start, as named steps for `run_steps`: each runs
        whatever the ones before raised, so the outbox is always closed. Every part may be
        stopped without having been started (a stop during start-up)."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.updates is not None:
            steps.append(("mqtt updates", self.updates.stop))
        if self.commands is not None:
            steps.append(("mqtt commands", self.commands.stop))
        steps += [("mqtt reports", self.reporter.stop), ("mqtt link", self.link.stop),
                  ("mqtt outbox", self.pipe.outbox.close)]
        return steps

    def stop(self) -> list[str]:
        """Run `stop_steps`; the names of those that failed (each logged)."""
        return run_steps(self.stop_steps())
