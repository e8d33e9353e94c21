"""Delimiting (COBS) and frame format (CRC-32) of the device serial protocol.

The golden frames below are the examples of docs/serial-protocol.md, section
"Golden examples"; :func:`test_doc_carries_the_golden_examples` keeps the two in
step. Hex is spaced by field (raw frames) or by COBS block (wire form).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC
from hypothesis import example, given, settings
from hypothesis import strategies as st

from firmware_bridge.device import DeviceLink
from firmware_bridge.framing import (
    DELIMITER,
    MAX_ENCODED_FRAME,
    MAX_FRAME,
    MAX_PAYLOAD,
    BadFrame,
    BadFrameReason,
    Frame,
    FrameDecoder,
    FrameType,
    FramingError,
    cobs_decode,
    cobs_encode,
)
from firmware_bridge.link import HOST_FEATURES, HostLink, Message, id_distance, id_next
from firmware_bridge.messages import (
    Ack,
    Data,
    DeviceClass,
    Feature,
    Heartbeat,
    Hello,
    HelloAck,
    HelloResult,
    Nak,
    NakReason,
    Receipt,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "serial-protocol.md"


# -- golden examples ------------------------------------------------------------------

#: The beacon of the golden DATA frame: tag 0x0A1B2C3D, counter 17, battery 87 %,
#: strap closed and body contact, RSSI -61 dBm, MAC under the key 00 01 .. 0f.
BEACON_KEY = bytes(range(16))
BEACON_BODY = bytes.fromhex("3d 2c 1b 0a  11 00 00 00  57  03  c3  d6 45 b8 10 7f e7 15 80")


@dataclass(frozen=True)
class Golden:
    name: str
    frame: Frame
    payload: object  # the payload, decoded by firmware_bridge.messages
    raw: bytes  # type | seq | payload | crc32, before COBS
    wire: bytes  # COBS blocks, then the 0x00 delimiter


HELLO_REQ = Golden(
    "HELLO_REQ",
    Frame(FrameType.HELLO_REQ, 0),
    None,
    raw=bytes.fromhex("03  00  3c 41 f4 6a"),
    wire=bytes.fromhex("02 03  05 3c 41 f4 6a  00"),
)
HELLO = Golden(
    "HELLO",
    Frame(FrameType.HELLO, 0,
          bytes.fromhex("02 01 01 04 02 07 00 00 00 07 54 52 2d 30 30 30 31 00 00 00 00")),
    Hello(2, DeviceClass.TAG_RECEIVER, (1, 4, 2), 7, "TR-0001", 0),
    raw=bytes.fromhex(
        "01  00  02  01  01 04 02  07 00 00 00  07  54 52 2d 30 30 30 31  00 00 00 00"
        "  5b df ca 5a"
    ),
    wire=bytes.fromhex(
        "02 01  07 02 01 01 04 02 07  01  01  09 07 54 52 2d 30 30 30 31  01  01  01"
        "  05 5b df ca 5a  00"
    ),
)
HELLO_ACK = Golden(
    "HELLO_ACK",
    Frame(FrameType.HELLO_ACK, 1, bytes.fromhex("02 00 02 00 00 00 00")),
    HelloAck(2, HelloResult.OK, 2, 0),
    raw=bytes.fromhex("02  01  02  00  02  00 00 00 00  ff 7e 0a e9"),
    wire=bytes.fromhex("04 02 01 02  02 02  01  01  01  05 ff 7e 0a e9  00"),
)
DATA = Golden(
    "DATA",
    Frame(FrameType.DATA, 1, bytes.fromhex("2a 00 00 00 01") + BEACON_BODY),
    Data(42, 0x01, BEACON_BODY),
    raw=bytes.fromhex(
        "10  01  2a 00 00 00  01  3d 2c 1b 0a  11 00 00 00  57  03  c3  d6 45 b8 10 7f e7 15 80"
        "  13 53 2d e6"
    ),
    wire=bytes.fromhex(
        "04 10 01 2a  01  01  07 01 3d 2c 1b 0a 11  01  01"
        "  10 57 03 c3 d6 45 b8 10 7f e7 15 80 13 53 2d e6  00"
    ),
)
ACK = Golden(
    "ACK",
    Frame(FrameType.ACK, 1, bytes.fromhex("2a 00 00 00")),
    Ack(42),
    raw=bytes.fromhex("11  01  2a 00 00 00  77 16 a7 8b"),
    wire=bytes.fromhex("04 11 01 2a  01  01  05 77 16 a7 8b  00"),
)
HEARTBEAT = Golden(
    "HEARTBEAT",
    Frame(FrameType.HEARTBEAT, 2, bytes.fromhex("02 00 00 00 00 00")),
    Heartbeat(2, 0),
    raw=bytes.fromhex("20  02  02 00 00 00  00 00  1d 0d 03 46"),
    wire=bytes.fromhex("04 20 02 02  01  01  01  01  05 1d 0d 03 46  00"),
)
NAK = Golden(
    "NAK",
    Frame(FrameType.NAK, 2, bytes.fromhex("01")),
    Nak(NakReason.BAD_FRAME),
    raw=bytes.fromhex("12  02  01  18 fc d2 a5"),
    wire=bytes.fromhex("08 12 02 01 18 fc d2 a5  00"),
)
HELLO_V1 = Golden(
    "HELLO (protocol 1)",
    Frame(FrameType.HELLO, 0, bytes.fromhex("01 01 01 04 02 07 00 00 00 07 54 52 2d 30 30 30 31")),
    Hello(1, DeviceClass.TAG_RECEIVER, (1, 4, 2), 7, "TR-0001"),
    raw=bytes.fromhex(
        "01  00  01  01  01 04 02  07 00 00 00  07  54 52 2d 30 30 30 31  de b6 27 6f"
    ),
    wire=bytes.fromhex(
        "02 01  07 01 01 01 04 02 07  01  01  0d 07 54 52 2d 30 30 30 31 de b6 27 6f  00"
    ),
)
HELLO_ACK_V1 = Golden(
    "HELLO_ACK (protocol 1)",
    Frame(FrameType.HELLO_ACK, 1, bytes.fromhex("01 00 02")),
    HelloAck(1, HelloResult.OK, 2),
    raw=bytes.fromhex("02  01  01  00  02  03 c8 92 eb"),
    wire=bytes.fromhex("04 02 01 01  06 02 03 c8 92 eb  00"),
)
HELLO_V3 = Golden(
    "HELLO (protocol 3)",
    Frame(FrameType.HELLO, 0,
          bytes.fromhex("03 01 03 00 00 01 00 00 00 07 54 52 2d 30 30 30 33 03 00 00 00")),
    Hello(3, DeviceClass.TAG_RECEIVER, (3, 0, 0), 1, "TR-0003", 0x03),
    raw=bytes.fromhex(
        "01  00  03  01  03 00 00  01 00 00 00  07  54 52 2d 30 30 30 33  03 00 00 00"
        "  9f 88 d4 55"
    ),
    wire=bytes.fromhex(
        "02 01  04 03 01 03  01  02 01  01  01  0a 07 54 52 2d 30 30 30 33 03  01  01"
        "  05 9f 88 d4 55  00"
    ),
)
HELLO_ACK_UNSUPPORTED = Golden(
    "HELLO_ACK (unsupported version)",
    Frame(FrameType.HELLO_ACK, 1, bytes.fromhex("02 01 02")),
    HelloAck(2, HelloResult.UNSUPPORTED_VERSION, 2),
    raw=bytes.fromhex("02  01  02  01  02  1b 47 cf f0"),
    wire=bytes.fromhex("0a 02 01 02 01 02 1b 47 cf f0  00"),
)
HELLO_KIOSK = Golden(
    "HELLO (a kiosk)",
    Frame(FrameType.HELLO, 0,
          bytes.fromhex("02 02 02 01 00 03 00 00 00 07 4b 49 2d 30 30 30 31 00 00 00 00")),
    Hello(2, DeviceClass.KIOSK, (2, 1, 0), 3, "KI-0001", 0),
    raw=bytes.fromhex(
        "01  00  02  02  02 01 00  03 00 00 00  07  4b 49 2d 30 30 30 31  00 00 00 00"
        "  8d e3 82 50"
    ),
    wire=bytes.fromhex(
        "02 01  05 02 02 02 01  02 03  01  01  09 07 4b 49 2d 30 30 30 31  01  01  01"
        "  05 8d e3 82 50  00"
    ),
)
HELLO_ACK_WRONG_CLASS = Golden(
    "HELLO_ACK (wrong class)",
    Frame(FrameType.HELLO_ACK, 1, bytes.fromhex("02 03 02")),
    HelloAck(2, HelloResult.WRONG_CLASS, 2),
    raw=bytes.fromhex("02  01  02  03  02  99 25 f9 c2"),
    wire=bytes.fromhex("0a 02 01 02 03 02 99 25 f9 c2  00"),
)

# -- version 2 with the WINDOW feature (section 13.11) ---------------------------------
#: The second beacon of the window: the same tag, counter 18, MAC under the same key.
BEACON_BODY_18 = bytes.fromhex("3d 2c 1b 0a  12 00 00 00  57  03  c3  09 a2 79 80 2b ca f4 7f")
HELLO_W = Golden(
    "HELLO (WINDOW offered)",
    Frame(FrameType.HELLO, 0, bytes.fromhex(
        "02 01 01 04 02 07 00 00 00 07 54 52 2d 30 30 30 31 01 00 00 00 08 2a 00 00 00")),
    Hello(2, DeviceClass.TAG_RECEIVER, (1, 4, 2), 7, "TR-0001", Feature.WINDOW, 8, 42),
    raw=bytes.fromhex(
        "01  00  02  01  01 04 02  07 00 00 00  07  54 52 2d 30 30 30 31  01 00 00 00"
        "  08  2a 00 00 00  98 16 3e c3"
    ),
    wire=bytes.fromhex(
        "02 01  07 02 01 01 04 02 07  01  01  0a 07 54 52 2d 30 30 30 31 01  01  01"
        "  03 08 2a  01  01  05 98 16 3e c3  00"
    ),
)
HELLO_ACK_W = Golden(
    "HELLO_ACK (WINDOW granted)",
    Frame(FrameType.HELLO_ACK, 1, bytes.fromhex("02 00 02 01 00 00 00 08")),
    HelloAck(2, HelloResult.OK, 2, Feature.WINDOW, 8),
    raw=bytes.fromhex("02  01  02  00  02  01 00 00 00  08  fc ab 52 cc"),
    wire=bytes.fromhex("04 02 01 02  03 02 01  01  01  06 08 fc ab 52 cc  00"),
)
DATA_43 = Golden(
    "DATA (event 43, in the window)",
    Frame(FrameType.DATA, 2, bytes.fromhex("2b 00 00 00 01") + BEACON_BODY_18),
    Data(43, 0x01, BEACON_BODY_18),
    raw=bytes.fromhex(
        "10  02  2b 00 00 00  01  3d 2c 1b 0a  12 00 00 00  57  03  c3  09 a2 79 80 2b ca f4 7f"
        "  50 9c 8d 4f"
    ),
    wire=bytes.fromhex(
        "04 10 02 2b  01  01  07 01 3d 2c 1b 0a 12  01  01"
        "  10 57 03 c3 09 a2 79 80 2b ca f4 7f 50 9c 8d 4f  00"
    ),
)
RECEIPT_42 = Golden(
    "RECEIPT (event 42)",
    Frame(FrameType.RECEIPT, 1, bytes.fromhex("2a 00 00 00")),
    Receipt(42),
    raw=bytes.fromhex("13  01  2a 00 00 00  7c b7 6f c6"),
    wire=bytes.fromhex("04 13 01 2a  01  01  05 7c b7 6f c6  00"),
)
RECEIPT_43 = Golden(
    "RECEIPT (event 43)",
    Frame(FrameType.RECEIPT, 2, bytes.fromhex("2b 00 00 00")),
    Receipt(43),
    raw=bytes.fromhex("13  02  2b 00 00 00  c9 aa 73 39"),
    wire=bytes.fromhex("04 13 02 2b  01  01  05 c9 aa 73 39  00"),
)
ACK_43 = Golden(
    "ACK (cumulative, up to event 43)",
    Frame(FrameType.ACK, 2, bytes.fromhex("2b 00 00 00")),
    Ack(43),
    raw=bytes.fromhex("11  02  2b 00 00 00  c2 0b bb 74"),
    wire=bytes.fromhex("04 11 02 2b  01  01  05 c2 0b bb 74  00"),
)
RECEIPT_45 = Golden(
    "RECEIPT (event 45, past a missing 44)",
    Frame(FrameType.RECEIPT, 4, bytes.fromhex("2d 00 00 00")),
    Receipt(45),
    raw=bytes.fromhex("13  04  2d 00 00 00  b5 00 58 93"),
    wire=bytes.fromhex("04 13 04 2d  01  01  02 b5  03 58 93  00"),
)
NAK_GAP = Golden(
    "NAK (gap)",
    Frame(FrameType.NAK, 2, bytes.fromhex("03")),
    Nak(NakReason.GAP),
    raw=bytes.fromhex("12  02  03  34 9d dc 4b"),
    wire=bytes.fromhex("08 12 02 03 34 9d dc 4b  00"),
)

GOLDEN = [HELLO_REQ, HELLO, HELLO_ACK, DATA, ACK, HEARTBEAT, NAK, HELLO_V1, HELLO_ACK_V1,
          HELLO_V3, HELLO_ACK_UNSUPPORTED, HELLO_KIOSK, HELLO_ACK_WRONG_CLASS,
          HELLO_W, HELLO_ACK_W, DATA_43, RECEIPT_42, RECEIPT_43, ACK_43, RECEIPT_45, NAK_GAP]
#: docs/test-vectors/serial-protocol/frames.json: the golden frames, for firmware suites
#: (a folder of its own: the files directly in docs/test-vectors/ are made by a generator)
VECTORS = DOC.parent / "test-vectors" / "serial-protocol" / "frames.json"
PAYLOAD_TYPES: dict[FrameType, Any] = {
    FrameType.HELLO: Hello,
    FrameType.HELLO_ACK: HelloAck,
    FrameType.DATA: Data,
    FrameType.ACK: Ack,
    FrameType.NAK: Nak,
    FrameType.HEARTBEAT: Heartbeat,
    FrameType.RECEIPT: Receipt,
}
golden_cases = pytest.mark.parametrize("golden", GOLDEN, ids=[g.name for g in GOLDEN])


def frames_of(items: list[Frame | BadFrame]) -> list[Frame]:
    return [item for item in items if isinstance(item, Frame)]


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame | BadFrame]:
    out: list[Frame | BadFrame] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


def test_crc_is_crc32_iso_hdlc() -> None:
    # The check value of CRC-32/ISO-HDLC (the catalogue's "123456789" test).
    assert zlib.crc32(b"123456789") == 0xCBF43926
    # Leading zeros change it (init 0xFFFFFFFF): a stray 0x00 glued in front is caught.
    assert zlib.crc32(b"\x00" + b"123456789") != 0xCBF43926


@golden_cases
def test_golden_frame_encodes_to_the_documented_bytes(golden: Golden) -> None:
    assert golden.frame.to_bytes() == golden.wire
    assert cobs_encode(golden.raw) + b"\x00" == golden.wire
    assert cobs_decode(golden.wire[:-1]) == golden.raw
    body, (crc,) = golden.raw[:-4], struct.unpack("<I", golden.raw[-4:])
    assert crc == zlib.crc32(body)
    assert body == bytes((golden.frame.type, golden.frame.seq)) + golden.frame.payload
    # COBS costs exactly one byte on every frame (none is 254 bytes long).
    assert len(golden.wire) == len(golden.raw) + 2


@golden_cases
def test_golden_frame_decodes_to_its_fields(golden: Golden) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(golden.wire) == [golden.frame]
    assert decoder.stats.frames == 1
    assert decoder.stats.bad_frames == 0
    if golden.payload is None:
        assert golden.frame.payload == b""
        return
    parser = PAYLOAD_TYPES[golden.frame.type]
    parsed = parser.from_bytes(golden.frame.payload)
    assert parsed == golden.payload
    assert parsed.to_bytes() == golden.frame.payload


def test_golden_beacon_mac_is_the_truncated_cmac() -> None:
    tag_id, counter, battery, flags, rssi = struct.unpack_from("<IIBBb", BEACON_BODY)
    assert (tag_id, counter, battery, flags, rssi) == (0x0A1B2C3D, 17, 87, 0x03, -61)
    cmac = CMAC(AES(BEACON_KEY))
    cmac.update(BEACON_BODY[:10])  # tag_id | counter | battery | flags; not rssi
    assert cmac.finalize()[:8] == BEACON_BODY[11:]
    assert len(BEACON_BODY) == 19


def test_golden_session_is_what_the_links_send() -> None:
    """The golden examples are a real exchange between HostLink and DeviceLink."""
    host = HostLink(lambda _serial: None, expected_class=DeviceClass.TAG_RECEIVER)
    device = DeviceLink(HELLO.payload, next_event_id=42)  # type: ignore[arg-type]
    host.connection_made(0.0)
    assert host.data_to_send() == HELLO_REQ.wire
    device.receive_data(HELLO_REQ.wire, 0.0)
    assert device.data_to_send() == HELLO.wire
    host.receive_data(HELLO.wire, 0.0)
    assert host.data_to_send() == HELLO_ACK.wire
    device.receive_data(HELLO_ACK.wire, 0.0)
    assert device.up
    assert device.enqueue(0x01, BEACON_BODY) == 42
    device.tick(0.0)
    assert device.data_to_send() == DATA.wire
    assert host.receive_data(DATA.wire, 0.0) == [Message("TR-0001", 42, 0x01, BEACON_BODY)]
    assert host.data_to_send() == b""  # nothing until committed
    host.committed(42)
    assert host.data_to_send() == ACK.wire
    device.receive_data(ACK.wire, 0.0)
    assert device.acked_ids == [42]
    device.tick(2.0)
    assert device.data_to_send() == HEARTBEAT.wire
    corrupted = bytearray(HEARTBEAT.wire)
    corrupted[3] ^= 0x10  # payload byte 02 -> 12: the CRC no longer matches
    host.receive_data(bytes(corrupted), 2.0)
    assert host.data_to_send() == NAK.wire


def test_golden_window_session_is_what_the_links_send() -> None:
    """Section 13.11: a device offering WINDOW (8 frames), two beacons in flight, a
    RECEIPT for each at once, one cumulative ACK after both commits (their callbacks in
    the reverse order); then 44 is lost and 45 arrives: RECEIPT 45 and a NAK (gap)."""
    host = HostLink(lambda _serial: None, expected_class=DeviceClass.TAG_RECEIVER,
                    features=HOST_FEATURES)
    device = DeviceLink(Hello(2, DeviceClass.TAG_RECEIVER, (1, 4, 2), 7, "TR-0001",
                              Feature.WINDOW, 8), next_event_id=42)
    host.connection_made(0.0)
    assert host.data_to_send() == HELLO_REQ.wire
    device.receive_data(HELLO_REQ.wire, 0.0)
    assert device.data_to_send() == HELLO_W.wire
    host.receive_data(HELLO_W.wire, 0.0)
    assert host.data_to_send() == HELLO_ACK_W.wire
    device.receive_data(HELLO_ACK_W.wire, 0.0)
    assert device.window == host.window == 8
    device.enqueue(0x01, BEACON_BODY)
    device.enqueue(0x01, BEACON_BODY_18)
    device.tick(0.0)
    assert device.data_to_send() == DATA.wire + DATA_43.wire  # both in flight
    assert host.receive_data(DATA.wire + DATA_43.wire, 0.0) == [
        Message("TR-0001", 42, 0x01, BEACON_BODY), Message("TR-0001", 43, 0x01, BEACON_BODY_18)]
    assert host.data_to_send() == RECEIPT_42.wire + RECEIPT_43.wire
    host.committed(43)
    host.committed(42)
    assert host.data_to_send() == ACK_43.wire
    device.receive_data(RECEIPT_42.wire + RECEIPT_43.wire + ACK_43.wire, 0.0)
    assert device.acked_ids == [42, 43]
    device.enqueue(0x01, b"")
    device.enqueue(0x01, b"")
    device.tick(0.01)
    _lost, second = device.data_to_send().split(b"\x00")[:2]
    assert host.receive_data(second + b"\x00", 0.01) == []
    assert host.data_to_send() == RECEIPT_45.wire + NAK_GAP.wire


def test_the_test_vectors_file_holds_the_golden_frames() -> None:
    vectors = json.loads(VECTORS.read_text(encoding="ascii"))
    assert vectors["frames"] == [
        {"name": g.name, "raw": g.raw.hex(" "), "wire": g.wire.hex(" ")} for g in GOLDEN]
    for entry in vectors["frames"]:  # and each holds on its own: CRC, COBS, delimiter
        raw, wire = bytes.fromhex(entry["raw"]), bytes.fromhex(entry["wire"])
        assert zlib.crc32(raw[:-4]) == struct.unpack("<I", raw[-4:])[0]
        assert cobs_encode(raw) + b"\x00" == wire


@pytest.mark.parametrize(("hello", "answer"), [
    (HELLO_V1, HELLO_ACK_V1),  # a version-1 device is served in version 1
    (HELLO_V3, HELLO_ACK_UNSUPPORTED),  # a newer one is told the host's version
    (HELLO_KIOSK, HELLO_ACK_WRONG_CLASS),  # a kiosk on a tag receiver's port
], ids=["v1", "v3", "kiosk"])
def test_golden_handshakes_are_what_the_links_send(hello: Golden, answer: Golden) -> None:
    host = HostLink(lambda _serial: None, expected_class=DeviceClass.TAG_RECEIVER)
    device = DeviceLink(hello.payload)  # type: ignore[arg-type]
    host.connection_made(0.0)
    device.receive_data(host.data_to_send(), 0.0)
    assert device.data_to_send() == hello.wire
    host.receive_data(hello.wire, 0.0)
    assert host.data_to_send() == answer.wire


def test_doc_carries_the_golden_examples() -> None:
    text = DOC.read_text(encoding="utf-8")
    documented = {
        re.sub(r"\s+", "", literal).lower()
        for literal in re.findall(r'bytes\.fromhex\(\s*"([0-9a-fA-F\s]+)"\s*\)', text)
    }
    for golden in GOLDEN:
        assert golden.raw.hex() in documented, f"{golden.name}: raw frame not in the doc"
        assert golden.wire.hex() in documented, f"{golden.name}: wire form not in the doc"
    assert BEACON_BODY.hex() in documented
    assert "0xCBF43926" in text


# -- COBS -------------------------------------------------------------------------------

# Reference vectors of standard COBS (as published with the algorithm's descriptions).
RUN_254 = bytes(range(1, 255))
COBS_VECTORS = [
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    # 254 non-zero bytes: one full block, no trailing code
    (RUN_254, b"\xff" + RUN_254),
    # a zero then 254 non-zero bytes
    (b"\x00" + RUN_254, b"\x01\xff" + RUN_254),
    # 255 non-zero bytes: a full block, then a block of one
    (RUN_254 + b"\xff", b"\xff" + RUN_254 + b"\x02\xff"),
    # 254 non-zero bytes then a zero: the zero needs its own (empty) block
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    # 253 non-zero bytes, a zero, one byte
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]


@pytest.mark.parametrize(("plain", "encoded"), COBS_VECTORS)
def test_cobs_reference_vectors(plain: bytes, encoded: bytes) -> None:
    assert cobs_encode(plain) == encoded
    assert cobs_decode(encoded) == plain


@pytest.mark.parametrize("length", [1, 253, 254, 255, 256, 508, 509, 1000])
@pytest.mark.parametrize("zero_at", [None, 0, 126, 253, 254, -1])
def test_cobs_round_trip_around_block_boundaries(length: int, zero_at: int | None) -> None:
    data = bytearray((i % 255) + 1 for i in range(length))
    if zero_at is not None and -length <= zero_at < length:
        data[zero_at] = 0
    encoded = cobs_encode(bytes(data))
    assert DELIMITER not in encoded
    assert cobs_decode(encoded) == data
    assert len(encoded) <= len(data) + len(data) // 254 + 1


def test_cobs_decoder_accepts_a_trailing_empty_block_after_a_full_one() -> None:
    # Some encoders close a final 254-byte run with an extra 0x01; both forms mean the same.
    assert cobs_decode(b"\xff" + RUN_254 + b"\x01") == RUN_254


@pytest.mark.parametrize("bad", [b"\x00", b"\x05\x11\x22", b"\x02\x11\x00", b"\x03\x11"])
def test_cobs_decode_rejects_invalid_input(bad: bytes) -> None:
    assert cobs_decode(bad) is None


@given(st.binary(max_size=1200))
def test_cobs_round_trip_property(data: bytes) -> None:
    encoded = cobs_encode(data)
    assert DELIMITER not in encoded
    assert len(encoded) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(encoded) == data


# -- the frame decoder ----------------------------------------------------------------

GOLDEN_STREAM = b"".join(g.wire for g in GOLDEN)
GOLDEN_FRAMES = [g.frame for g in GOLDEN]


def test_stream_whole_and_one_byte_at_a_time() -> None:
    assert FrameDecoder().feed(GOLDEN_STREAM) == GOLDEN_FRAMES
    decoder = FrameDecoder()
    out = feed_all(decoder, [bytes((b,)) for b in GOLDEN_STREAM])
    assert out == GOLDEN_FRAMES
    assert decoder.stats.frames == len(GOLDEN)
    assert decoder.stats.garbage_bytes == 0


def test_stray_delimiters_are_ignored() -> None:
    stream = b"\x00\x00\x00" + HELLO.wire + b"\x00" + DATA.wire + b"\x00\x00"
    decoder = FrameDecoder()
    assert decoder.feed(stream) == [HELLO.frame, DATA.frame]
    assert decoder.stats.bad_frames == 0
    assert decoder.feed(b"\x00" * 1000) == []


def test_garbage_before_and_between_frames() -> None:
    stream = (
        b"\x13\x37\xfe garbage \xff\x00" + HELLO.wire + b"\x7f\x7f\x00" + DATA.wire
        + b"\x02\x01\x00" + ACK.wire
    )
    decoder = FrameDecoder()
    out = decoder.feed(stream)
    assert frames_of(out) == [HELLO.frame, DATA.frame, ACK.frame]
    # 13 37: block of 0x13 bytes, only 12 follow; 7f 7f: likewise; 02 01: one byte of frame
    assert [b.reason for b in out if isinstance(b, BadFrame)] == [
        BadFrameReason.COBS, BadFrameReason.COBS, BadFrameReason.SHORT,
    ]
    assert decoder.stats.bad_frames == 3


def test_garbage_glued_to_a_frame_costs_that_frame_only() -> None:
    # No delimiter between the garbage and the frame: they are one chunk, rejected;
    # the next frame, behind an intact delimiter, is recovered.
    out = FrameDecoder().feed(b"\x42\x42" + DATA.wire + ACK.wire)
    assert isinstance(out[0], BadFrame)
    assert out[1:] == [ACK.frame]


def test_first_frame_after_start_needs_no_leading_delimiter() -> None:
    assert FrameDecoder().feed(ACK.wire) == [ACK.frame]


def test_frame_split_inside_a_cobs_block() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(DATA.wire[:9]) == []
    assert decoder.feed(DATA.wire[9:20]) == []
    assert decoder.feed(DATA.wire[20:]) == [DATA.frame]


@golden_cases
def test_every_single_bit_error_is_detected(golden: Golden) -> None:
    for bit in range(len(golden.wire) * 8):
        corrupted = bytearray(golden.wire)
        corrupted[bit // 8] ^= 1 << (bit % 8)
        decoder = FrameDecoder()
        # the trailing delimiter closes whatever a corrupted delimiter left open
        out = decoder.feed(bytes(corrupted) + b"\x00")
        assert frames_of(out) == [], f"bit {bit} flipped went unnoticed"


@golden_cases
def test_corrupted_crc_is_reported_as_crc(golden: Golden) -> None:
    raw = bytearray(golden.raw)
    raw[-1] ^= 0x80
    decoder = FrameDecoder()
    out = decoder.feed(cobs_encode(bytes(raw)) + b"\x00")
    assert out == [BadFrame(BadFrameReason.CRC, bytes(raw))]
    assert decoder.stats.by_reason == {"crc": 1}
    # and the decoder goes on
    assert decoder.feed(golden.wire) == [golden.frame]


def test_unknown_type_and_short_frames() -> None:
    body = bytes((0x7E, 0x00))
    unknown = body + struct.pack("<I", zlib.crc32(body))
    out = FrameDecoder().feed(cobs_encode(unknown) + b"\x00" + cobs_encode(b"\x01\x02") + b"\x00")
    assert [b.reason for b in out if isinstance(b, BadFrame)] == [
        BadFrameReason.UNKNOWN_TYPE, BadFrameReason.SHORT,
    ]


def test_largest_frame_fits_and_larger_is_refused() -> None:
    biggest = Frame(FrameType.DATA, 255, bytes(range(MAX_PAYLOAD)))
    wire = biggest.to_bytes()
    assert len(wire) == MAX_ENCODED_FRAME + 1 == MAX_FRAME + 2
    assert FrameDecoder().feed(wire) == [biggest]
    with pytest.raises(FramingError):
        Frame(FrameType.DATA, 0, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(FramingError):
        Frame(FrameType.DATA, 256)


def test_oversize_input_is_bounded_and_the_decoder_recovers() -> None:
    decoder = FrameDecoder()
    out: list[Frame | BadFrame] = []
    for _ in range(200):  # 20 kB without a delimiter
        out += decoder.feed(b"\x55" * 100)
        assert len(decoder._buf) <= MAX_ENCODED_FRAME
    assert [b.reason for b in out if isinstance(b, BadFrame)] == [BadFrameReason.OVERSIZE]
    assert decoder.stats.garbage_bytes == 20_000
    # the frame right after the delimiter that ends the flood arrives
    assert decoder.feed(b"\x55\x00" + HELLO.wire) == [HELLO.frame]
    assert decoder.feed(DATA.wire) == [DATA.frame]


def test_chunk_of_exactly_the_maximum_is_decoded_not_oversize() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(b"\x55" * MAX_ENCODED_FRAME + b"\x00")
    assert [b.reason for b in out if isinstance(b, BadFrame)] == [BadFrameReason.COBS]
    out = decoder.feed(b"\x55" * (MAX_ENCODED_FRAME + 1) + b"\x00")
    assert [b.reason for b in out if isinstance(b, BadFrame)] == [BadFrameReason.OVERSIZE]


# -- properties -----------------------------------------------------------------------

frames_st = st.builds(
    Frame,
    st.sampled_from(list(FrameType)),
    st.integers(0, 255),
    st.binary(max_size=MAX_PAYLOAD),
)


@given(frames_st)
@example(Frame(FrameType.DATA, 0, bytes(MAX_PAYLOAD)))
@example(Frame(FrameType.DATA, 0, b"\xff" * MAX_PAYLOAD))
def test_every_frame_round_trips(frame: Frame) -> None:
    wire = frame.to_bytes()
    assert wire.endswith(b"\x00")
    assert DELIMITER not in wire[:-1]
    assert len(wire) <= MAX_ENCODED_FRAME + 1
    assert FrameDecoder().feed(wire) == [frame]


@given(st.lists(st.binary(max_size=600), max_size=20))
@settings(max_examples=300)
def test_arbitrary_garbage_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        for item in decoder.feed(chunk):
            assert isinstance(item, Frame | BadFrame)
        assert len(decoder._buf) <= MAX_ENCODED_FRAME
    # whatever came before, a frame behind a delimiter is recovered
    assert decoder.feed(b"\x00" + ACK.wire)[-1] == ACK.frame


@given(st.lists(frames_st, min_size=1, max_size=8), st.data())
def test_any_split_of_a_stream_yields_the_same_frames(
    frames: list[Frame], data: st.DataObject,
) -> None:
    stream = b"".join(f.to_bytes() for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert feed_all(FrameDecoder(), pieces) == frames


garbage_st = st.binary(max_size=300)


@given(st.lists(st.tuples(garbage_st, frames_st), min_size=1, max_size=8))
def test_frames_survive_garbage_that_ends_in_a_delimiter(pairs: list[tuple[bytes, Frame]]) -> None:
    stream = b"".join(garbage + b"\x00" + frame.to_bytes() for garbage, frame in pairs)
    assert frames_of(FrameDecoder().feed(stream)) == [frame for _, frame in pairs]


def is_subsequence(short: list[Frame], long: list[Frame]) -> bool:
    it = iter(long)
    return all(any(item == other for other in it) for item in short)


@given(st.lists(st.tuples(garbage_st, frames_st), min_size=1, max_size=8))
@example([(b"\x42", Frame(FrameType.ACK, 1, b"\x2a\x00\x00\x00"))])
def test_a_frame_is_recovered_iff_the_delimiter_before_it_is_intact(
    pairs: list[tuple[bytes, Frame]],
) -> None:
    """Garbage not closed by a 0x00 merges with the next frame and costs it; no other."""
    stream = b"".join(garbage + frame.to_bytes() for garbage, frame in pairs)
    got = frames_of(FrameDecoder().feed(stream))
    sent = [frame for _, frame in pairs]
    must = [frame for garbage, frame in pairs if garbage == b"" or garbage.endswith(b"\x00")]
    assert is_subsequence(got, sent)
    assert is_subsequence(must, got)
    # a frame glued to garbage is lost (with odds of 2**-32 against)
    assert len(got) == len(must)


@given(st.lists(frames_st, min_size=1, max_size=6), st.data())
def test_byte_drops_cost_only_the_frames_they_touch(
    frames: list[Frame], data: st.DataObject,
) -> None:
    wires = [f.to_bytes() for f in frames]
    stream = b"".join(wires)
    dropped = set(data.draw(st.lists(st.integers(0, len(stream) - 1), max_size=6)))
    damaged = bytes(b for i, b in enumerate(stream) if i not in dropped)
    got = frames_of(FrameDecoder().feed(damaged))
    # frame i is intact iff none of its bytes, nor the delimiter before it, was dropped
    intact, start = [], 0
    for frame, wire in zip(frames, wires, strict=True):
        first = start - 1 if start else 0  # the previous frame's delimiter, if any
        if not dropped.intersection(range(first, start + len(wire))):
            intact.append(frame)
        start += len(wire)
    assert is_subsequence(got, frames)
    assert is_subsequence(intact, got)


# -- the reference code in C (docs/serial-protocol.md, section 16) ------------------------

C_HARNESS = r"""
#include <stdio.h>
#include <string.h>
void handle_chunk(const uint8_t *encoded, size_t n) { (void)encoded; (void)n; }
static size_t unhex(const char *h, uint8_t *out)
{
    size_t n = 0;
    unsigned v;
    while (h[0] && h[1] && sscanf(h, "%2x", &v) == 1) { out[n++] = (uint8_t)v; h += 2; }
    return n;
}
static void hex(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
    printf("\n");
}
int main(void)
{
    static char line[8192], op[16], arg[8000];
    static uint8_t in[4096], out[4096];
    while (fgets(line, sizeof line, stdin)) {
        arg[0] = 0;
        if (sscanf(line, "%15s %7999s", op, arg) < 1) continue;
        size_t n = unhex(arg, in);
        if (!strcmp(op, "crc")) printf("%08x\n", (unsigned)crc32_iso_hdlc(in, n));
        else if (!strcmp(op, "enc")) hex(out, cobs_encode(in, n, out));
        else if (!strcmp(op, "dec")) {
            int m = cobs_decode(in, n, out);
            if (m < 0) printf("invalid\n"); else hex(out, (size_t)m);
        } else if (!strcmp(op, "hello")) {  /* class fw[3] boot[4] features[4] serial */
            uint32_t boot = in[4] | in[5] << 8 | in[6] << 16 | (uint32_t)in[7] << 24;
            uint32_t feat = in[8] | in[9] << 8 | in[10] << 16 | (uint32_t)in[11] << 24;
            hex(out, hello_payload(in[0], in + 1, boot, (const char *)in + 12, n - 12, feat,
                                   out));
        } else if (!strcmp(op, "hellow")) {  /* as hello, then window[1] next_id[4] */
            uint32_t boot = in[4] | in[5] << 8 | in[6] << 16 | (uint32_t)in[7] << 24;
            uint32_t feat = in[8] | in[9] << 8 | in[10] << 16 | (uint32_t)in[11] << 24;
            uint32_t next = in[13] | in[14] << 8 | in[15] << 16 | (uint32_t)in[16] << 24;
            size_t m = hello_payload(in[0], in + 1, boot, (const char *)in + 17, n - 17, feat,
                                     out);
            hex(out, m + hello_window_fields(in[12], next, out + m));
        } else if (!strcmp(op, "ids")) {  /* a[4] b[4] (big-endian in the hex) */
            uint32_t a = (uint32_t)in[0] << 24 | in[1] << 16 | in[2] << 8 | in[3];
            uint32_t b = (uint32_t)in[4] << 24 | in[5] << 16 | in[6] << 8 | in[7];
            printf("%08x %08x\n", (unsigned)id_next(a), (unsigned)id_distance(a, b));
        } else if (!strcmp(op, "wack")) {  /* head[4] in_flight[1] ack[4], big-endian */
            struct tx_window w;
            w.head = (uint32_t)in[0] << 24 | in[1] << 16 | in[2] << 8 | in[3];
            w.window = 255;
            w.in_flight = in[4];
            uint32_t ack = (uint32_t)in[5] << 24 | in[6] << 16 | in[7] << 8 | in[8];
            unsigned erased = window_on_ack(&w, ack);
            printf("%u %08x %u\n", erased, (unsigned)w.head, (unsigned)w.in_flight);
        }
    }
    return 0;
}
"""


def c_blocks(doc: Path) -> str:
    return "\n".join(re.findall(r"```c\n(.*?)```", doc.read_text(encoding="utf-8"), re.S))


def compile_c(tmp_path: Path, source: str, *libs: str) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    src, exe = tmp_path / "ref.c", tmp_path / "ref"
    src.write_text(source)
    subprocess.run([compiler, "-std=c99", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    str(src), *libs], check=True, capture_output=True, timeout=60)
    return exe


def run_c(exe: Path, lines: list[str]) -> list[str]:
    done = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, check=True, timeout=30)
    return done.stdout.splitlines()


def test_the_c_reference_code_agrees_with_the_python_one(tmp_path: Path) -> None:
    exe = compile_c(tmp_path, c_blocks(DOC) + C_HARNESS)
    rng = random.Random(7)
    inputs = [g.raw for g in GOLDEN] + [plain for plain, _ in COBS_VECTORS]
    inputs += [rng.randbytes(rng.randrange(0, 600)) for _ in range(200)]
    inputs += [bytes(rng.choice((0, 0, 1, 0xFF)) for _ in range(rng.randrange(1, 300)))
               for _ in range(100)]
    lines = [f"crc {b.hex()}" for b in inputs] + [f"enc {b.hex()}" for b in inputs]
    lines += [f"dec {cobs_encode(b).hex()}" for b in inputs]
    lines += [f"dec {bad.hex()}" for bad in (b"\x05\x11\x22", b"\x02\x11\x00", b"\x03\x11")]
    hello = HELLO.payload
    assert isinstance(hello, Hello)
    lines.append("hello " + (bytes((hello.device_class, *hello.firmware))
                             + struct.pack("<II", hello.boot_count, hello.features)
                             + hello.serial.encode()).hex())
    hello_w = HELLO_W.payload
    assert isinstance(hello_w, Hello)
    lines.append("hellow " + (bytes((hello_w.device_class, *hello_w.firmware))
                              + struct.pack("<II", hello_w.boot_count, hello_w.features)
                              + struct.pack("<BI", hello_w.window, hello_w.next_id)
                              + hello_w.serial.encode()).hex())
    pairs = [(1, 1), (5, 3), (0xFFFFFFFF, 1), (0xFFFFFFF0, 0x10), (1, 0xFFFFFFFF),
             *((rng.randrange(1, 1 << 32), rng.randrange(1, 1 << 32)) for _ in range(50))]
    lines += [f"ids {a:08x}{b:08x}" for a, b in pairs]
    acks = [(42, 2, 43), (42, 2, 42), (42, 2, 44), (42, 0, 42), (42, 3, 41),
            (0xFFFFFFFE, 4, 1), (0xFFFFFFFE, 4, 2), (0xFFFFFFFE, 2, 1)]
    lines += [f"wack {h:08x}{k:02x}{a:08x}" for h, k, a in acks]
    out = run_c(exe, lines)
    acked = out[len(out) - len(acks):]
    out = out[: len(out) - len(acks)]
    for (head, in_flight, ack), got in zip(acks, acked, strict=True):
        distance = id_distance(head, ack)
        erased = distance + 1 if distance < in_flight else 0
        new_head = id_next(ack) if erased else head
        assert got == f"{erased} {new_head:08x} {in_flight - erased}"
    ids = out[len(out) - len(pairs):]
    out = out[: len(out) - len(pairs)]
    assert ids == [f"{id_next(a):08x} {id_distance(a, b):08x}" for a, b in pairs]
    assert out.pop() == HELLO_W.frame.payload.hex()  # the golden HELLO offering WINDOW
    n = len(inputs)
    assert out[:n] == [f"{zlib.crc32(b):08x}" for b in inputs]
    assert out[n : 2 * n] == [cobs_encode(b).hex() for b in inputs]
    assert out[2 * n : 3 * n] == [b.hex() for b in inputs]
    assert out[3 * n : 3 * n + 3] == ["invalid"] * 3
    assert out[-1] == HELLO.frame.payload.hex()  # the golden HELLO of version 2
