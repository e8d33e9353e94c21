"""A framed device (tag receiver, kiosk) on a pseudo-terminal, with fault injection.

The device logic is the reference :class:`firmware_bridge.device.DeviceLink`;
this class only moves its bytes through a pty (and through a :class:`lab.wire.Damage`
in each direction) on its own thread. Events are queued with :meth:`enqueue`. It says
HELLO in *protocol_version* (the newest by default), offering *features*, and with
*window* > 0 the WINDOW feature (version 2: that many DATA frames unacknowledged; 0:
stop-and-wait). With *baudrate*, its writes are paced as a UART at that rate (8N1: ten
bits a byte) would send them; without, they go as fast as the pty takes them (a USB CDC
device).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from firmware_bridge.device import DeviceLink
from firmware_bridge.messages import PROTOCOL_VERSION, DeviceClass, Feature, Hello
from lab.simulators.pty import Pty, PtySim, SerialEnd
from lab.wire import Damage

log = logging.getLogger(__name__)
TICK_S = 0.01
#: Paced writes go out in pieces of this many bytes at most (a UART's FIFO).
UART_FIFO = 32
#: Bits on the line per byte at 8N1 (start, 8 data, stop).
BITS_PER_BYTE = 10
#: Events kept in :attr:`FramedDeviceSim.sent` (the newest): a simulator left running for
#: days on a bench must not grow without bound.
SENT_KEPT = 100_000


class FramedDeviceSim(PtySim):
    def __init__(
        self,
        device_class: DeviceClass,
        serial: str,
        *,
        link: Path | None = None,
        firmware: tuple[int, int, int] = (1, 0, 0),
        protocol_version: int = PROTOCOL_VERSION,
        features: int = 0,
        window: int = 0,
        baudrate: int | None = None,
        to_host: Damage | None = None,
        from_host: Damage | None = None,
        byte_delay_s: float = 0.0,
        end: SerialEnd | None = None,
    ) -> None:
        if window:
            features |= Feature.WINDOW
        hello = Hello(protocol_version, device_class, firmware, 1, serial, features, window)
        self.device = DeviceLink(hello)
        # paced: each direction of the wire, bytes arriving when their last bit would
        self._tx = PacedLine(baudrate) if baudrate else None
        self._rx = PacedLine(baudrate) if baudrate else None
        self.to_host = to_host or Damage()
        self.from_host = from_host or Damage()
        self.byte_delay_s = byte_delay_s
        self._link = link
        super().__init__(serial, link, end=end)
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._plugged = True
        self._frozen = False
        #: event id -> body of the events generated (the newest SENT_KEPT)
        self.sent: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def enqueue(self, msg_type: int, body: bytes) -> None:
        def do() -> None:
            event_id = self.device.enqueue(msg_type, body)
            with self._lock:
                self.sent[event_id] = body
                if len(self.sent) > SENT_KEPT:
                    del self.sent[next(iter(self.sent))]
        self._calls.put(do)

    def unplug(self) -> None:
        """The USB cable is pulled: the pty disappears; queued events stay in the device."""
        def do() -> None:
            self._plugged = False
            self.pty.close()
            for line in (self._tx, self._rx):  # what was on the cable is gone with it
                if line is not None:
                    line.clear()
        self._calls.put(do)

    def replug(self) -> None:
        def do() -> None:
            self.pty = Pty(self._link)
            self._plugged = True
            self.device.reboot(time.monotonic())
        self._calls.put(do)

    def freeze(self) -> None:
        """The firmware hangs: the device neither reads nor writes until :meth:`thaw`."""
        self._calls.put(lambda: setattr(self, "_frozen", True))

    def thaw(self) -> None:
        self._calls.put(lambda: setattr(self, "_frozen", False))

    def reboot(self) -> None:
        self._calls.put(lambda: self.device.reboot(time.monotonic()))

    def acked(self) -> list[int]:
        with self._lock:
            return list(self.device.acked_ids)

    def forget_acked(self) -> None:
        """Drop the ids of acknowledged events kept so far (their count stays in
        ``device.stats.acked``): a simulator that runs for days keeps no growing list."""
        def do() -> None:
            with self._lock:
                self.device.acked_ids.clear()
        self._calls.put(do)

    def queued(self) -> int:
        return len(self.device.queue)

    def _run(self) -> None:
        while not self._stop.is_set():
            while True:
                try:
                    self._calls.get_nowait()()
                except queue.Empty:
                    break
            if not self._plugged or self._frozen:
                self._stop.wait(TICK_S)
                continue
            now = time.monotonic()
            wait = TICK_S
            for line in (self._tx, self._rx):
                if line is not None and line.next_at is not None:
                    wait = min(wait, max(line.next_at - now, 0.0002))
            try:
                readable, _, _ = select.select([self.pty.master], [], [], wait)
                now = time.monotonic()
                data = os.read(self.pty.master, 4096) if readable else b""
                if self._rx is not None:
                    self._rx.put(data, now)
                    data = self._rx.due(now)
                if data:
                    with self._lock:
                        self.device.receive_data(self.from_host.apply(data), now)
            except OSError:
                pass  # nobody holds the slave side yet
            with self._lock:
                self.device.tick(time.monotonic())
                out = self.device.data_to_send()
            if out:
                self._write(self.to_host.apply(out))
            if self._tx is not None:
                self._write_now(self._tx.due(time.monotonic()))

    def _write(self, data: bytes) -> None:
        if self._tx is not None:
            self._tx.put(data, time.monotonic())
        elif self.byte_delay_s:
            for i in range(len(data)):
                self._write_now(data[i : i + 1])
                if self._stop.wait(self.byte_delay_s):
                    return  # stopping: the rest of the write is lost, as at power-off
        else:
            self._write_now(data)

    def _write_now(self, data: bytes) -> None:
        # like a UART with nobody listening: the bytes are lost, the link resends
        if data:
            with contextlib.suppress(OSError):
                os.write(self.pty.master, data)


class PacedLine:
    """One direction of a UART line at *baudrate* (8N1): bytes put on it at some time come
    out, in pieces of :data:`UART_FIFO`, when their last bit would have arrived; bytes put
    while the line is busy queue behind (bounded by what the device sends: its window)."""

    def __init__(self, baudrate: int) -> None:
        self._byte_s = BITS_PER_BYTE / baudrate
        self._free_at = 0.0  # when the line has carried everything put on it
        self._pieces: deque[tuple[float, bytes]] = deque()

    @property
    def next_at(self) -> float | None:
        return self._pieces[0][0] if self._pieces else None

    def put(self, data: bytes, now: float) -> None:
        at = max(self._free_at, now)
        for start in range(0, len(data), UART_FIFO):
            piece = data[start : start + UART_FIFO]
            at += len(piece) * self._byte_s
            self._pieces.append((at, piece))
        self._free_at = at

    def clear(self) -> None:
        self._pieces.clear()

    def due(self, now: float) -> bytes:
        out = bytearray()
        while self._pieces and self._pieces[0][0] <= now:
            out += self._pieces.popleft()[1]
        return bytes(out)
