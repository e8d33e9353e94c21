"""The uplink's linger: records of the non-urgent classes wait so one message carries several.

At home records come one at a time, and each MQTT message costs far more than its record:
the signed head line (~300 B, docs/records.md "Transport"), the topic and MQTT header,
a PUBACK, and TLS record overhead each way. Records of the classes in :data:`HOLDABLE`
(positions and the heartbeat: nothing the platform waits for, no alarm, no check-in, no
status change, no command's answer) may therefore stay in the store up to the linger
before the forwarder sends them, so that one message and one head carry them all.

Sans-IO, as :class:`uplink.delivery.Delivery`: no store, no socket, no clock. The forwarder
tells it what it saw held in the store (:meth:`Linger.saw`) and asks whether it is time
to send (:meth:`Linger.due`). Holding is only the forwarder's decision about *when* to
read: the records are committed in the durable store like any other, and nothing is ever
deleted but by an accepted PUBACK (a SIGKILL while records are held loses none: the next
start sends them).

Why the platform never sees a held record as a gap: while records are held, nothing of
the gateway goes out (any record of another class ends the hold, see the forwarder), so no
head naming a later ``committed_seq`` and no record with a later seq reaches the platform;
whenever something goes out, everything held goes out with it, in the same pass, right
behind the urgent message.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.kinds import HOLDABLE, Priority

__all__ = ["FLUSH", "FULL", "HOLDABLE", "LINGER", "LIVE", "RELEASE_REASONS", "URGENT", "Linger"]

#: Why held records went out (the counters of :attr:`UplinkStats.releases`).
LINGER = "linger"  # the oldest held record waited the linger
FULL = "full"  # the held records reached a message's bound (records or bytes)
URGENT = "urgent"  # a record of another class went out: everything held goes behind it
FLUSH = "flush"  # asked to (a stop, a drain, wait_idle)
LIVE = "live"  # a message from the platform came: nothing is held for a while
RELEASE_REASONS = (LINGER, FULL, URGENT, FLUSH, LIVE)


class Linger:
    """What the forwarder holds now. *linger_ns* 0: nothing is ever held."""

    def __init__(self, linger_ns: int, max_records: int, max_bytes: int) -> None:
        if linger_ns < 0:
            raise ValueError(f"the linger must not be negative, not {linger_ns}")
        if max_records < 1 or max_bytes < 1:
            raise ValueError("the bounds of a held batch must be positive")
        self.linger_ns = linger_ns
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.records = 0
        self.bytes = 0
        #: When the oldest record held now was first seen (None: nothing held).
        self.since_ns: int | None = None
        self._looked: dict[Priority, int] = {}  # per class, the highest seq counted

    @property
    def active(self) -> bool:
        return self.linger_ns > 0

    def cursor(self, prio: Priority, sent: int) -> int:
        """Where to look for held records of *prio* not counted yet (*sent*: the delivery's
        cursor of that class)."""
        return max(sent, self._looked.get(prio, 0))

    def saw(self, prio: Priority, rows: Sequence[tuple[int, int]], now_ns: int) -> None:
        """Records of *prio* found held, not counted before: (seq, bytes), seq increasing."""
        if not rows:
            return
        if prio not in HOLDABLE:
            raise ValueError(f"records of class {prio.label} are never held")
        if self.since_ns is None:
            self.since_ns = now_ns
        self.records += len(rows)
        self.bytes += sum(size for _, size in rows)
        self._looked[prio] = rows[-1][0]

    def due(self, now_ns: int) -> str | None:
        """:data:`FULL` or :data:`LINGER` when what is held must go now, else None."""
        if self.records == 0:
            return None
        if self.records >= self.max_records or self.bytes >= self.max_bytes:
            return FULL
        if self.since_ns is not None and now_ns - self.since_ns >= self.linger_ns:
            return LINGER
        return None

    def clear(self) -> None:
        """Everything counted was read to be sent (or the cursors were rewound)."""
        self.records = self.bytes = 0
        self.since_ns = None
        self._looked.clear()
