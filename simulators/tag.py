"""The ankle-tag receiver simulator: tags beaconing through a receiver on a pty."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC

from drivers.tag_receiver import FLAG_BODY_CONTACT, FLAG_STRAP_CLOSED, MAC_BYTES, MSG_BEACON, Beacon
from firmware_bridge.messages import DeviceClass
from simulators.device import FramedDeviceSim
from simulators.pty import Faults


def beacon_mac(key: bytes, signed_part: bytes) -> bytes:
    mac = CMAC(AES(key))
    mac.update(signed_part)
    return mac.finalize()[:MAC_BYTES]


@dataclass
class SimTag:
    tag_id: int
    key: bytes
    counter: int = 0
    battery_pct: int = 90
    strap_closed: bool = True
    body_contact: bool = True

    def beacon(self, rssi: int = -60) -> Beacon:
        self.counter += 1
        flags = (FLAG_STRAP_CLOSED if self.strap_closed else 0) | (
            FLAG_BODY_CONTACT if self.body_contact else 0)
        b = Beacon(self.tag_id, self.counter, self.battery_pct, flags, rssi)
        return Beacon(b.tag_id, b.counter, b.battery_pct, b.flags, b.rssi_dbm,
                      beacon_mac(self.key, b.signed_part()))


class TagReceiverSim(FramedDeviceSim):
    def __init__(self, serial: str = "TR-0001", *, tags: list[SimTag] | None = None,
                 link: Path | None = None, to_host: Faults | None = None,
                 from_host: Faults | None = None, byte_delay_s: float = 0.0) -> None:
        super().__init__(DeviceClass.TAG_RECEIVER, serial, link=link, to_host=to_host,
                         from_host=from_host, byte_delay_s=byte_delay_s)
        self.tags = tags or [SimTag(0x1001, bytes(16))]
        self._beat_stop = threading.Event()

    def send_beacon(self, tag: SimTag | None = None) -> None:
        tag = tag or self.tags[0]
        self.enqueue(MSG_BEACON, tag.beacon().to_bytes())

    def beacon_round(self) -> None:
        for tag in self.tags:
            self.send_beacon(tag)
