#!/usr/bin/env python3
"""MQTT benchmark: events through the daemon's outbox and link to a local Mosquitto.

Measured in one run, against a private broker started here on a free loopback port:
  1. raw:    a plain paho client publishes N event-sized messages (QoS 1, a window of
             64 in flight) and a subscriber receives them: the broker's own ceiling;
  2. outbox: the daemon's code path (edged.mqtt Outbox + MqttLink, one durable SQLite
             put per event, PUBACK-driven acks) publishes N events while connected;
  3. drain:  the broker is stopped, 10,000 events are queued in the outbox, the broker
             is started again: the time until the outbox is empty and every event has
             arrived (with the reconnect wait shown apart).
Targets (issue 4): outbox events/s >= 2,000 with QoS 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edged.config import MqttSettings
from edged.mqtt.link import MqttLink
from edged.mqtt.outbox import Outbox

DEVICE = "bench"
EVENT = {"kind": "model_loaded", "model": "face", "version": "12", "why": "activated",
         "backend": "openvino", "reason": "fastest of openvino 0.31 ms, litert 0.40 ms"}


class Broker:
    def __init__(self, directory: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.config = directory / "mosquitto.conf"
        # Persistence keeps the counting subscriber's session across the restart: it misses nothing.
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                               f"max_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\n"
                               f"persistence true\npersistence_location {directory}/\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.01)
        raise SystemExit("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


class Counter:
    """A subscriber counting the messages on one topic (QoS 1, a persistent session)."""

    def __init__(self, port: int, topic: str) -> None:
        self.count = 0
        self.done = threading.Event()
        self.expected = 0
        self.topic = topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"counter-{topic.count('/')}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, 1)
        self.client.reconnect_delay_set(0.05, 0.2)
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=session)
        self.client.loop_start()

    def expect(self, n: int) -> None:
        self.count, self.expected = 0, n
        self.done.clear()

    def _on_message(self, client, userdata, message) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.done.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_rate(port: int, counter: Counter, n: int, payload: bytes) -> float:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    counter.expect(n)
    start = time.perf_counter()
    infos = [client.publish(counter.topic, payload, qos=1) for _ in range(n)]
    infos[-1].wait_for_publish(120)
    counter.done.wait(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return n / elapsed


def put_events(link: MqttLink, n: int) -> None:
    for _ in range(n):
        sequence = link.outbox.next_sequence("events")
        link.put("event", link.topics.events, {"seq": sequence, "time": time.time(), **EVENT})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events in the throughput runs")
    parser.add_argument("--queued", type=int, default=10_000, help="events queued while the broker is down")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  link says: %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker = Broker(workdir)
    broker.start()
    topic = f"edged/devices/{DEVICE}/events"
    counter = Counter(broker.port, topic)
    time.sleep(0.3)
    payload = json.dumps({"seq": 1, "time": time.time(), **EVENT}).encode()
    try:
        raw = raw_rate(broker.port, counter, args.events, payload)

        settings = MqttSettings(enabled=True, host="127.0.0.1", port=broker.port, device_id=DEVICE,
                                outbox_path=workdir / "outbox.db", reconnect_min_s=0.1, reconnect_max_s=0.5)
        outbox = Outbox(settings.outbox_path, max_messages=1_000_000, max_bytes=1 << 30)
        link = MqttLink(settings, outbox)
        link.start()
        link.connected.wait(10)
        counter.expect(args.events)
        start = time.perf_counter()
        put_events(link, args.events)
        put_done = time.perf_counter()
        counter.done.wait(300)
        while outbox.backlog():
            time.sleep(0.001)
        through = args.events / (time.perf_counter() - start)
        put_rate = args.events / (put_done - start)

        broker.stop()
        while link.connected.is_set():
            time.sleep(0.01)
        put_events(link, args.queued)
        queued = outbox.backlog()
        counter.expect(args.queued)
        broker.start()
        restarted = time.perf_counter()
        link.connected.wait(30)
        connected = time.perf_counter()
        while outbox.backlog():
            time.sleep(0.001)
        emptied = time.perf_counter()
        counter.done.wait(60)
        delivered = f"{counter.count:,} of {queued:,}"
        link.stop()
        outbox.close()
    finally:
        counter.close()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"raw paho QoS 1 publish -> subscriber:    {raw:9,.0f} msg/s")
    print(f"outbox put only (durable, SQLite WAL):   {put_rate:9,.0f} events/s")
    print(f"outbox -> link -> broker -> subscriber:  {through:9,.0f} events/s   "
          f"({through / raw:.0%} of raw; target >= 2,000/s: {'PASS' if through >= 2000 else 'FAIL'})")
    print(f"{queued:,} queued while the broker was down: outbox empty {emptied - restarted:.2f} s after "
          f"the broker restart (reconnect {connected - restarted:.2f} s + drain {emptied - connected:.2f} s, "
          f"{queued / max(emptied - connected, 1e-9):,.0f} events/s); the subscriber got {delivered}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
