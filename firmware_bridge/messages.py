"""Payloads of the link-level frames (docs/serial-protocol.md, section "Frames").

Each payload is a frozen dataclass with ``to_bytes`` and ``from_bytes``;
``from_bytes`` raises :class:`PayloadError` (carrying the bytes) on a payload
that does not fit its layout. All integers are little-endian.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

#: Version of the link protocol this host speaks.
PROTOCOL_VERSION = 1


class PayloadError(ValueError):
    """A frame payload does not match the layout of its frame type."""

    def __init__(self, what: str, raw: bytes) -> None:
        super().__init__(f"malformed {what} payload ({len(raw)} bytes: {raw[:32].hex(' ')})")
        self.raw = raw


class DeviceClass(enum.IntEnum):
    TAG_RECEIVER = 1
    KIOSK = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class HelloResult(enum.IntEnum):
    OK = 0
    UNSUPPORTED_VERSION = 1
    UNKNOWN_CLASS = 2


class NakReason(enum.IntEnum):
    BAD_FRAME = 1
    NOT_READY = 2


_HELLO = struct.Struct("<BBBBBIB")
_HELLO_ACK = struct.Struct("<BBB")
_DATA = struct.Struct("<IB")
_ACK = struct.Struct("<I")
_NAK = struct.Struct("<B")
_HEARTBEAT = struct.Struct("<IH")


@dataclass(frozen=True, slots=True)
class Hello:
    protocol_version: int
    device_class: int
    firmware: tuple[int, int, int]
    boot_count: int
    serial: str

    def to_bytes(self) -> bytes:
        serial = self.serial.encode("ascii")
        return (
            _HELLO.pack(
                self.protocol_version, self.device_class, *self.firmware,
                self.boot_count, len(serial),
            )
            + serial
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Hello:
        if len(raw) < _HELLO.size:
            raise PayloadError("HELLO", raw)
        ver, dclass, fw_a, fw_b, fw_c, boot, n = _HELLO.unpack_from(raw)
        serial = raw[_HELLO.size :]
        if len(serial) != n or not n:
            raise PayloadError("HELLO", raw)
        try:
            text = serial.decode("ascii")
        except UnicodeDecodeError:
            raise PayloadError("HELLO", raw) from None
        if not text.isprintable():
            raise PayloadError("HELLO", raw)
        return cls(ver, dclass, (fw_a, fw_b, fw_c), boot, text)

    @property
    def firmware_text(self) -> str:
        return ".".join(str(part) for part in self.firmware)


@dataclass(frozen=True, slots=True)
class HelloAck:
    protocol_version: int
    result: HelloResult
    heartbeat_s: int

    def to_bytes(self) -> bytes:
        return _HELLO_ACK.pack(self.protocol_version, self.result, self.heartbeat_s)

    @classmethod
    def from_bytes(cls, raw: bytes) -> HelloAck:
        if len(raw) != _HELLO_ACK.size:
            raise PayloadError("HELLO_ACK", raw)
        ver, result, hb = _HELLO_ACK.unpack(raw)
        try:
            return cls(ver, HelloResult(result), hb)
        except ValueError:
            raise PayloadError("HELLO_ACK", raw) from None


@dataclass(frozen=True, slots=True)
class Data:
    event_id: int
    msg_type: int
    body: bytes

    def to_bytes(self) -> bytes:
        return _DATA.pack(self.event_id, self.msg_type) + self.body

    @classmethod
    def from_bytes(cls, raw: bytes) -> Data:
        if len(raw) < _DATA.size:
            raise PayloadError("DATA", raw)
        event_id, msg_type = _DATA.unpack_from(raw)
        return cls(event_id, msg_type, bytes(raw[_DATA.size :]))


@dataclass(frozen=True, slots=True)
class Ack:
    event_id: int

    def to_bytes(self) -> bytes:
        return _ACK.pack(self.event_id)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Ack:
        if len(raw) != _ACK.size:
            raise PayloadError("ACK", raw)
        return cls(*_ACK.unpack(raw))


@dataclass(frozen=True, slots=True)
class Nak:
    reason: int

    def to_bytes(self) -> bytes:
        return _NAK.pack(self.reason)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Nak:
        if len(raw) != _NAK.size:
            raise PayloadError("NAK", raw)
        return cls(*_NAK.unpack(raw))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    uptime_s: int
    queued: int

    def to_bytes(self) -> bytes:
        return _HEARTBEAT.pack(self.uptime_s, self.queued)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Heartbeat:
        if len(raw) != _HEARTBEAT.size:
            raise PayloadError("HEARTBEAT", raw)
        return cls(*_HEARTBEAT.unpack(raw))
