"""Several `serve` instances over one store (issue 13, docs/fleet.md): a real Mosquitto,
real `serve` processes, a real device daemon updating a 4 MiB model; every chunk request
and reply counted by correlation data."""

from __future__ import annotations

import time

import pytest

from edged.registry.publisher import DAY_S, open_release, sign
from edged.registry.store import RegistryStore, Target
from tests.conftest import build_tiny_ir, ir_files, wait_until
from tests.registry.conftest import retained_on
from tests.registry.fleet_parts import (
    EVENTS,
    FETCH,
    NO_DELAY,
    REPLIES,
    Counting,
    device_config,
    device_store,
    publish_v2,
    served_chunks,
    wait_online,
)

FIGURES: dict[str, object] = {}  # printed with -s: the figures of the closing note


def wait_kept(events, daemon, registry, timeout: float = 120) -> dict:
    try:
        return events.wait_for(lambda m: m.json()["kind"] == "update_kept", timeout=timeout).json()
    except AssertionError as exc:
        logs = "\n".join(f"serve {i}:\n{registry.serve_log(i)[-2000:]}" for i in range(len(registry.servers)))
        raise AssertionError(f"{exc}\ndaemon:\n{daemon.output()[-3000:]}\n{logs}") from None


@pytest.mark.parametrize("instances,group", [(1, "edged-registry"), (2, "edged-registry"), (2, "")],
                         ids=["one", "two-shared", "two-plain"])
