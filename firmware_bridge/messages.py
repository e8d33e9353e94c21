"""Payloads of the link-level frames (docs/serial-protocol.md, section "Frames").

Each payload is a frozen dataclass with ``to_bytes`` and ``from_bytes``;
``from_bytes`` raises :class:`PayloadError` (carrying the bytes) on a payload
that does not fit its layout. All integers are little-endian.

Versions: the first 10 + n bytes of HELLO and the first 3 bytes of HELLO_ACK are the
same in every version. From version 2 on, HELLO carries the features the device
offers and an accepting HELLO_ACK those the host grants (:class:`Feature`): a later
capability adds a feature bit, not a protocol version.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

#: The highest version of the link protocol this host speaks.
PROTOCOL_VERSION = 2
#: The first version whose HELLO and HELLO_ACK carry features.
FEATURES_VERSION = 2
#: Versions this host serves: every version up to its own.
SUPPORTED_VERSIONS = frozenset({1, 2})


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
    #: version 2: a known class, but not the one this port serves
    WRONG_CLASS = 3


class Feature(enum.IntFlag):
    """Features of the link, negotiated in HELLO / HELLO_ACK (version 2 on): a u32 bit set.

    A device offers what it implements; the host grants the subset it implements too;
    both then use exactly the granted set. An unknown bit is ignored, never refused.
    """

    NONE = 0
    #: several DATA frames in flight, cumulative commit-ACK, RECEIPT (section 9.8)
    WINDOW = 1 << 0
    #: reserved: firmware image transfer from the host to the device
    FIRMWARE = 1 << 1


class NakReason(enum.IntEnum):
    BAD_FRAME = 1
    NOT_READY = 2
    #: WINDOW: a DATA frame arrived past a missing one (the device resends the oldest)
    GAP = 3


_HELLO = struct.Struct("<BBBBBIB")
_HELLO_ACK = struct.Struct("<BBB")
_FEATURES = struct.Struct("<I")
_DATA = struct.Struct("<IB")
_ACK = struct.Struct("<I")
_NAK = struct.Struct("<B")
_HEARTBEAT = struct.Struct("<IH")
#: WINDOW, appended to HELLO after ``features``: the device's window and its head's id
_HELLO_WINDOW = struct.Struct("<BI")
#: WINDOW, appended to HELLO_ACK after ``features``: the window granted
_ACK_WINDOW = struct.Struct("<B")
#: The largest window a frame can name (a u8).
WINDOW_LIMIT = 0xFF


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO. ``features`` is sent from version 2 on (a version-1 HELLO has none); the
    bytes a later version appends after the fields of version 2 are ignored here. A
    HELLO of version 2 offering :attr:`Feature.WINDOW` carries two more fields: ``window``
    (the most DATA frames the device keeps unacknowledged, 1..255) and ``next_id`` (the
    id of the oldest event it holds, or of its next event when it holds none)."""

    protocol_version: int
    device_class: int
    firmware: tuple[int, int, int]
    boot_count: int
    serial: str
    features: int = 0
    window: int = 0
    next_id: int = 0

    @property
    def offers_window(self) -> bool:
        return self.protocol_version == FEATURES_VERSION and bool(self.features & Feature.WINDOW)

    def to_bytes(self) -> bytes:
        serial = self.serial.encode("ascii")
        head = _HELLO.pack(
            self.protocol_version, self.device_class, *self.firmware,
            self.boot_count, len(serial),
        ) + serial
        if self.protocol_version < FEATURES_VERSION:
            return head
        head += _FEATURES.pack(self.features)
        if self.offers_window:
            head += _HELLO_WINDOW.pack(self.window, self.next_id)
        return head

    @classmethod
    def from_bytes(cls, raw: bytes) -> Hello:
        if len(raw) < _HELLO.size:
            raise PayloadError("HELLO", raw)
        ver, dclass, fw_a, fw_b, fw_c, boot, n = _HELLO.unpack_from(raw)
        end = _HELLO.size + n
        serial = raw[_HELLO.size : end]
        if len(serial) != n or not n:
            raise PayloadError("HELLO", raw)
        try:
            text = serial.decode("ascii")
        except UnicodeDecodeError:
            raise PayloadError("HELLO", raw) from None
        if not text.isprintable():
            raise PayloadError("HELLO", raw)
        features = _features(ver, raw, end)
        if ver == FEATURES_VERSION and features & Feature.WINDOW:
            window, next_id = _HELLO_WINDOW.unpack_from(raw, end + _FEATURES.size)
            if not window:
                raise PayloadError("HELLO", raw)
            return cls(ver, dclass, (fw_a, fw_b, fw_c), boot, text, features, window, next_id)
        return cls(ver, dclass, (fw_a, fw_b, fw_c), boot, text, features)

    @property
    def firmware_text(self) -> str:
        return ".".join(str(part) for part in self.firmware)


