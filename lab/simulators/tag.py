"""The ankle-tag receiver simulator: tags beaconing through a receiver on a pty.

Fault injection beyond the wire (see :class:`lab.wire.Damage`): a spoofing
tag (right id, wrong key) and a replaying tag (an old beacon sent again).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from core.devices import tag_ref
from drivers.tag_receiver import (
    FLAG_BODY_CONTACT,
    FLAG_STRAP_CLOSED,
    MSG_BEACON,
    Beacon,
    beacon_mac,
)
from firmware_bridge.messages import PROTOCOL_VERSION, DeviceClass
from lab.simulators.device import FramedDeviceSim
from lab.simulators.pty import SerialEnd
from lab.wire import Damage

#: Beacons a simulated tag remembers for replays (the newest).
HISTORY_KEPT = 1000


@dataclass
class SimTag:
    tag_id: int
    key: bytes
    counter: int = 0
    battery_pct: int = 90
    strap_closed: bool = True
    body_contact: bool = True
    history: deque[Beacon] = field(default_factory=lambda: deque(maxlen=HISTORY_KEPT),
                                   repr=False)

    @property
    def tag(self) -> str:
        """The tag's reference, as paired ("T" + 8 hex digits)."""
        return tag_ref(self.tag_id)

    def beacon(self, rssi: int = -60) -> Beacon:
        """The next beacon, signed under the tag's key (kept in :attr:`history`)."""
        self.counter += 1
        flags = (FLAG_STRAP_CLOSED if self.strap_closed else 0) | (
            FLAG_BODY_CONTACT if self.body_contact else 0)
        b = Beacon(self.tag_id, self.counter, self.battery_pct, flags, rssi)
        signed = Beacon(b.tag_id, b.counter, b.battery_pct, b.flags, b.rssi_dbm,
                        beacon_mac(self.key, b.signed_part()))
        self.history.append(signed)
        return signed

    def forged(self, rssi: int = -55) -> Beacon:
        """A beacon with this tag's id and a fresh counter, signed with the wrong key."""
        b = Beacon(self.tag_id, self.counter + 1, self.battery_pct,
                   FLAG_STRAP_CLOSED | FLAG_BODY_CONTACT, rssi)
        return Beacon(b.tag_id, b.counter, b.battery_pct, b.flags, b.rssi_dbm,
                      beacon_mac(bytes(16) if self.key != bytes(16) else b"\x01" * 16,
                                 b.signed_part()))


class TagReceiverSim(FramedDeviceSim):
    def __init__(self, serial: str = "TR-0001", *, tags: list[SimTag] | None = None,
                 link: Path | None = None, to_host: Damage | None = None,
                 from_host: Damage | None = None, byte_delay_s: float = 0.0,
                 firmware: tuple[int, int, int] = (1, 0, 0),
                 end: SerialEnd | None = None, protocol_version: int = PROTOCOL_VERSION,
                 window: int = 0, baudrate: int | None = None) -> None:
        super().__init__(DeviceClass.TAG_RECEIVER, serial, link=link, firmware=firmware,
                         to_host=to_host, from_host=from_host, byte_delay_s=byte_delay_s,
                         end=end, protocol_version=protocol_version, window=window,
                         baudrate=baudrate)
        self.tags = tags or [SimTag(0x1001, bytes(16))]

    def send_beacon(self, tag: SimTag | None = None, rssi: int = -60) -> None:
        tag = tag or self.tags[0]
        self.enqueue(MSG_BEACON, tag.beacon(rssi).to_bytes())

    def send_forged(self, tag: SimTag | None = None) -> None:
        self.enqueue(MSG_BEACON, (tag or self.tags[0]).forged().to_bytes())

    def send_replay(self, tag: SimTag | None = None, index: int = 0) -> None:
        """Send again a beacon the tag sent before (a recorded-and-replayed radio frame)."""
        self.enqueue(MSG_BEACON, (tag or self.tags[0]).history[index].to_bytes())


if __name__ == "__main__":  # the same as: python -m lab.simulators tag
    import sys

    from lab.simulators.cli import main

    sys.exit(main(["tag", *sys.argv[1:]]))
