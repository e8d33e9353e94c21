"""Pseudo-terminal plumbing and fault injection shared by the device simulators.

A simulator holds the master side of a pty; the gateway opens the slave's path
with pyserial exactly as it would open ``/dev/ttyUSB0``. A stable symlink (like
``/dev/serial/by-id/...``) points at the current slave, so an unplug/replug
(a new pty) keeps the path the gateway was configured with.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self


@dataclass
class Faults:
    """What the wire does to bytes, seeded so every run can be replayed."""

    bit_error_rate: float = 0.0  # per byte: probability that one bit flips
    drop_rate: float = 0.0  # per byte: probability that it is lost
    garbage_rate: float = 0.0  # per write: probability of a burst of random bytes
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def active(self) -> bool:
        return bool(self.bit_error_rate or self.drop_rate or self.garbage_rate)

    def apply(self, data: bytes) -> bytes:
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
                byte ^= 1 << rng.randrange(8)
                self._count("bit_errors")
            out.append(byte)
        return bytes(out)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


class Pty:
    """One pseudo-terminal pair in raw mode; ``link`` is the stable path to its slave."""

    def __init__(self, link: Path | None = None) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        tty.setraw(self.master)
        os.set_blocking(self.master, False)
        self.slave_path = os.ttyname(self._slave)
        self.link = link
        if link is not None:
            tmp = link.with_name(f".{link.name}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.slave_path)
            tmp.replace(link)

    @property
    def path(self) -> str:
        return str(self.link) if self.link is not None else self.slave_path

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class PtySim:
    """A simulated device: a pty and the thread that serves it (subclasses write ``_run``)."""

    def __init__(self, name: str, link: Path | None) -> None:
        self.pty = Pty(link)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-{name}", daemon=True)

    @property
    def path(self) -> str:
        return self.pty.path

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pty.close()

    def _run(self) -> None:
        raise NotImplementedError
