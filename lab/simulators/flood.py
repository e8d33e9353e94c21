"""A hostile or broken framed device on a pty: it floods the gateway.

It speaks the documented frames (``firmware_bridge.framing``) but not the device's
manners (``firmware_bridge.device``):

* ``data``: after its handshake it ignores stop-and-wait and writes DATA frames,
  each a new event (a genuine beacon of one paired tag, counter ever increasing), as
  fast as the pty takes them;
* ``unknown``: the same with beacons of random tags nobody paired;
* ``hello``: it sends HELLO again and again (a reboot loop), its boot count rising.

It reads and decodes what the gateway sends (so the gateway's writes never block)
and counts HELLO_ACKs and ACKs; the ids of the ACKed events are kept compactly, so
a test can check that each of them was recorded. ``python -m lab.simulators.flood``
runs one in its own process (the bench's device) and prints its counts as JSON.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import random
import select
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from drivers.mac import MAC_BYTES
from drivers.tag_receiver import MSG_BEACON, Beacon
from firmware_bridge.framing import Frame, FrameDecoder, FrameType
from firmware_bridge.messages import PROTOCOL_VERSION, Ack, Data, DeviceClass, Hello
from lab.simulators.pty import PtySim
from lab.simulators.tag import SimTag

Mode = Literal["data", "unknown", "hello"]
MODES: tuple[Mode, ...] = ("data", "unknown", "hello")
#: Bytes of frames prepared ahead of the pty: one write's worth.
CHUNK_BYTES = 16_384
#: The device's wait for a HELLO_ACK before it says HELLO again, seconds.
HELLO_RETRY_S = 0.5
TICK_S = 0.01


@dataclass
class FloodStats:
    frames_sent: int = 0
    bytes_sent: int = 0
    hello_acks: int = 0
    acks: int = 0
    naks: int = 0


class FloodingDeviceSim(PtySim):
    """Sends until *frames* frames went out (None: until stopped)."""

    def __init__(self, serial: str = "TR-FLOOD-1", *, mode: Mode = "data",
                 tag: SimTag | None = None, frames: int | None = None,
                 link: Path | None = None, seed: int = 1) -> None:
        super().__init__(serial, link)
        self.mode = mode
        self.tag = tag or SimTag(0x00F1_00D0, bytes(16))
        self.limit = frames
        self.stats = FloodStats()
        self.acked_ids = array.array("I")  # 4 bytes per ACKed event
        self.done = threading.Event()  # every frame asked for was written
        self._hello = Hello(PROTOCOL_VERSION, DeviceClass.TAG_RECEIVER, (9, 9, 9), 1, serial)
        self._random = random.Random(seed)
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._seq = 0
        self._next_event = 1
        self._up = False
        self._hello_at = -HELLO_RETRY_S

    # -- what goes out -------------------------------------------------------------
    def _frame(self, ftype: FrameType, payload: bytes) -> None:
        self._out += Frame(ftype, self._seq, payload).to_bytes()
        self._seq = (self._seq + 1) & 0xFF
        self.stats.frames_sent += 1

    def _beacon(self) -> bytes:
        if self.mode == "unknown":
            tag_id = self._random.getrandbits(32)
            return Beacon(tag_id, 1, 50, 0x03, -70, self._random.randbytes(MAC_BYTES)).to_bytes()
        return self.tag.beacon().to_bytes()

    def _fill(self, now: float) -> None:
        """Prepare the next chunk of frames (nothing while the handshake is pending)."""
        while len(self._out) < CHUNK_BYTES and not self._limit_reached():
            if self.mode == "hello":
                self._hello = Hello(PROTOCOL_VERSION, self._hello.device_class,
                                    self._hello.firmware, self._hello.boot_count + 1,
                                    self._hello.serial)
                self._frame(FrameType.HELLO, self._hello.to_bytes())
                continue
            if not self._up:
                if now - self._hello_at >= HELLO_RETRY_S:
                    self._hello_at = now
                    self._frame(FrameType.HELLO, self._hello.to_bytes())
                return
            event_id, self._next_event = self._next_event, self._next_event + 1
            self._frame(FrameType.DATA, Data(event_id, MSG_BEACON, self._beacon()).to_bytes())

    def _limit_reached(self) -> bool:
        return self.limit is not None and self.stats.frames_sent >= self.limit

    # -- what comes in -------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        for item in self._decoder.feed(data):
            if not isinstance(item, Frame):
                continue
            if item.type is FrameType.HELLO_ACK:
                self.stats.hello_acks += 1
                self._up = True
            elif item.type is FrameType.HELLO_REQ:
                self._up = False
                self._hello_at = -HELLO_RETRY_S
            elif item.type is FrameType.ACK:
                self.stats.acks += 1
                with contextlib.suppress(ValueError):
                    self.acked_ids.append(Ack.from_bytes(item.payload).event_id)
            elif item.type is FrameType.NAK:
                self.stats.naks += 1

    # -- the thread ----------------------------------------------------------------
    def _run(self) -> None:
        master = self.pty.master
        while not self._stop.is_set():
            self._fill(time.monotonic())
            if not self._out and self._limit_reached():
                self.done.set()
            writable = [master] if self._out else []
            try:
                readable, can_write, _ = select.select([master], writable, [], TICK_S)
                if readable:
                    self._receive(os.read(master, 65_536))
                if can_write:
                    n = os.write(master, self._out)
                    self.stats.bytes_sent += n
                    del self._out[:n]
            except BlockingIOError:
                continue  # the pty is full: the gateway is not reading
            except OSError:
                self._stop.wait(TICK_S)  # nobody holds the slave side yet


def main(argv: list[str] | None = None) -> int:
    """One flooding device in this process until *--seconds* pass; its counts as JSON."""
    ap = argparse.ArgumentParser(prog="python -m lab.simulators.flood",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--link", type=Path, required=True,
                    help="the stable path to create: a symbolic link to the pty served")
    ap.add_argument("--mode", choices=MODES, default="data",
                    help="data: beacons of one paired tag without waiting for ACKs; unknown: "
                         "beacons of random unpaired tags; hello: HELLO again and again "
                         "(default data)")
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="how long to flood, then print the counts as JSON (default 30)")
    ap.add_argument("--tag-id", type=lambda v: int(v, 0), default=0x00F1_00D0,
                    help="the paired tag's id, e.g. 0xF100D0 (default)")
    ap.add_argument("--key", type=bytes.fromhex, default=bytes(16),
                    help="the paired tag's lab key, 32 hex digits (default 16 zero bytes; a "
                         "bench key, never a real tag's)")
    args = ap.parse_args(argv)
    sim = FloodingDeviceSim(mode=args.mode, tag=SimTag(args.tag_id, args.key), link=args.link)
    sim.start()
    print("ready", flush=True)
    try:
        time.sleep(args.seconds)
    finally:
        sim.stop()
    print(json.dumps({**asdict(sim.stats), "acked_events": len(sim.acked_ids)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
