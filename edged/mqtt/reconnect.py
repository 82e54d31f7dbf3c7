"""The MQTT link's bookkeeping, apart from paho's callbacks so it is tested without a broker
(tests/mqtt/test_link_reconnect.py): the jittered wait before each reconnect, what the
status says about the attempts, and the window of outbox messages in flight.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable

WINDOW = 64  # outbox messages published and not yet acknowledged


class Backoff:
    """The wait before paho's next attempt: doubling from `first`, at most `longest`, drawn
    between half that ceiling and the ceiling, so a fleet does not reconnect in step after a
    broker restart. `reset` after a successful connect starts again from `first`."""

    def __init__(self, first: float, longest: float,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.first, self.longest = first, longest
        self.attempt = 0
        self._uniform = uniform

    def ceiling(self) -> float:
        return min(self.longest, self.first * 2 ** min(self.attempt, 30))

    def next_wait(self) -> float:
        ceiling = self.ceiling()
        self.attempt += 1
        return self._uniform(ceiling / 2, ceiling)  # jitter, not secrecy: random.uniform will do

    def reset(self) -> None:
        self.attempt = 0


class Attempts:
    """What the link's status says about its connection: successful CONNACKs, attempts that
    failed or were refused, and the last problem (a new one is said once, not once per retry)."""

    def __init__(self) -> None:
        self.connections = 0
        self.failures = 0
        self.last_error = ""

    @property
    def reconnects(self) -> int:
        return max(self.connections - 1, 0)

    def connected(self) -> None:
        self.connections += 1
        self.last_error = ""

    def failed(self, problem: str) -> bool:
        """One more failed attempt; True when `problem` is new (to be logged)."""
        self.failures += 1
        return self.problem(problem)

    def problem(self, message: str) -> bool:
        """Remember `message`; True when it differs from the last one (to be logged)."""
        new = message != self.last_error
        self.last_error = message
        return new


class SendWindow:
    """Outbox messages handed to paho and not yet acknowledged: at most `size`, by paho mid.

    The sender thread owns it, except `acknowledged`, which paho's thread calls (a deque
    append). Nothing is reset across a reconnect: paho sends its unacknowledged QoS 1
    messages again by itself, so they stay in flight and the cursor stays where it is (no
    outbox message is handed to paho twice); a new link (a restart) starts from cursor 0
    and so sends again whatever the outbox still holds.
    """

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.inflight: dict[int, int] = {}  # paho mid -> outbox id
        self.cursor = 0  # highest outbox id handed to paho
        self._acked: collections.deque[int] = collections.deque()  # mids paho saw acknowledged
        self._to_ack: list[int] = []  # outbox ids acknowledged, not yet recorded by the outbox

    def room(self) -> int:
        return self.size - len(self.inflight)

    def handed(self, outbox_id: int, mid: int | None) -> None:
        """Outbox message `outbox_id` went to paho; `mid` when it waits for a PUBACK (QoS 1)."""
        self.cursor = outbox_id
        if mid is not None:
            self.inflight[mid] = outbox_id

    def acknowledged(self, mid: int) -> None:
        """paho saw the PUBACK of `mid` (any mid: ones not in the window are ignored)."""
        self._acked.append(mid)

    def acks(self) -> list[int]:
        """The outbox ids acknowledged so far and not yet `recorded`, oldest first."""
        while self._acked:
            outbox_id = self.inflight.pop(self._acked.popleft(), None)
            if outbox_id is not None:
                self._to_ack.append(outbox_id)
        return list(self._to_ack)

    def recorded(self) -> None:
        """The outbox took the acks: they are not handed to it again."""
        self._to_ack.clear()
