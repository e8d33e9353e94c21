"""Ankle-tag receiver: beacon messages become readings (sans-IO).

Message BEACON (msg_type 0x01) body, little-endian (docs/serial-protocol.md):
``tag_id u32 | counter u32 | battery_pct u8 | flags u8 | rssi i8 | mac[8]``.
Flags: bit 0 strap closed, bit 1 body contact. The MAC is a truncated AES-CMAC
under the tag's pairing key over ``tag_id | counter | battery | flags``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from buffer.record import JSON, Reading, Source
from firmware_bridge.link import Message
from firmware_bridge.messages import Hello, PayloadError

MSG_BEACON = 0x01
FLAG_STRAP_CLOSED = 0x01
FLAG_BODY_CONTACT = 0x02
MAC_BYTES = 8
_BEACON = struct.Struct("<IIBBb")


class TagRejection(enum.Enum):
    MALFORMED = "malformed"
    UNKNOWN_MESSAGE = "unknown_message"


@dataclass(frozen=True, slots=True)
class Beacon:
    tag_id: int
    counter: int
    battery_pct: int
    flags: int
    rssi_dbm: int
    mac: bytes = b"\x00" * MAC_BYTES

    def signed_part(self) -> bytes:
        return struct.pack("<IIBB", self.tag_id, self.counter, self.battery_pct, self.flags)

    def to_bytes(self) -> bytes:
        return (
            _BEACON.pack(self.tag_id, self.counter, self.battery_pct, self.flags, self.rssi_dbm)
            + self.mac
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Beacon:
        if len(raw) != _BEACON.size + MAC_BYTES:
            raise PayloadError("BEACON", raw)
        tag_id, counter, battery, flags, rssi = _BEACON.unpack_from(raw)
        if battery > 100:
            raise PayloadError("BEACON", raw)
        return cls(tag_id, counter, battery, flags, rssi, bytes(raw[_BEACON.size :]))

    @property
    def tag_ref(self) -> str:
        return f"T{self.tag_id:08X}"


@dataclass
class TagStats:
    beacons: int = 0
    rejected: dict[str, int] | None = None

    def reject(self, why: TagRejection) -> None:
        if self.rejected is None:
            self.rejected = {}
        self.rejected[why.value] = self.rejected.get(why.value, 0) + 1


class TagReceiverDriver:
    """Turns the receiver's messages into readings; the last one carries the device event."""

    def __init__(self) -> None:
        self.stats = TagStats()

    def on_message(self, msg: Message, hello: Hello, mono_ns: int) -> list[Reading]:
        source = Source("tag_receiver", hello.serial, hello.firmware_text)
        event = (msg.serial, msg.event_id)
        if msg.msg_type != MSG_BEACON:
            self.stats.reject(TagRejection.UNKNOWN_MESSAGE)
            return [_device_error(source, msg, "unknown_message", mono_ns, event)]
        try:
            beacon = Beacon.from_bytes(msg.body)
        except PayloadError:
            self.stats.reject(TagRejection.MALFORMED)
            return [_device_error(source, msg, "malformed", mono_ns, event)]
        self.stats.beacons += 1
        body: dict[str, JSON] = {
            "tag": beacon.tag_ref,
            "counter": beacon.counter,
            "battery_pct": beacon.battery_pct,
            "strap_closed": bool(beacon.flags & FLAG_STRAP_CLOSED),
            "body_contact": bool(beacon.flags & FLAG_BODY_CONTACT),
            "rssi_dbm": beacon.rssi_dbm,
            "dev_event": msg.event_id,
        }
        return [Reading("tag.presence", source, body, mono_ns, event)]


def _device_error(
    source: Source, msg: Message, why: str, mono_ns: int, event: tuple[str, int]
) -> Reading:
    """A message we cannot read is still evidence: it is recorded, raw, never dropped."""
    body: dict[str, JSON] = {
        "error": why,
        "msg_type": msg.msg_type,
        "raw": msg.body.hex(),
        "dev_event": msg.event_id,
    }
    return Reading("device.error", source, body, mono_ns, event)