def test_each_request_is_answered_once_by_one_of_the_instances(
        instances, group, start_broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    broker = start_broker(extra_config=NO_DELAY)
    registry = make_registry(broker, {"share_group": group})
    status = mqtt_subscriber(broker, "edged/registry/status")
    for _ in range(instances):
        registry.serve(status)
    wait_online(status, instances)
    counting = Counting(broker, [FETCH, REPLIES])
    store = device_store(tmp_path)
    events = mqtt_subscriber(broker, EVENTS, keep_session=True)
    daemon = start_daemon(store.root, device_config(registry, tmp_path, chunk_bytes=32 << 10, window=4))
    publish_v2(registry, tmp_path)
    assert wait_kept(events, daemon, registry)["version"] == "2"
    store.verify("wide", "2")

    answers = 1 if group else instances  # a plain subscription: every instance answers every request
    wait_until(lambda: all(counting.replies[c] >= answers for c in counting.snapshot()[0]), 30,
               lambda: f"a reply to every request: {counting.snapshot()[2]}")
    requests, replies, statuses = counting.snapshot()
    registry.stop()
    served = [served_chunks(registry.serve_log(i)) for i in range(instances)]
    FIGURES[f"{instances} instance(s), share_group={group!r}"] = (
        f"{len(requests)} requests, {sum(replies.values())} replies, served per instance {served}")
    print(FIGURES)
    seen = f"{FIGURES}; replies {dict(statuses)}"
    assert set(replies) <= set(requests) and statuses.keys() == {"ok"}, seen
    if group:
        assert set(replies.values()) == {1}, f"a request answered twice: {seen}"
        assert all(n > 0 for n in served), seen  # both took their share
        assert sum(served) == len(requests), seen
    else:
        assert set(replies.values()) == {2} and served == [len(requests)] * 2, seen
        assert "plain subscription to edged/registry/fetch (share_group is empty)" in registry.serve_log(0)


def test_kill_9_of_one_instance_mid_transfer_loses_nothing(
        start_broker, make_registry, mqtt_subscriber, start_daemon, tmp_path):
    broker = start_broker(extra_config=NO_DELAY)
    registry = make_registry(broker)
    status = mqtt_subscriber(broker, "edged/registry/status")
    first, _second = registry.serve(status), registry.serve(status)
    instances = wait_online(status, 2)
    counting = Counting(broker, [FETCH, REPLIES])
    store = device_store(tmp_path)
    events = mqtt_subscriber(broker, EVENTS, keep_session=True)
    config = device_config(registry, tmp_path, chunk_bytes=8 << 10, window=4, chunk_timeout_s=1.0)
    daemon = start_daemon(store.root, config)
    files = publish_v2(registry, tmp_path)
    chunks = sum(-(-f.stat().st_size // (8 << 10)) for f in files)
    wait_until(lambda: sum(counting.snapshot()[1].values()) > chunks // 4, 60, "a quarter of the chunks")
    first.kill()  # SIGKILL: its requests in flight are never answered; the broker sends its Will
    at_kill = sum(counting.snapshot()[1].values())
    assert wait_kept(events, daemon, registry)["version"] == "2"
    store.verify("wide", "2")
    assert at_kill < chunks

    requests, replies, statuses = counting.snapshot()
    unanswered = [c for c in requests if replies[c] == 0]
    FIGURES["kill -9"] = (f"{chunks} chunks, {len(requests)} requests, {sum(replies.values())} replies, "
                          f"{len(unanswered)} requests lost with the killed instance and asked again, "
                          f"killed after {at_kill} replies")
    print(FIGURES)
    assert max(replies.values()) == 1 and statuses.keys() == {"ok"}
    # The survivor says online again after the killed one's Last Will said offline.
    survivor = wait_until(lambda: next((m.json() for m in reversed(status.messages("edged/registry/status"))
                                        if m.payload), None), 10)
    offline_at = next(i for i, m in enumerate(status.messages("edged/registry/status"))
                      if m.payload and m.json()["state"] == "offline")
    wait_until(lambda: any(m.payload and m.json()["state"] == "online"
                           for m in status.messages("edged/registry/status")[offline_at:]), 10,
               "the survivor to say online again")
    assert survivor["instance"] in instances


def test_a_release_due_for_re_signing_is_re_signed_once_and_the_broker_holds_the_store_s_bytes(
        start_broker, make_registry, mqtt_subscriber, tmp_path):
    broker = start_broker(extra_config=NO_DELAY)
    registry = make_registry(broker)
    files = ir_files(build_tiny_ir(tmp_path / "ir"))
    registry.run("publish", "tiny", *files, "--version", "1")
    store = RegistryStore(registry.root)
    target, key = Target("tiny", None), store.signing_key()
    old = open_release(store.retained_for(target), key)
    now = time.time()  # signed 25 days ago for 30 days: past two thirds, due for re-signing
    aged = old.model_copy(update={"published_at": round(now - 25 * DAY_S, 3),
                                  "expires_at": round(now + 5 * DAY_S, 3)})
    with store.lock():
        store.set_retained(target, sign(aged, key))
    status = mqtt_subscriber(broker, "edged/registry/status")
    for _ in range(3):
        registry.serve(status)
    wait_online(status, 3)
    resigned = [line for i in range(3) for line in registry.serve_log(i).splitlines()
                if "re-signed the release of tiny" in line]
    assert len(resigned) == 1, resigned  # the others found it fresh under the store's lock
    current = store.retained_for(target)
    assert open_release(current, key).published_at > now - 60
    wait_until(lambda: (m := retained_on(mqtt_subscriber, broker, "edged/registry/models/tiny")) is not None
               and m.payload == current, 10, "the broker to retain the store's envelope")


def test_the_documented_acl_allows_the_shared_subscription(start_broker, make_registry, mqtt_subscriber,
                                                          tmp_path):
    """registry.md's ACL for the registry's account, unchanged, on a Mosquitto with passwords."""
    broker = start_broker("password", users={"registry": "s3cret"},
                          acl={"registry": ["readwrite edged/registry/#", "write edged/devices/+/fetch"]})
    registry = make_registry(broker, {"mqtt": {"username": "registry", "password": "s3cret"}})
    status = mqtt_subscriber(broker, "edged/registry/status")
    registry.serve(status)
    registry.serve(status)
    wait_online(status, 2)
    # serve logs its online line once the broker acknowledged the status: after we saw it.
    wait_until(lambda: all("online: answering chunk requests on $share/edged-registry/edged/registry/fetch"
                           in registry.serve_log(i) for i in range(2)), 20, "both instances' online lines")
