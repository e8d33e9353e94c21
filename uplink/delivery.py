"""Delivery of committed records at QoS 1: the window, the cursors, the PUBACKs.

Sans-IO, in the manner of h11: no socket, no store, no lock, no clock. The
forwarder's thread feeds it facts (the connection came up or went down, a batch
went out as MQTT message *mid*, the PUBACK of *mid* arrived, accepted or
refused) and acts on what it returns:

- :meth:`Delivery.next_read` says whether to read another batch, and from which
  cursors (a batch is the next records of the highest class above its cursor);
- :meth:`Delivery.puback` turns a PUBACK into :class:`Delete` (the store may
  delete that range of the class), :class:`Refused` (the rows stay queued and go
  out again after the next reconnect) or :class:`Ignored` (a mid not in flight:
  a PUBACK from before a reconnect, or from paho's own resend of one).

Safety: a seq is only ever deleted after an accepted PUBACK of a message that
carried it. Liveness: a reconnect forgets what was in flight and rewinds every
cursor, so everything not yet deleted is sent again (the platform de-duplicates
by gateway id and seq). Within a class records go out in seq order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from core.kinds import Priority

#: MQTT messages in flight (published, PUBACK not yet seen).
WINDOW = 8
#: Stop reading while this many PUBACKed rows wait to be deleted (bounds the writer's inbox).
MAX_DELETIONS_WAITING = 20_000


@dataclass(frozen=True, slots=True)
class ReadFrom:
    """Read the next batch with these cursors (class -> last seq sent)."""

    cursors: Mapping[Priority, int]


@dataclass(frozen=True, slots=True)
class Hold:
    """Read nothing now; *why* is one of the ``HOLD_*`` strings."""

    why: str


HOLD_OFFLINE = "offline"
HOLD_WINDOW_FULL = "window full"
HOLD_BACKPRESSURE = "deletions waiting"


@dataclass(frozen=True, slots=True)
class Delete:
    """The broker took message *mid*: delete its rows of class *prio*, seq in [lo, hi]."""

    mid: int
    prio: Priority
    lo: int
    hi: int
    rows: int
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Refused:
    """The broker refused message *mid* (e.g. the ACL): its rows stay queued."""

    mid: int
    prio: Priority
    rows: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A PUBACK for a mid not in flight (sent before the last reconnect)."""

    mid: int


PubackOutcome = Delete | Refused | Ignored


class Delivery:
    """The QoS 1 delivery state of one uplink. One instance; it outlives reconnects."""

    def __init__(self, *, window: int = WINDOW,
                 max_deletions_waiting: int = MAX_DELETIONS_WAITING) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self._window = window
        self._max_deletions_waiting = max_deletions_waiting
        self._connected = False
        self._inflight: dict[int, tuple[Priority, tuple[int, ...]]] = {}
        self._cursors: dict[Priority, int] = {}
        self._idle = False

    # -- what it knows -------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def in_flight(self) -> int:
        """MQTT messages published and not yet PUBACKed."""
        return len(self._inflight)

    @property
    def idle(self) -> bool:
        """The last read found nothing to send, and nothing was in flight (until the next
        publish or reconnect; records committed since are not known here)."""
        return self._idle

    # -- the connection ----------------------------------------------------------
    def connection_made(self) -> None:
        """The broker accepted the connection: start again from the store's oldest rows."""
        self._connected = True
        self._reset()

    def connection_lost(self) -> bool:
        """The connection is gone; returns whether it was up (so a loss is counted once)."""
        was_up = self._connected
        self._connected = False
        self._reset()
        return was_up

    def _reset(self) -> None:
        # whatever was in flight is sent again from the store
        self._inflight.clear()
        self._cursors.clear()
        self._idle = False

    # -- sending -----------------------------------------------------------------
    def next_read(self, deletions_waiting: int) -> ReadFrom | Hold:
        """May another batch go out? *deletions_waiting*: PUBACKed rows not yet deleted."""
        if not self._connected:
            return Hold(HOLD_OFFLINE)
        if len(self._inflight) >= self._window:
            return Hold(HOLD_WINDOW_FULL)
        if deletions_waiting > self._max_deletions_waiting:
            return Hold(HOLD_BACKPRESSURE)  # the store catches up; its next commit wakes us
        return ReadFrom(MappingProxyType(self._cursors))

    def nothing_to_read(self) -> bool:
        """The store had no batch above the cursors; returns :attr:`idle`."""
        self._idle = not self._inflight
        return self._idle

    def published(self, mid: int, prio: Priority, seqs: Sequence[int]) -> None:
        """A batch of class *prio* (seqs increasing) went out as MQTT message *mid*."""
        if not self._connected:
            raise RuntimeError("published while offline: next_read said to hold")
        if not seqs:
            raise ValueError("an empty batch")
        if mid in self._inflight:
            raise ValueError(f"mid {mid} is already in flight")
        batch = tuple(seqs)
        self._inflight[mid] = (prio, batch)
        self._cursors[prio] = batch[-1]
        self._idle = False

    # -- acknowledgements ----------------------------------------------------------
    def puback(self, mid: int, *, refused: bool = False, reason: str = "") -> PubackOutcome:
        """The PUBACK of *mid* arrived; *refused* when its reason code is a failure."""
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return Ignored(mid)
        prio, seqs = entry
        if refused:
            # kept in the store, sent again after the next reconnect
            return Refused(mid, prio, len(seqs), reason)
        return Delete(mid, prio, seqs[0], seqs[-1], len(seqs), seqs)
