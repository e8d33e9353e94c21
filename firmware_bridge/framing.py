"""Frame format of the SmartCorr device serial protocol (docs/serial-protocol.md).

Sans-IO: nothing here opens a port. Two layers, each with one job:

* delimiting: COBS-encoded frames, each followed by one 0x00 byte. A 0x00 never
  occurs inside an encoded frame, so the receiver resynchronises on the next
  0x00 whatever garbage came before it.
* frame format: ``type u8 | seq u8 | payload | crc32 u32 little-endian``, the
  CRC (IEEE 802.3, as ``zlib.crc32``) covering type, seq and payload.

:class:`FrameDecoder` is fed raw bytes and returns decoded :class:`Frame` objects
and :class:`BadFrame` reports. It never raises on input and never holds more than
:data:`MAX_ENCODED_FRAME` bytes of an incomplete frame.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field

DELIMITER = 0x00
#: Largest payload of one frame, in bytes.
MAX_PAYLOAD = 240
#: type + seq + payload + crc
MAX_FRAME = 2 + MAX_PAYLOAD + 4
#: COBS adds one byte per 254 bytes, plus one.
MAX_ENCODED_FRAME = MAX_FRAME + MAX_FRAME // 254 + 1
_HEADER = struct.Struct("<BB")
_CRC = struct.Struct("<I")
_MIN_FRAME = _HEADER.size + _CRC.size


class FrameType(enum.IntEnum):
    """Frame types; values as in docs/serial-protocol.md."""

    HELLO = 0x01
    HELLO_ACK = 0x02
    HELLO_REQ = 0x03
    DATA = 0x10
    ACK = 0x11
    NAK = 0x12
    RECEIPT = 0x13
    HEARTBEAT = 0x20


class FramingError(Exception):
    """A frame could not be built (a local error: the caller passed bad values)."""


class BadFrameReason(enum.Enum):
    OVERSIZE = "oversize"
    COBS = "cobs"
    SHORT = "short"
    CRC = "crc"
    UNKNOWN_TYPE = "unknown_type"


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    seq: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.seq <= 0xFF:
            raise FramingError(f"seq {self.seq} out of range 0..255")
        if len(self.payload) > MAX_PAYLOAD:
            raise FramingError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")

    def to_bytes(self) -> bytes:
        """Encode to wire bytes, delimiter included."""
        raw = _HEADER.pack(self.type, self.seq) + self.payload
        raw += _CRC.pack(zlib.crc32(raw))
        return cobs_encode(raw) + bytes((DELIMITER,))

    @classmethod
    def from_body(cls, raw: bytes) -> Frame | BadFrame:
        """Decode one un-stuffed frame body (without delimiter)."""
        if len(raw) < _MIN_FRAME:
            return BadFrame(BadFrameReason.SHORT, raw)
        body, (crc,) = raw[: -_CRC.size], _CRC.unpack(raw[-_CRC.size :])
        if zlib.crc32(body) != crc:
            return BadFrame(BadFrameReason.CRC, raw)
        type_, seq = _HEADER.unpack_from(body)
        try:
            ftype = FrameType(type_)
        except ValueError:
            return BadFrame(BadFrameReason.UNKNOWN_TYPE, raw)
        return cls(ftype, seq, bytes(body[_HEADER.size :]))


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A delimited chunk of bytes that is not a valid frame."""

    reason: BadFrameReason
    raw: bytes


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999), standard form."""
    out = bytearray()
    blocks = data.split(b"\x00")
    for index, run in enumerate(blocks):
        block = run
        last = index == len(blocks) - 1
        # a zero-free run is cut into chunks of 254 bytes, each behind code 0xFF
        while len(block) >= 0xFE:
            out.append(0xFF)
            out += block[:0xFE]
            block = block[0xFE:]
            if not block and last:
                return bytes(out)
        out.append(len(block) + 1)
        out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes | None:
    """Inverse of :func:`cobs_encode`; ``None`` when *data* is not valid COBS."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        end = i + code
        if code == 0 or end > n:
            return None
        out += data[i + 1 : end]
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


@dataclass
class DecoderStats:
    frames: int = 0
    bad_frames: int = 0
    garbage_bytes: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)


class FrameDecoder:
    """Turns a byte stream into frames; resynchronises on every delimiter."""

    def __init__(self, max_encoded: int = MAX_ENCODED_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_encoded
        self._discarding = False
        self.stats = DecoderStats()

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        out: list[Frame | BadFrame] = []
        start = 0
        while True:
            end = data.find(DELIMITER, start)
            chunk = data[start:] if end < 0 else data[start:end]
            if self._discarding:
                self.stats.garbage_bytes += len(chunk)
            else:
                self._buf += chunk
                if len(self._buf) > self._max:
                    self.stats.garbage_bytes += len(self._buf)
                    out.append(self._bad(BadFrameReason.OVERSIZE, bytes(self._buf[:64])))
                    self._buf.clear()
                    self._discarding = True
            if end < 0:
                return out
            if not self._discarding and self._buf:
                out.append(self._decode(bytes(self._buf)))
            self._buf.clear()
            self._discarding = False
            start = end + 1

    def _decode(self, encoded: bytes) -> Frame | BadFrame:
        raw = cobs_decode(encoded)
        if raw is None:
            self.stats.garbage_bytes += len(encoded)
            return self._bad(BadFrameReason.COBS, encoded)
        result = Frame.from_body(raw)
        if isinstance(result, BadFrame):
            self.stats.garbage_bytes += len(encoded)
            return self._bad(result.reason, result.raw)
        self.stats.frames += 1
        return result

    def _bad(self, reason: BadFrameReason, raw: bytes) -> BadFrame:
        self.stats.bad_frames += 1
        self.stats.by_reason[reason.value] += 1
        return BadFrame(reason, raw)
