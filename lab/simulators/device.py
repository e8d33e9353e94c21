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
#: A paced write this late (the simulator's thread was busy) still follows the previous
#: one without a pause, as a UART driver refilling its FIFO from a buffer would.
PACE_SLACK_S = 0.005
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
        self._byte_s = BITS_PER_BYTE / baudrate if baudrate else 0.0
        self._tx = bytearray()  # paced: bytes not yet on the line
        self._line_free = 0.0  # paced: when the line has sent everything written so far
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
            if self._tx:
                self._pace(now)
                wait = min(TICK_S, max(self._line_free - now, 0.0002)) if self._tx else TICK_S
            try:
                readable, _, _ = select.select([self.pty.master], [], [], wait)
                if readable:
                    data = os.read(self.pty.master, 4096)
                    with self._lock:
                        self.device.receive_data(self.from_host.apply(data), now)
            except OSError:
                pass  # nobody holds the slave side yet
            with self._lock:
                self.device.tick(time.monotonic())
                out = self.device.data_to_send()
            if out:
                self._write(self.to_host.apply(out))

    def _pace(self, now: float) -> None:
        """Put on the line what a UART at the configured rate has sent by now."""
        while self._tx and self._line_free <= now:
            piece = bytes(self._tx[:UART_FIFO])
            del self._tx[:UART_FIFO]
            # a UART fed in time sends without a pause; one fed late starts when fed
            start = self._line_free if now - self._line_free < PACE_SLACK_S else now
            self._line_free = start + len(piece) * self._byte_s
            self._write_now(piece)

    def _write(self, data: bytes) -> None:
        if self._byte_s:
            self._tx += data
            self._pace(time.monotonic())
        elif self.byte_delay_s:
            for i in range(len(data)):
                self._write_now(data[i : i + 1])
                if self._stop.wait(self.byte_delay_s):
                    return  # stopping: the rest of the write is lost, as at power-off
        else:
            self._write_now(data)

    def _write_now(self, data: bytes) -> None:
        # like a UART with nobody listening: the bytes are lost, the link resends
        with contextlib.suppress(OSError):
            os.write(self.pty.master, data)
