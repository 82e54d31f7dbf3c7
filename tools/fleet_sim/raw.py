"""The broker's raw throughput, as the baseline edged's transfers are held against: plain
paho publishers and subscribers (no edged code) pushing the same bytes in the same chunk
size through the same broker, QoS 1 both ways, in as many processes as the simulation.

    python -m tools.fleet_sim.raw sub PORT TOPIC COUNT
    python -m tools.fleet_sim.raw pub PORT CHUNK WINDOW TOPIC=COUNT...

A subscriber prints `ready` once subscribed and `done` when COUNT messages arrived; a
publisher connects, prints `ready`, waits for a line on stdin, then publishes COUNT
messages of CHUNK bytes to each TOPIC (interleaved) with at most WINDOW unacknowledged,
and prints `done`. Each line carries the process's own CPU seconds so far (utime + stime
of /proc/self/stat: all its threads, paho's loop included). `measure` runs them, times
the go to the last `done`, and accounts the CPU of the broker (its /proc/<pid>/stat at go
and at the last `done`), the publishers and the subscribers (each one's `done` less its
`ready`) over that window.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import paho.mqtt.client as mqtt

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]


TICK = os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """utime + stime of this process, every thread included, from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _say(word: str) -> None:
    print(f"{word} {own_cpu_seconds():.2f}", flush=True)


def _client(name: str) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{name}", protocol=mqtt.MQTTv5)


def subscriber(port: int, topic: str, count: int) -> None:
    got = {"n": 0}
    done = threading.Event()

    def on_message(client, userdata, message) -> None:
        got["n"] += 1
        if got["n"] >= count:
            done.set()

    client = _client(f"sub-{topic.rsplit('/', 1)[-1]}")
    client.on_message = on_message
    client.on_subscribe = lambda *args: _say("ready")
    client.on_connect = lambda c, *args: c.subscribe(topic, qos=1)
    client.connect(HOST, port)
    client.loop_start()
    done.wait()
    _say("done")
    client.disconnect()
    client.loop_stop()


def publisher(port: int, chunk: int, window: int, plan: list[tuple[str, int]]) -> None:
    client = _client(f"pub-{time.monotonic_ns()}")
    client.max_inflight_messages_set(window)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(HOST, port)
    client.loop_start()
    connected.wait(10)
    _say("ready")
    sys.stdin.readline()
    payload = bytes(chunk)
    order = [topic for i in range(max(n for _, n in plan)) for topic, n in plan if i < n]
    pending: deque = deque()
    for topic in order:
        if len(pending) >= window:  # paho would queue everything in memory otherwise
            pending.popleft().wait_for_publish(60)
        pending.append(client.publish(topic, payload, qos=1))
    for info in pending:
        info.wait_for_publish(60)
    _say("done")
    client.disconnect()
    client.loop_stop()


def _read(proc: subprocess.Popen, word: str) -> float:
    """The process's next line, which must be `word` and its CPU seconds: those seconds."""
    line = proc.stdout.readline().split()
    if not line or line[0] != word:
        raise RuntimeError(f"a raw publisher or subscriber did not say {word!r}: {line}")
    return float(line[1])


def _broker_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(port: int, total_bytes: int, chunk: int, publishers: int, subscribers: int,
            window: int = 20, broker_pid: int | None = None) -> dict[str, float]:
    """Push `total_bytes` (rounded up to whole chunks) from `publishers` to `subscribers`
    processes; the bytes, the seconds from go to the last subscriber done, MB/s, and the
    CPU seconds over that window of the broker (`broker_pid`), the publishers and the
    subscribers, each also per GB."""
    chunks = -(-total_bytes // chunk)
    per_pub = [chunks // publishers + (1 if j < chunks % publishers else 0) for j in range(publishers)]
    plans = [[(f"fleetsim/raw/{t}", n // subscribers + (1 if t < n % subscribers else 0))
              for t in range(subscribers)] for n in per_pub]
    expected = [sum(plan[t][1] for plan in plans) for t in range(subscribers)]
    run = [sys.executable, "-m", "tools.fleet_sim.raw"]
    popen = {"cwd": ROOT, "stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    subs = [subprocess.Popen([*run, "sub", str(port), f"fleetsim/raw/{t}", str(expected[t])], **popen)
            for t in range(subscribers) if expected[t]]
    pubs = [subprocess.Popen([*run, "pub", str(port), str(chunk), str(window),
                              *(f"{topic}={n}" for topic, n in plan if n)], **popen) for plan in plans]
    try:
        ready = {proc.pid: _read(proc, "ready") for proc in [*subs, *pubs]}
        broker_before = _broker_cpu(broker_pid)
        started = time.monotonic()
        for proc in pubs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        subs_cpu = sum(_read(proc, "done") - ready[proc.pid] for proc in subs)
        seconds = time.monotonic() - started
        broker_cpu = _broker_cpu(broker_pid) - broker_before
        pubs_cpu = sum(_read(proc, "done") - ready[proc.pid] for proc in pubs)
    except BaseException:
        for proc in [*subs, *pubs]:
            proc.kill()
        raise
    finally:
        for proc in [*subs, *pubs]:
            proc.wait(timeout=60)
    sent = chunks * chunk
    gb = sent / 1e9
    return {"bytes": sent, "seconds": seconds, "mb_per_s": sent / seconds / 1e6,
            "broker_cpu_s": broker_cpu, "publishers_cpu_s": pubs_cpu, "subscribers_cpu_s": subs_cpu,
            "broker_cpu_s_per_gb": broker_cpu / gb, "publishers_cpu_s_per_gb": pubs_cpu / gb,
            "subscribers_cpu_s_per_gb": subs_cpu / gb}


if __name__ == "__main__":
    role, port = sys.argv[1], int(sys.argv[2])
    if role == "sub":
        subscriber(port, sys.argv[3], int(sys.argv[4]))
    else:
        publisher(port, int(sys.argv[3]), int(sys.argv[4]),
                  [(arg.rsplit("=", 1)[0], int(arg.rsplit("=", 1)[1])) for arg in sys.argv[5:]])
