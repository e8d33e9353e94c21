"""What a serial wire does to bytes: the one fault injector of the lab.

:class:`Damage` is the manipulator (as pymodbus's ``NullModem`` takes one): bit
errors, lost bytes and bursts of garbage, drawn from a seeded random source so
every run can be replayed, and counted. The pty simulators pass each direction
of their traffic through one; :class:`Line` is the same wire in memory for
sans-IO tests: one direction, in order, after a latency, delivered whole or in
chunks, with a one-shot :attr:`Line.tamper_next` for a fault placed by hand.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

BITS_PER_BYTE = 8


def byte_flip_rate(bit_error_rate: float) -> float:
    """The per-byte flip probability of a per-*bit* error rate (small rates: 8 x ber)."""
    return BITS_PER_BYTE * bit_error_rate


@dataclass
class Damage:
    """Seeded damage to a byte stream; :attr:`counts` says what was done."""

    bit_error_rate: float = 0.0  # per byte: probability that one bit flips
    drop_rate: float = 0.0  # per byte: probability that it is lost
    garbage_rate: float = 0.0  # per write: probability of a burst of random bytes
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    #: a random source shared with other users (it overrides *seed*)
    rng: random.Random | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        self._rng = self.rng if self.rng is not None else random.Random(self.seed)

    @property
    def active(self) -> bool:
        return bool(self.bit_error_rate or self.drop_rate or self.garbage_rate)

    def apply(self, data: bytes) -> bytes:
        """*data* as it comes out of the wire: maybe after garbage, with bytes lost or flipped.

        A rate of zero draws nothing from the random source.
        """
        if not self.active:
            return data
        out = bytearray()
        rng = self._rng
        if self.garbage_rate and rng.random() < self.garbage_rate:
            out += rng.randbytes(rng.randint(1, 64))
            self._count("garbage_bursts")
        for original in data:
            byte = original
            if self.drop_rate and rng.random() < self.drop_rate:
                self._count("dropped")
                continue
            if self.bit_error_rate and rng.random() < self.bit_error_rate:
                byte ^= 1 << rng.randrange(BITS_PER_BYTE)
                self._count("bit_errors")
            out.append(byte)
        return bytes(out)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


@dataclass
class Line:
    """One direction of a serial line in memory: in order, after *latency_s*, maybe damaged.

    Sans-IO: the caller gives the time to :meth:`send` and :meth:`receive`.
    """

    damage: Damage = field(default_factory=Damage)
    latency_s: float = 0.0
    #: bytes per chunk handed out by :meth:`receive`: 0 for all that has arrived
    #: in one chunk, 1 for byte by byte
    chunk_size: int = 0
    #: applied once to the next non-empty write (before :attr:`damage`), then forgotten
    tamper_next: Callable[[bytes], bytes] | None = None
    #: every non-empty write, as the sender wrote it
    sent: list[bytes] = field(default_factory=list)
    _in_flight: deque[tuple[float, bytes]] = field(default_factory=deque, repr=False)

    def send(self, data: bytes, now: float) -> None:
        if not data:
            return
        self.sent.append(data)
        if self.tamper_next is not None:
            data, self.tamper_next = self.tamper_next(data), None
        self._in_flight.append((now + self.latency_s, self.damage.apply(data)))

    def receive(self, now: float) -> list[bytes]:
        """What has arrived by *now*, in chunks of :attr:`chunk_size` bytes."""
        out = bytearray()
        while self._in_flight and self._in_flight[0][0] <= now:
            out += self._in_flight.popleft()[1]
        if not out:
            return []
        if self.chunk_size <= 0:
            return [bytes(out)]
        return [bytes(out[i : i + self.chunk_size]) for i in range(0, len(out), self.chunk_size)]

    def clear(self) -> None:
        """Whatever is still on the line is lost (the port was closed, a side restarted)."""
        self._in_flight.clear()
