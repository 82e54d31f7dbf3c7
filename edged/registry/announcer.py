"""`serve`'s announcements: retain what the store records, in batches, re-signing releases
past 2/3 of their validity.

All under the store's lock, until the broker acknowledged: an instance or command that
changes a release waits, so no instance can retain an envelope older than the store's
after a newer one (and a release due for re-signing is re-signed by one instance; the
others find it fresh). An envelope already verified is not verified again (a change to one
release would otherwise re-verify every release of the fleet under the lock), and a
withdrawn device release's file is deleted once the broker acknowledged the withdrawal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edged.errors import EdgedError
from edged.registry.config import RegistrySettings
from edged.registry.connection import BrokerUnavailable, Connection
from edged.registry.publisher import open_release, refreshed
from edged.registry.store import RegistryStore, Target
from edged.signing import Release
from edged.topics import Topics

log = logging.getLogger(__name__)
ANNOUNCE_BATCH = 256  # retained releases sent before waiting for their PUBACKs
LOG_EACH_UP_TO = 20  # more announcements at once are logged as counts (many device releases)


class Announcer:
    def __init__(self, settings: RegistrySettings, store: RegistryStore, connection: Connection,
                 key: Ed25519PrivateKey, on_resigned: Callable[[], None]) -> None:
        """`on_resigned()`: the store changed under the caller (its generation moved)."""
        self.settings = settings
        self.store = store
        self.connection = connection
        self.topics = Topics(settings.topic_prefix)
        self._key = key
        self._on_resigned = on_resigned
        self.published: dict[Target, bytes] = {}  # what this process last retained per target
        self._verified: dict[Target, tuple[bytes, Release]] = {}  # envelope -> its checked release

    def announce(self, force: bool) -> None:
        """Retain each recorded envelope (`force`: also those this process already retained)."""
        now = time.time()
        sent: dict[int, Target] = {}
        done: list[Target] = []
        with self.store.lock():
            recorded = self.store.retained()
            for target in self._verified.keys() - recorded.keys():
                del self._verified[target]
            for target, current in recorded.items():
                if current:
                    try:
                        current = self._fresh(target, current, now)
                    except EdgedError as exc:
                        log.error("not announcing %s: %s", target.describe(), exc)
                        continue
                if not force and self.published.get(target) == current:
                    continue
                if not self.connection.connected.is_set():
                    break
                try:
                    topic = self.topics.release(target.name, target.group, target.device)
                    mid = self.connection.publish(topic, current, retain=True)
                except BrokerUnavailable as exc:
                    log.error("announcing %s failed: %s", target.describe(), exc)
                    continue
                sent[mid] = target
                self.published[target] = current
                if len(sent) >= ANNOUNCE_BATCH:  # paho holds at most MAX_QUEUED: wait for a batch
                    done += self._acked(sent)
                    sent = {}
            done += self._acked(sent)
            withdrawn = [t for t in done if not self.published.get(t)]
            for target in withdrawn:
                if self.store.forget_withdrawn(target):
                    self.published.pop(target, None)
        if len(done) <= LOG_EACH_UP_TO:
            for target in done:
                log.info("%s %s", "withdrew" if target in withdrawn else "announced", target.describe())
        else:
            log.info("announced %d releases and %d withdrawals", len(done) - len(withdrawn), len(withdrawn))

    def _fresh(self, target: Target, envelope: bytes, now: float) -> bytes:
        """The envelope, or a re-signed one when it is past 2/3 of its validity."""
        cached = self._verified.get(target)
        fresh = cached is not None and cached[0] == envelope
        release = cached[1] if cached is not None and fresh else open_release(envelope, self._key)
        self._verified[target] = (envelope, release)
        renewed = refreshed(envelope, self._key, self.settings.release_days, now) \
            if release.due_for_resigning(now) else None
        if renewed is None:
            return envelope
        self.store.set_retained(target, renewed)
        self._verified[target] = (renewed, open_release(renewed, self._key))
        self._on_resigned()
        log.info("re-signed the release of %s", target.describe())
        return renewed

    def _acked(self, sent: dict[int, Target]) -> list[Target]:
        """The targets whose announcement the broker acknowledged (the others are tried again)."""
        done = []
        for mid, target in sent.items():
            try:
                self.connection.wait_acked([mid], self.settings.connect_timeout_s)
            except BrokerUnavailable as exc:
                log.error("announcing %s failed: %s", target.describe(), exc)
                self.published.pop(target, None)
            else:
                done.append(target)
        return done
