"""A stop flag that a signal handler may set.

``threading.Event.set`` takes the event's lock. A Python signal handler runs in the main
thread between two bytecodes, so when SIGTERM lands while the main thread itself holds that
lock (entering or leaving ``Event.wait``) the handler waits for a lock its own thread holds:
the process hangs for ever and its service manager kills it (measured: 8 hangs in 300
SIGTERMs to a loop of ``event.wait(0.0005)``). :class:`StopFlag` takes no lock: ``set`` is a
plain assignment and one byte written to a pipe, and ``wait`` is a ``select`` on that pipe,
so any number of threads may wait and a signal handler may set it at any instant.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Protocol


class Stopping(Protocol):
    """What a loop that runs until told to stop reads: a StopFlag or a threading.Event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class StopFlag:
    """The subset of ``threading.Event`` a stop needs (``set``, ``is_set``, ``wait``),
    safe to ``set`` from a signal handler. The flag never clears."""

    def __init__(self) -> None:
        self._flag = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        os.set_inheritable(self._read, False)
        os.set_inheritable(self._write, False)

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        # wakes every waiter, never read back (level); a full or closed pipe: they see _flag
        with contextlib.suppress(OSError):
            os.write(self._write, b"\0")

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; False when *timeout* seconds passed first."""
        if self._flag:
            return True
        try:
            select.select([self._read], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            pass
        except (OSError, ValueError):  # closed under us: answer from the flag
            pass
        return self._flag

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def stop_on_signals(flag: StopFlag,
                    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
                    ) -> None:
    """Set *flag* on each of *signals* (from the main thread, as ``signal.signal`` needs)."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        flag.set()

    for sig in signals:
        signal.signal(sig, on_signal)
