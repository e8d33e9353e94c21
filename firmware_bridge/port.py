"""The one place that opens a serial port: a thread per port, reopening with backoff.

:class:`PortWorker` owns its port and its protocol object (a sans-IO core wrapped
by :class:`PortProtocol`). It waits on the port's file descriptor and a wake-up
pipe with ``select``, so other threads reach the protocol only through
:meth:`PortWorker.call_soon` (e.g. "this event is committed, ACK it").

A port that is missing, vanishes (USB unplug) or fails is closed and reopened
with exponential backoff and jitter; the worker never blocks another port.
Serial I/O errors and errors of the protocol code are caught separately: a
protocol bug is logged and counted, and reading goes on.

Backpressure: the protocol may ask its transport to stop reading
(:meth:`Transport.pause_reading`, as asyncio's transports) while the stages after it
are behind; the worker then leaves the port unread (the kernel's buffer fills, the
device waits or retransmits later) but still runs calls and ticks, so the protocol
can resume it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import random
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import serial

log = logging.getLogger(__name__)
trace = logging.getLogger("smartcorr.trace.serial")

REOPEN_MIN_S = 0.2
REOPEN_MAX_S = 2.0  # USB re-enumeration takes about a second; an open() is cheap
TICK_S = 0.05
READ_CHUNK = 4096
WRITE_TIMEOUT_S = 2.0


class Transport(Protocol):
    """What a protocol may ask of its port (given in ``connection_made``)."""

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run *fn* on the port's thread (thread-safe: e.g. "this event is committed")."""

    def reopen(self, reason: str) -> None:
        """Close the port and open it again (a device that stopped answering)."""

    def pause_reading(self) -> None:
        """Stop reading the port until :meth:`resume_reading` (or the next open)."""

    def resume_reading(self) -> None:
        """Read the port again."""


class PortProtocol(Protocol):
    """What a port worker drives, as pyserial's ``serial.threaded.Protocol``. Every call
    runs on the port's thread and gives the monotonic time, nanoseconds."""

    def connection_made(self, transport: Transport, now_ns: int) -> None: ...
    def data_received(self, data: bytes, now_ns: int) -> None: ...
    def tick(self, now_ns: int) -> None: ...
    def connection_lost(self, reason: str, now_ns: int) -> None: ...
    def data_to_send(self) -> bytes: ...


@dataclass
class PortStats:
    opens: int = 0
    open_failures: int = 0
    losses: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    protocol_errors: int = 0
    pauses: int = 0  # times the protocol stopped reading (backpressure)
    connected: bool = False


class PortWorker:
    def __init__(
        self,
        name: str,
        path: str,
        baudrate: int,
        protocol: PortProtocol,
        *,
        reopen_min_s: float = REOPEN_MIN_S,
        reopen_max_s: float = REOPEN_MAX_S,
    ) -> None:
        self.name = name
        self.path = path
        self.baudrate = baudrate
        self.protocol = protocol
        self._reopen_min = reopen_min_s
        self._reopen_max = reopen_max_s
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._reopen_reason: str | None = None
        self._reading = True
        self.stats = PortStats()
        self._thread = threading.Thread(target=self._run, name=f"port-{name}", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run *fn* on the port's thread (thread-safe)."""
        self._calls.put(fn)
        self._wake()

    def reopen(self, reason: str) -> None:
        """Close and reopen the port after the current step (called on the port's thread)."""
        self._reopen_reason = reason

    def pause_reading(self) -> None:
        """Leave the port unread after the current step (called on the port's thread)."""
        if self._reading:
            self._reading = False
            self.stats.pauses += 1

    def resume_reading(self) -> None:
        """Read the port again (called on the port's thread)."""
        self._reading = True

    def _wake(self) -> None:
        # BlockingIOError: a wake-up is already pending; OSError: we are stopping
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\x00")

    # -- the thread ------------------------------------------------------------
    def _run(self) -> None:
        delay = self._reopen_min
        reported = False
        while not self._stop.is_set():
            try:
                port = serial.Serial(
                    self.path, self.baudrate, timeout=0, write_timeout=WRITE_TIMEOUT_S,
                    exclusive=True,
                )
            except (serial.SerialException, OSError, ValueError) as exc:
                self.stats.open_failures += 1
                if not reported:
                    log.warning("%s: cannot open %s (%s); retrying with backoff",
                                self.name, self.path, exc)
                    reported = True
                self._stop.wait(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                delay = min(delay * 2, self._reopen_max)
                self._run_calls()
                continue
            delay, reported = self._reopen_min, False
            self.stats.opens += 1
            log.info("%s: opened %s", self.name, self.path)
            reason = self._serve(port)
            self.stats.losses += reason != "stopped"
            self.stats.connected = False
            self.connected.clear()
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()
            self._guard(functools.partial(self.protocol.connection_lost, reason,
                                          time.monotonic_ns()))
            if reason != "stopped":
                log.warning("%s: lost %s (%s); reopening", self.name, self.path, reason)

    def _serve(self, port: serial.Serial) -> str:
        self.stats.connected = True
        self.connected.set()
        self._reopen_reason = None
        self._reading = True
        self._guard(functools.partial(self.protocol.connection_made, self, time.monotonic_ns()))
        fd = port.fileno()
        try:
            while not self._stop.is_set():
                self._flush(port)
                watched = [fd, self._wake_r] if self._reading else [self._wake_r]
                readable, _, _ = select.select(watched, [], [], TICK_S)
                now_ns = time.monotonic_ns()
                if self._wake_r in readable:
                    os.read(self._wake_r, 512)
                if fd in readable:
                    data = os.read(fd, READ_CHUNK)
                    if not data:
                        return "end of file (device gone)"
                    self.stats.bytes_in += len(data)
                    if trace.isEnabledFor(logging.DEBUG):
                        trace.debug("%s <- %s", self.name, data.hex(" "))
                    self._guard(functools.partial(self.protocol.data_received, data, now_ns))
                self._run_calls()
                self._guard(functools.partial(self.protocol.tick, now_ns))
                if self._reopen_reason is not None:
                    return self._reopen_reason
            self._flush(port)
        except (serial.SerialException, OSError) as exc:
            return str(exc) or type(exc).__name__
        return "stopped"

    def _flush(self, port: serial.Serial) -> None:
        out = self.protocol.data_to_send()
        if out:
            if trace.isEnabledFor(logging.DEBUG):
                trace.debug("%s -> %s", self.name, out.hex(" "))
            port.write(out)
            self.stats.bytes_out += len(out)

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            self._guard(fn)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            # A bug in protocol or driver code must not end the reader: count, log, go on.
            self.stats.protocol_errors += 1
            log.exception("%s: protocol error", self.name)
