"""A client flooding the fetch topic while a device updates (issue 13): a real Mosquitto,
a real `serve`, a real device daemon and a real paho client sending thousands of valid
requests of the largest size (real and random hashes, the longest length, 256 bytes of
correlation data, padded to 4000 bytes)."""

from __future__ import annotations

import random
import secrets
import threading

from edged.models.manifest import sha256_of
from tests.conftest import wait_until
from tests.registry.fleet_parts import (
    EVENTS,
    FETCH,
    NO_DELAY,
    REPLIES,
    Counting,
    busy_count,
    device_config,
    device_store,
    flood_properties,
    flood_request,
    publish_v2,
    rss_kib,
)
from tests.registry.test_scale_out import wait_kept

ROGUES = [f"rogue-{i}" for i in range(4)]  # ids the flood claims in its response topics
BURST = 1000
MAX_CHUNK = 1 << 20  # the registry's default max_chunk_bytes: the longest a request may ask


class Flood:
    """Bursts of BURST requests from one paho client, until stopped (at least `bursts`)."""

    def __init__(self, broker, real: list[tuple[str, int]], bursts: int) -> None:
        self.counting = Counting(broker, [f"edged/devices/{rogue}/fetch" for rogue in ROGUES], qos=0)
        self.client = self.counting.client
        self.real = real
        self.bursts = bursts
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(13)
        done = 0
        while done < self.bursts or not self.stop.is_set():
            infos = []
            for _ in range(BURST):
                if rng.random() < 0.5:
                    sha256, size = rng.choice(self.real)
                    offset = rng.randrange(size)
                else:
                    sha256, offset = secrets.token_hex(32), rng.randrange(1 << 30)
                infos.append(self.client.publish(FETCH, flood_request(sha256, offset, MAX_CHUNK), qos=1,
                                                 properties=flood_properties(rng.choice(ROGUES))))
            for info in infos:
                info.wait_for_publish(30)
            self.sent += BURST
            done += 1

    def __enter__(self) -> Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)


def test_a_flood_gets_busy_while_a_device_update_completes_in_bounded_memory(
        start_broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    broker = start_broker(extra_config=NO_DELAY)
    registry = make_registry(broker)
    status = mqtt_subscriber(broker, "edged/registry/status")
    server = registry.serve(status)
    pid = getattr(server, "proc", server).pid  # a Popen, or a ChildProcess around one
    device = Counting(broker, [REPLIES])
    store = device_store(tmp_path)
    events = mqtt_subscriber(broker, EVENTS, keep_session=True)
    daemon = start_daemon(store.root, device_config(registry, tmp_path, chunk_bytes=64 << 10, window=8))
    files = publish_v2(registry, tmp_path)
    real = [(sha256_of(f), f.stat().st_size) for f in files]
    wait_until(lambda: "serving 2 files" in registry.serve_log(), 20, "serve to see the new files")
    before_kib = rss_kib(pid)

    with Flood(broker, real, bursts=5) as flood:
        kept = wait_kept(events, daemon, registry)
    assert kept["version"] == "2"
    store.verify("wide", "2")
    peak_kib = rss_kib(pid, "VmHWM")
    _, _, flood_replies = flood.counting.snapshot()
    _, _, device_replies = device.snapshot()
    registry.stop()
    counted, unanswered = busy_count(registry.serve_log())
    busy = flood_replies["the registry is busy; try again"]
    figures = (f"flood: {flood.sent} requests sent, replies {dict(flood_replies)}; registry counted "
               f"{counted} busy ({unanswered} unanswered); device replies {dict(device_replies)}; serve RSS "
               f"{before_kib} KiB before, peak {peak_kib} KiB")
    print(figures)
    assert busy > 0 and counted >= busy, figures
    assert device_replies.keys() == {"ok"}, figures  # the device was never refused
    assert peak_kib < before_kib + 200 * 1024, figures  # generous: the queue's bound is a few MiB