def _features(version: int, raw: bytes, end: int) -> int:
    """The features field after the serial: none in version 1, exactly one u32 in
    version 2 (followed by the window fields when it offers WINDOW), at least one in a
    later version (whose further fields are ignored)."""
    rest = len(raw) - end
    if version < FEATURES_VERSION:
        if rest:
            raise PayloadError("HELLO", raw)
        return 0
    if rest < _FEATURES.size:
        raise PayloadError("HELLO", raw)
    (features,) = _FEATURES.unpack_from(raw, end)
    if version == FEATURES_VERSION:
        extra = _HELLO_WINDOW.size if features & Feature.WINDOW else 0
        if rest != _FEATURES.size + extra:
            raise PayloadError("HELLO", raw)
    return int(features)


@dataclass(frozen=True, slots=True)
class HelloAck:
    """HELLO_ACK: 3 bytes, or 7 when it accepts a HELLO of version 2 or later (then it
    carries the granted ``features``; ``None`` means the 3-byte form), or 8 when the
    features granted include :attr:`Feature.WINDOW` (then ``window``, 1..255, follows)."""

    protocol_version: int
    result: HelloResult
    heartbeat_s: int
    features: int | None = None
    window: int = 0

    def to_bytes(self) -> bytes:
        head = _HELLO_ACK.pack(self.protocol_version, self.result, self.heartbeat_s)
        if self.features is None:
            return head
        head += _FEATURES.pack(self.features)
        if self.features & Feature.WINDOW:
            head += _ACK_WINDOW.pack(self.window)
        return head

    @classmethod
    def from_bytes(cls, raw: bytes) -> HelloAck:
        if len(raw) < _HELLO_ACK.size:
            raise PayloadError("HELLO_ACK", raw)
        ver, result, hb = _HELLO_ACK.unpack_from(raw)
        features, window = None, 0
        if len(raw) > _HELLO_ACK.size:
            if len(raw) < _HELLO_ACK.size + _FEATURES.size:
                raise PayloadError("HELLO_ACK", raw)
            (features,) = _FEATURES.unpack_from(raw, _HELLO_ACK.size)
        size = _HELLO_ACK.size
        if features is not None:
            size += _FEATURES.size
            if features & Feature.WINDOW:
                size += _ACK_WINDOW.size
                if len(raw) == size:
                    (window,) = _ACK_WINDOW.unpack_from(raw, size - _ACK_WINDOW.size)
                if not window:
                    raise PayloadError("HELLO_ACK", raw)
        if len(raw) != size:
            raise PayloadError("HELLO_ACK", raw)
        try:
            return cls(ver, HelloResult(result), hb, features, window)
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
class Receipt:
    """RECEIPT (WINDOW only): the host holds this event; its commit-ACK will follow."""

    event_id: int

    def to_bytes(self) -> bytes:
        return _ACK.pack(self.event_id)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Receipt:
        if len(raw) != _ACK.size:
            raise PayloadError("RECEIPT", raw)
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
