"""Simulated enclosure switch, mains and UPS lines: a pipe carrying GPIO line events.

Stands in for the kernel's line-request descriptor (``drivers/gpio.py``): the worker
reads the pipe's end exactly as it reads the kernel's, and :meth:`SimulatedLines.set`
writes the ``struct gpio_v2_line_event`` the kernel would write on that edge, packed
with the same ctypes layout. Only the ioctl that requests the lines is bypassed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping

from app.inputs import OpenedLines
from drivers.gpio import LineEvent, pack_event


class SimulatedLines:
    """Lines named as in ``drivers/inputs.py`` at their physical levels (0/1)."""

    def __init__(self, offsets: Mapping[str, int], levels: Mapping[str, int], *,
                 now_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.offsets = dict(offsets)
        self.levels = {name: int(levels[name]) for name in self.offsets}
        self._now_ns = now_ns
        self._lock = threading.Lock()
        self._seqno = 0
        self._line_seqno = dict.fromkeys(self.offsets, 0)
        self._write_fd: int | None = None

    def open(self) -> OpenedLines:
        """A new pipe for the worker (its ``open_lines``): the read end and the levels now.
        A previous pipe's write end is closed (the worker sees its end)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        with self._lock:
            if self._write_fd is not None:
                os.close(self._write_fd)
            self._write_fd = write_fd
            return OpenedLines(read_fd, {o: n for n, o in self.offsets.items()},
                               dict(self.levels))

    def set(self, line: str, level: int, *, at_ns: int | None = None) -> None:
        """Put *line* at *level*: an edge event when it changes (none when it does not,
        as the kernel)."""
        with self._lock:
            if self.levels[line] == level:
                return
            self.levels[line] = level
            self._seqno += 1
            self._line_seqno[line] += 1
            event = LineEvent(self.offsets[line], level,
                              self._now_ns() if at_ns is None else at_ns,
                              self._seqno, self._line_seqno[line])
            if self._write_fd is not None:
                os.write(self._write_fd, pack_event(event))

    def unplug(self) -> None:
        """Close the write end: the worker's descriptor ends (a chip removed)."""
        with self._lock:
            if self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None

    def close(self) -> None:
        self.unplug()
