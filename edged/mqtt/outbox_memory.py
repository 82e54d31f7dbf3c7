"""Where the outbox keeps messages while its disk is full: in memory, bounded, and when over
its bounds losing the least important first (health, then results, state, events last)."""

from __future__ import annotations

from edged.mqtt.outbox_file import KINDS

Row = tuple[str, str, bytes, int, int, float, int]  # kind, topic, payload, qos, retain, created_at, size


class Held:
    """Messages by id, in id order (ids only grow while messages are held)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._rows: dict[int, Row] = {}
        self.size = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, msg_id: int) -> bool:
        return msg_id in self._rows

    def add(self, msg_id: int, row: Row) -> list[Row]:
        """Hold one more; what had to go to stay within the bounds (perhaps this one)."""
        self._rows[msg_id] = row
        self.size += row[-1]
        gone = []
        while len(self._rows) > self.max_messages or self.size > self.max_bytes:
            victim = min(self._rows, key=lambda i: (KINDS.index(self._rows[i][0]), i))
            gone.append(self.pop(victim))
        return gone

    def put_back(self, msg_id: int, row: Row) -> None:
        """Hold again a message taken out to be written (it failed): order is by id anyway."""
        self._rows = dict(sorted({**self._rows, msg_id: row}.items()))
        self.size += row[-1]

    def pop(self, msg_id: int) -> Row | None:
        row = self._rows.pop(msg_id, None)
        if row is not None:
            self.size -= row[-1]
        return row

    def ids(self, kind: str | None = None, topic: str | None = None) -> list[int]:
        return [i for i, r in self._rows.items() if (kind in (None, r[0])) and (topic in (None, r[1]))]

    def after(self, after_id: int, limit: int) -> list[tuple]:
        """Up to `limit` messages above `after_id` as (id, kind, topic, payload, qos, retain, created_at)."""
        found = []
        for msg_id, row in self._rows.items():
            if msg_id > after_id:
                found.append((msg_id, *row[:6]))
                if len(found) >= limit:
                    break
        return found

    def bytes_of(self, kinds: tuple[str, ...]) -> int:
        return sum(r[-1] for r in self._rows.values() if r[0] in kinds)

    def by_kind(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for row in self._rows.values():
            counts[row[0]] += 1
        return counts
