"""Pseudo-terminal plumbing shared by the device simulators (wire faults: :mod:`lab.wire`).

A simulator holds the master side of a pty; the gateway opens the slave's path
with pyserial exactly as it would open ``/dev/ttyUSB0``. A stable symlink (like
``/dev/serial/by-id/...``) points at the current slave, so an unplug/replug
(a new pty) keeps the path the gateway was configured with.

On a bench, :class:`SerialEnd` takes the pty's place: the simulator then speaks through a
real serial port (a USB-serial adapter wired to the gateway's), as a device would.
"""

from __future__ import annotations

import contextlib
import os
import threading
import tty
from pathlib import Path
from typing import Self

import serial

STOP_TIMEOUT_S = 5.0


class Pty:
    """One pseudo-terminal pair in raw mode; ``link`` is the stable path to its slave."""

    def __init__(self, link: Path | None = None) -> None:
        self.master, self._slave = os.openpty()
        self._closed = False
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
        """Close both sides once: a second call must not close a reused descriptor number."""
        if self._closed:
            return
        self._closed = True
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class SerialEnd:
    """A real serial port in place of a pty's master side (``--port /dev/ttyUSB1``: a
    USB-serial adapter cross-wired to the one the gateway opens). Opened exclusively, raw,
    non-blocking, at *baudrate*; ``master`` is its file descriptor."""

    link: Path | None = None

    def __init__(self, device: str, baudrate: int) -> None:
        self._port = serial.Serial(device, baudrate, timeout=0, exclusive=True)
        self.master = self._port.fileno()
        self.slave_path = device

    @property
    def path(self) -> str:
        return self.slave_path

    def close(self) -> None:
        with contextlib.suppress(OSError, serial.SerialException):
            self._port.close()


class PtySim:
    """A simulated device: a pty (or, given *end*, a real serial port) and the thread that
    serves it (subclasses write ``_run``)."""

    def __init__(self, name: str, link: Path | None, *, end: SerialEnd | None = None) -> None:
        self.pty: Pty | SerialEnd = end if end is not None else Pty(link)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-{name}", daemon=True)

    @property
    def path(self) -> str:
        return self.pty.path

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for it, then close the pty; a thread that does not
        end within :data:`STOP_TIMEOUT_S` is an error, not a thread left behind."""
        self._stop.set()
        try:
            if self._thread.ident is not None:  # started
                self._thread.join(STOP_TIMEOUT_S)
                if self._thread.is_alive():
                    raise RuntimeError(f"{self._thread.name} did not stop in {STOP_TIMEOUT_S} s")
        finally:
            self.pty.close()

    def _run(self) -> None:
        raise NotImplementedError
