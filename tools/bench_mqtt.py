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
The subscriber that counts what arrives runs in a process of its own, as a fleet's would.
Targets (issue 4): outbox events/s >= 2,000 with QoS 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
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
        # As root, mosquitto would switch to the `mosquitto` user, which cannot write the
        # persistence file into this private directory: the session would be lost.
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                               f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
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
    """A subscriber counting the messages on one topic (QoS 1, a persistent session).
    It runs in a process of its own (`CounterProcess`), as a fleet's subscriber would: in
    this one it would take the GIL from the link it measures."""

    def __init__(self, port: int, topic: str) -> None:
        self.count = 0
        self.done = threading.Event()
        self.wanted: set[int] = set()
        self.sequences: set[int] = set()
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

    def expect(self, sequences: range) -> None:
        """Wait for these sequence numbers; `done` is set once each has arrived."""
        self.count, self.wanted = 0, set(sequences)
        self.sequences: set[int] = set()
        self.done.clear()

    def _on_message(self, client, userdata, message) -> None:
        self.count += 1  # repeats (QoS 1) and earlier phases' stragglers included
        seq = json.loads(message.payload)["seq"]
        if seq in self.wanted and seq not in self.sequences:
            self.sequences.add(seq)
            if len(self.sequences) == len(self.wanted):
                self.done.set()

    def missing(self, sequences: range) -> str:
        """Which of these sequence numbers never arrived, as ranges."""
        gaps = sorted(set(sequences) - self.sequences)
        ranges, start = [], None
        for n, seq in enumerate(gaps):
            if start is None:
                start = seq
            if n + 1 == len(gaps) or gaps[n + 1] != seq + 1:
                ranges.append(f"{start}" if start == seq else f"{start}-{seq}")
                start = None
        return ", ".join(ranges)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _serve_counter(port: int, topic: str, conn: Connection) -> None:
    """The counter process: answers `expect` and `wait` requests from the benchmark."""
    counter = Counter(port, topic)
    while True:
        request = conn.recv()
        if request[0] == "expect":
            counter.expect(range(request[1], request[2]))
            conn.send(None)
        elif request[0] == "wait":
            counter.done.wait(request[1])
            wanted = range(min(counter.wanted), max(counter.wanted) + 1)
            conn.send((len(counter.sequences), counter.count, counter.missing(wanted)))
        else:
            counter.close()
            return


class CounterProcess:
    """The benchmark's handle on the counter process."""

    def __init__(self, port: int, topic: str) -> None:
        self.topic = topic
        self._conn, child = multiprocessing.Pipe()
        self._proc = multiprocessing.Process(target=_serve_counter, args=(port, topic, child), daemon=True)
        self._proc.start()

    def expect(self, sequences: range) -> None:
        self._conn.send(("expect", sequences.start, sequences.stop))
        self._conn.recv()

    def wait(self, timeout: float) -> tuple[int, int, str]:
        """(distinct expected messages received, all messages received, the missing ranges)."""
        self._conn.send(("wait", timeout))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(("close",))
        self._proc.join(10)


def raw_rate(port: int, counter: CounterProcess, n: int) -> float:
    """Event-sized messages, each with its own sequence number (above the daemon's)."""
    payloads = [json.dumps({"seq": 10**9 + i, "time": time.time(), **EVENT}).encode() for i in range(n)]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    counter.expect(range(10**9, 10**9 + n))
    start = time.perf_counter()
    infos = [client.publish(counter.topic, payload, qos=1) for payload in payloads]
    infos[-1].wait_for_publish(120)
    counter.wait(120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return n / elapsed


def put_events(link: MqttLink, n: int) -> range:
    """Put `n` events, each numbered as the daemon numbers them; their sequence numbers."""
    sequences = []
    for _ in range(n):
        sequences.append(link.outbox.next_sequence("events"))
        link.put("event", link.topics.events, {"seq": sequences[-1], "time": time.time(), **EVENT})
    return range(sequences[0], sequences[-1] + 1)  # one writer: consecutive


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
    counter = CounterProcess(broker.port, topic)
    time.sleep(0.3)
    try:
        raw = raw_rate(broker.port, counter, args.events)

        settings = MqttSettings(enabled=True, host="127.0.0.1", port=broker.port, device_id=DEVICE,
                                outbox_path=workdir / "outbox.db", reconnect_min_s=0.1, reconnect_max_s=0.5)
        outbox = Outbox(settings.outbox_path, max_messages=1_000_000, max_bytes=1 << 30)
        link = MqttLink(settings, outbox)
        link.start()
        link.connected.wait(10)
        after = link.outbox.next_sequence("events")  # the events below are numbered from after + 1
        counter.expect(range(after + 1, after + 1 + args.events))
        start = time.perf_counter()
        put_events(link, args.events)
        put_done = time.perf_counter()
        counter.wait(300)
        while outbox.backlog():
            time.sleep(0.001)
        through = args.events / (time.perf_counter() - start)
        put_rate = args.events / (put_done - start)

        broker.stop()
        while link.connected.is_set():
            time.sleep(0.01)
        sequences = put_events(link, args.queued)
        queued = outbox.backlog()
        counter.expect(sequences)
        broker.start()
        restarted = time.perf_counter()
        link.connected.wait(30)
        connected = time.perf_counter()
        while outbox.backlog():
            time.sleep(0.001)
        emptied = time.perf_counter()
        distinct, received, missing = counter.wait(60)
        delivered = f"{distinct:,} of {queued:,} ({received - distinct} QoS 1 repeats)"
        if distinct < queued:  # the broker acknowledged them all: say which the subscriber lacks
            delivered += f" (never arrived: seq {missing})"
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
