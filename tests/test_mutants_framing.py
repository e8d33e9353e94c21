"""Frame format and delimiting: what each bad frame reports, and the decoder's counters.

Found by mutation testing (docs/mutation.md): the reason and raw bytes of each bad frame,
and the counts a technician reads in the stats, could have been anything.
Raw frames are spaced by field (type | seq | payload | crc32 LE), wire bytes by COBS block.
"""

from __future__ import annotations

import struct
import zlib

import pytest

from firmware_bridge.framing import (
    MAX_ENCODED_FRAME,
    MAX_PAYLOAD,
    BadFrame,
    BadFrameReason,
    Frame,
    FrameDecoder,
    FrameType,
    FramingError,
    cobs_encode,
)

#: code 05 announces four bytes, one follows: not COBS
NOT_COBS = bytes.fromhex("05 01")
#: HELLO_REQ, seq 0, its CRC with the last byte changed
BAD_CRC_RAW = bytes.fromhex("03  00  3c 41 f4 6b")
#: type 0x7e (no such type), seq 5, a good CRC
UNKNOWN_BODY = bytes.fromhex("7e  05")
UNKNOWN_RAW = UNKNOWN_BODY + struct.pack("<I", zlib.crc32(UNKNOWN_BODY))
#: three bytes: shorter than type + seq + crc
SHORT_RAW = bytes.fromhex("01 02 03")
#: a good frame: HELLO_REQ, seq 0
HELLO_REQ_WIRE = bytes.fromhex("02 03  05 3c 41 f4 6a  00")


def wire(raw: bytes) -> bytes:
    return cobs_encode(raw) + b"\x00"


def test_each_bad_frame_reports_its_reason_and_its_bytes() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(NOT_COBS + b"\x00" + wire(BAD_CRC_RAW) + wire(UNKNOWN_RAW)
                       + wire(SHORT_RAW) + HELLO_REQ_WIRE)
    assert out == [
        BadFrame(BadFrameReason.COBS, NOT_COBS),  # the encoded bytes: they did not decode
        BadFrame(BadFrameReason.CRC, BAD_CRC_RAW),  # the decoded ones from here on
        BadFrame(BadFrameReason.UNKNOWN_TYPE, UNKNOWN_RAW),
        BadFrame(BadFrameReason.SHORT, SHORT_RAW),
        Frame(FrameType.HELLO_REQ, 0),
    ]


def test_stats_count_every_bad_frame_and_every_garbage_byte() -> None:
    decoder = FrameDecoder()
    decoder.feed(NOT_COBS + b"\x00" + NOT_COBS + b"\x00")
    decoder.feed(wire(BAD_CRC_RAW) + wire(BAD_CRC_RAW) + HELLO_REQ_WIRE)
    stats = decoder.stats
    assert stats.frames == 1
    assert stats.bad_frames == 4
    assert stats.by_reason == {"cobs": 2, "crc": 2}
    # encoded bytes of the bad frames, delimiters not counted
    assert stats.garbage_bytes == 2 * len(NOT_COBS) + 2 * len(cobs_encode(BAD_CRC_RAW))


def test_oversize_reports_the_first_64_bytes_and_counts_every_byte() -> None:
    decoder = FrameDecoder()
    decoder.feed(NOT_COBS + b"\x00")  # 2 garbage bytes before the flood
    flood = bytes(range(1, 256)) + bytes(range(1, 101))  # no delimiter in it
    assert len(flood) > MAX_ENCODED_FRAME
    out = decoder.feed(flood[:300])  # overflows here
    out += decoder.feed(flood[300:])  # discarded on the way to the delimiter
    out += decoder.feed(b"\x00" + HELLO_REQ_WIRE)
    assert out == [BadFrame(BadFrameReason.OVERSIZE, flood[:64]), Frame(FrameType.HELLO_REQ, 0)]
    assert decoder.stats.garbage_bytes == 2 + len(flood)
    assert decoder.stats.by_reason == {"cobs": 1, "oversize": 1}


def test_frame_refuses_bad_values_and_says_which() -> None:
    with pytest.raises(FramingError, match=r"^seq 256 out of range 0\.\.255$"):
        Frame(FrameType.DATA, 256)
    with pytest.raises(FramingError, match=r"^seq -1 out of range 0\.\.255$"):
        Frame(FrameType.DATA, -1)
    with pytest.raises(FramingError, match=rf"^payload of 241 bytes exceeds {MAX_PAYLOAD}$"):
        Frame(FrameType.DATA, 0, bytes(MAX_PAYLOAD + 1))
