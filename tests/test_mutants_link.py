"""HostLink, frame by frame: the paths mutation testing found that no test could fail.

The host alone, fed hand-made device frames under a fake clock, and what it answers read
back with a FrameDecoder. No device model, no port. Found by mutation testing
(docs/mutation.md): a host that refused every heartbeat, never ran its bad-payload and
unexpected-frame paths, or re-ACKed a duplicate only once, passed every test.
"""

from __future__ import annotations

import pytest

from firmware_bridge.framing import BadFrame, Frame, FrameDecoder, FrameType, cobs_encode
from firmware_bridge.link import (
    DeviceRejected,
    DeviceSilent,
    DeviceUp,
    FrameRejected,
    HostLink,
    LinkEvent,
    Message,
)
from firmware_bridge.messages import (
    PROTOCOL_VERSION,
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
)

SERIAL = "TR-0001"
HEARTBEAT = 2
TIMEOUT = 7.0
HELLO = Hello(PROTOCOL_VERSION, DeviceClass.TAG_RECEIVER, (1, 4, 2), 1, SERIAL)


class Host:
    """A HostLink with a ledger of last committed event ids and a fake clock."""

    def __init__(self, ledger: dict[str, int] | None = None) -> None:
        self.ledger = dict(ledger or {})
        self.link = HostLink(self.ledger.get, heartbeat_s=HEARTBEAT, link_timeout_s=TIMEOUT)
        self.now = 0.0
        self._device_seq = 0

    def send(self, ftype: FrameType, payload: bytes = b"", *, seq: int | None = None,
             at: float | None = None) -> list[LinkEvent]:
        """The device sends one frame; the host's events."""
        if seq is None:
            seq, self._device_seq = self._device_seq, (self._device_seq + 1) & 0xFF
        if at is not None:
            self.now = at
        return self.link.receive_data(Frame(ftype, seq, payload).to_bytes(), self.now)

    def hello(self, hello: Hello = HELLO) -> list[LinkEvent]:
        return self.send(FrameType.HELLO, hello.to_bytes())

    def data(self, event_id: int, *, seq: int | None = None, body: bytes = b"\x01") -> list[
            LinkEvent]:
        return self.send(FrameType.DATA, Data(event_id, 0x21, body).to_bytes(), seq=seq)

    def replies(self) -> list[Frame]:
        out = FrameDecoder().feed(self.link.data_to_send())
        assert not [f for f in out if isinstance(f, BadFrame)]
        return [f for f in out if isinstance(f, Frame)]


def up(ledger: dict[str, int] | None = None) -> Host:
    host = Host(ledger)
    host.link.connection_made(0.0)
    assert host.hello() == [DeviceUp(HELLO)]
    host.replies()
    return host


def nak() -> Frame:
    return Frame(FrameType.NAK, 0, Nak(NakReason.BAD_FRAME).to_bytes())


def types_and_payloads(frames: list[Frame]) -> list[tuple[FrameType, bytes]]:
    return [(f.type, f.payload) for f in frames]


# -- heartbeats -------------------------------------------------------------------------
def test_a_heartbeat_of_a_handshaken_device_is_taken_silently_and_keeps_it_alive() -> None:
    host = up()
    beat = Heartbeat(uptime_s=60, queued=0).to_bytes()
    for t in (5.0, 10.0, 15.0):  # each within the timeout of the one before
        assert host.send(FrameType.HEARTBEAT, beat, at=t) == []
        assert host.link.tick(t + TIMEOUT - 0.5) == []
    assert host.replies() == []  # no NAK, no HELLO_REQ
    assert host.link.stats.bad_frames == 0
    assert host.link.hello == HELLO
    assert host.link.tick(15.0 + TIMEOUT) == [DeviceSilent(SERIAL, TIMEOUT)]


def test_a_heartbeat_before_the_handshake_asks_who_is_there() -> None:
    host = Host()
    assert host.send(FrameType.HEARTBEAT, Heartbeat(1, 0).to_bytes()) == []
    assert types_and_payloads(host.replies()) == [(FrameType.HELLO_REQ, b"")]


# -- frames the host cannot use -------------------------------------------------------------
@pytest.mark.parametrize(
    ("ftype", "payload", "reason"),
    [
        (FrameType.DATA, bytes.fromhex("05 00 00"), "payload:DATA"),  # shorter than id + type
        (FrameType.HELLO, bytes.fromhex("01 01"), "payload:HELLO"),
        (FrameType.ACK, Ack(5).to_bytes(), "unexpected:ACK"),  # a host's frame, from a device
        (FrameType.HELLO_REQ, b"", "unexpected:HELLO_REQ"),
    ],
)
def test_a_frame_the_host_cannot_use_is_naked_and_reported(
    ftype: FrameType, payload: bytes, reason: str
) -> None:
    host = up()
    events = host.send(ftype, payload)
    assert events == [FrameRejected(reason, payload)]
    assert types_and_payloads(host.replies()) == [(FrameType.NAK, nak().payload)]
    stats = host.link.stats
    assert (stats.bad_frames, stats.naks_sent, stats.by_reason) == (1, 1, {reason: 1})
    assert host.link.hello == HELLO  # the link goes on
    assert host.data(1) == [Message(SERIAL, 1, 0x21, b"\x01")]


def test_a_damaged_frame_is_naked_and_does_not_count_as_a_sign_of_life() -> None:
    host = up()  # last valid frame at 0.0
    raw = bytes.fromhex("10  00  01 00 00 00 21  00 00 00 00")  # DATA with a wrong CRC
    events = host.link.receive_data(cobs_encode(raw) + b"\x00", 5.0)
    assert events == [FrameRejected("crc", raw)]
    assert types_and_payloads(host.replies()) == [(FrameType.NAK, nak().payload)]
    assert host.link.tick(TIMEOUT) == [DeviceSilent(SERIAL, TIMEOUT)]


# -- duplicates and commits ---------------------------------------------------------------
def test_every_retransmission_of_the_last_committed_event_is_acked_again() -> None:
    host = up()
    assert host.data(5, seq=40) == [Message(SERIAL, 5, 0x21, b"\x01")]
    host.link.committed(5)
    assert host.replies() == [Frame(FrameType.ACK, 40, Ack(5).to_bytes())]
    for seq in (41, 42, 43):  # the ACKs were lost: each retransmission is ACKed, in its seq
        assert host.data(5, seq=seq) == []
        assert host.replies() == [Frame(FrameType.ACK, seq, Ack(5).to_bytes())]
    assert host.link.stats.duplicates == 3
    assert host.link.pending == 0


def test_a_retransmission_while_committing_is_acked_once_in_its_latest_seq() -> None:
    host = up()
    assert host.data(6, seq=10) != []
    assert host.data(6, seq=11) == []  # not delivered twice
    assert host.link.stats.retransmits_while_pending == 1
    assert host.link.pending == 1
    assert host.replies() == []  # nothing ACKed before the commit
    host.link.committed(6)
    assert host.replies() == [Frame(FrameType.ACK, 11, Ack(6).to_bytes())]


def test_committed_with_an_unknown_or_already_acked_id_sends_nothing() -> None:
    host = up()
    host.data(7, seq=3)
    host.link.committed(99)  # never delivered
    assert host.replies() == []
    assert host.link.pending == 1
    host.link.committed(7)
    host.link.committed(7)  # twice
    assert host.replies() == [Frame(FrameType.ACK, 3, Ack(7).to_bytes())]
    assert host.link.pending == 0


def test_the_ledger_tells_which_event_was_committed_before_a_restart() -> None:
    host = up({SERIAL: 41})
    assert host.data(41, seq=8) == []  # committed, then the gateway restarted before the ACK
    assert host.replies() == [Frame(FrameType.ACK, 8, Ack(41).to_bytes())]
    assert host.data(42) == [Message(SERIAL, 42, 0x21, b"\x01")]


def test_data_before_the_handshake_is_neither_delivered_nor_acked() -> None:
    host = Host()
    assert host.data(1) == []
    assert types_and_payloads(host.replies()) == [(FrameType.HELLO_REQ, b"")]
    assert host.link.stats.data_before_hello == 1
    assert host.link.pending == 0


# -- handshake ------------------------------------------------------------------------------
def hello_ack(frames: list[Frame]) -> HelloAck:
    [frame] = frames
    assert frame.type is FrameType.HELLO_ACK
    return HelloAck.from_bytes(frame.payload)


def test_an_accepted_hello_is_answered_with_the_heartbeat_interval() -> None:
    host = Host()
    assert host.link.features is Feature.NONE
    assert host.hello() == [DeviceUp(HELLO)]
    ack = hello_ack(host.replies())
    assert (ack.result, ack.heartbeat_s) == (HelloResult.OK, HEARTBEAT)
    assert host.link.stats.handshakes == 1


@pytest.mark.parametrize(
    ("hello", "result"),
    [
        (Hello(0, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1, SERIAL), HelloResult.UNSUPPORTED_VERSION),
        (Hello(PROTOCOL_VERSION, 9, (1, 0, 0), 1, SERIAL), HelloResult.UNKNOWN_CLASS),
    ],
)
def test_a_refused_hello_is_answered_with_the_reason(hello: Hello, result: HelloResult) -> None:
    host = up()
    assert host.hello(hello) == [DeviceRejected(hello, result)]
    assert hello_ack(host.replies()).result is result
    assert host.link.hello is None  # the device that was up is no longer trusted
    assert host.link.features is Feature.NONE
    assert host.link.stats.handshakes == 1
    assert host.data(1) == []  # nor is its data taken


# -- time, seq numbers, reconnects ------------------------------------------------------
def test_silence_is_declared_at_the_timeout_not_before_and_once() -> None:
    host = up()
    host.send(FrameType.HEARTBEAT, Heartbeat(1, 0).to_bytes(), at=2.0)
    assert host.link.tick(2.0 + TIMEOUT - 0.001) == []
    assert host.link.tick(2.0 + TIMEOUT + 1.5) == [DeviceSilent(SERIAL, TIMEOUT + 1.5)]
    assert host.link.tick(2.0 + TIMEOUT + 10) == []
    assert host.link.hello is None


def test_no_silence_without_a_device() -> None:
    host = Host()
    assert host.link.tick(1000.0) == []
    host.link.connection_made(0.0)
    assert host.link.tick(1000.0) == []  # port open, nobody said HELLO


def test_host_frames_are_numbered_and_the_number_wraps() -> None:
    host = Host()
    for _ in range(257):
        host.link.connection_made(0.0)  # one HELLO_REQ each
    seqs = [f.seq for f in host.replies()]
    assert seqs == [*range(256), 0]


def test_an_ack_takes_the_seq_of_its_data_frame_not_a_new_one() -> None:
    host = up()  # HELLO_REQ seq 0, HELLO_ACK seq 1
    host.data(1, seq=200)
    host.link.committed(1)
    host.send(FrameType.ACK, Ack(1).to_bytes())  # not a device's frame: NAKed
    assert [(f.type, f.seq) for f in host.replies()] == [(FrameType.ACK, 200),
                                                         (FrameType.NAK, 2)]


def test_a_reopened_port_forgets_half_a_frame_and_asks_again() -> None:
    host = up()
    wire = Frame(FrameType.DATA, 1, Data(1, 0x21, b"\x01").to_bytes()).to_bytes()
    assert wire == bytes.fromhex("04 10 01 01  01  01  07 21 01 26 13 2a 8f  00")
    assert host.link.receive_data(wire[:5], 1.0) == []  # the port is reopened mid-frame
    host.link.connection_lost()
    assert host.link.data_to_send() == b""
    assert host.link.hello is None
    host.link.connection_made(2.0)
    assert types_and_payloads(host.replies()) == [(FrameType.HELLO_REQ, b"")]
    # the second half alone: the first half was forgotten, so this is not that frame
    tail = bytes.fromhex("00 21 01 26 13 2a 8f")
    assert host.link.receive_data(wire[5:], 3.0) == [FrameRejected("crc", tail)]
    assert host.hello() == [DeviceUp(HELLO)]


# -- found by the second run: counters, holds, the state after a reopen --------------------
def test_counters_add_up() -> None:
    host = Host()
    host.link.connection_made(0.0)  # HELLO_REQ
    host.data(1)  # before the handshake: HELLO_REQ
    host.data(1)  # again
    host.hello()  # HELLO_ACK
    host.hello()  # a reboot: HELLO_ACK
    crc_bad = cobs_encode(bytes.fromhex("03  00  3c 41 f4 6b")) + b"\x00"
    host.link.receive_data(crc_bad + crc_bad, 1.0)  # two NAKs
    host.send(FrameType.ACK, Ack(1).to_bytes())  # a NAK
    stats = host.link.stats
    assert (stats.data_before_hello, stats.handshakes) == (2, 2)
    assert (stats.bad_frames, stats.naks_sent) == (3, 3)
    assert stats.by_reason == {"crc": 2, "unexpected:ACK": 1}
    assert stats.frames_in == 5  # the damaged frames are not frames
    assert stats.frames_out == 1 + 2 + 2 + 3
    assert len(host.replies()) == stats.frames_out


def test_a_damaged_frame_does_not_hide_the_frames_after_it_in_the_same_read() -> None:
    host = up()
    crc_bad = cobs_encode(bytes.fromhex("03  00  3c 41 f4 6b")) + b"\x00"
    good = Frame(FrameType.DATA, 1, Data(3, 0x21, b"\x01").to_bytes()).to_bytes()
    assert host.link.receive_data(crc_bad + crc_bad + good, 1.0) == [
        FrameRejected("crc", bytes.fromhex("03 00 3c 41 f4 6b")),
        FrameRejected("crc", bytes.fromhex("03 00 3c 41 f4 6b")),
        Message(SERIAL, 3, 0x21, b"\x01"),
    ]


def test_an_event_id_still_committing_for_the_previous_device_is_held() -> None:
    host = up()
    assert host.data(5, seq=1) != []  # device A's event 5 is being committed
    other = Hello(PROTOCOL_VERSION, DeviceClass.TAG_RECEIVER, (1, 4, 2), 1, "TR-0002")
    assert host.hello(other) == [DeviceUp(other)]  # swapped for B behind the open port
    host.replies()
    assert host.data(5, seq=2) == []  # B's own event 5: held, not mistaken for A's
    assert host.data(5, seq=3) == []
    assert host.link.stats.held_for_other_device == 2
    host.link.committed(5)  # A's event: A is gone, so no ACK
    assert host.replies() == []
    assert host.data(5, seq=4) == [Message("TR-0002", 5, 0x21, b"\x01")]


def test_beyond_max_pending_an_event_is_neither_delivered_nor_acked() -> None:
    host = Host()
    host.link = HostLink(host.ledger.get, heartbeat_s=HEARTBEAT, link_timeout_s=TIMEOUT,
                         max_pending=2)
    host.hello()
    host.replies()
    assert host.data(1) != []
    assert host.data(2) != []
    assert host.data(3) == []  # the third while two are committing
    assert host.data(4) == []
    assert host.link.stats.held_busy == 2
    assert host.replies() == []
    host.link.committed(1)
    host.replies()
    assert host.data(3) == [Message(SERIAL, 3, 0x21, b"\x01")]


def test_silence_is_declared_at_exactly_the_timeout() -> None:
    host = up()
    host.send(FrameType.HEARTBEAT, Heartbeat(1, 0).to_bytes(), at=2.0)
    assert host.link.tick(2.0 + TIMEOUT) == [DeviceSilent(SERIAL, TIMEOUT)]


def test_after_the_port_is_lost_nothing_is_taken_and_nothing_times_out() -> None:
    host = up()
    host.link.connection_lost()
    assert host.link.hello is None
    assert host.link.tick(100.0) == []
    assert host.data(1) == []  # data without a handshake
    assert types_and_payloads(host.replies()) == [(FrameType.HELLO_REQ, b"")]


# -- WINDOW, frame by frame (section 9.8) ------------------------------------------------------
def window_hello(window: int = 8, next_id: int = 1) -> Hello:
    return Hello(PROTOCOL_VERSION, DeviceClass.TAG_RECEIVER, (1, 4, 2), 1, SERIAL,
                 Feature.WINDOW, window, next_id)


def window_up(ledger: dict[str, int] | None = None, **kwargs: int) -> Host:
    host = Host(ledger)
    host.link.connection_made(0.0)
    host.replies()
    hello = window_hello(**kwargs)
    assert host.hello(hello) == [DeviceUp(hello, Feature.WINDOW)]
    (answer,) = host.replies()
    assert HelloAck.from_bytes(answer.payload) == HelloAck(
        PROTOCOL_VERSION, HelloResult.OK, HEARTBEAT, Feature.WINDOW, host.link.window)
    return host


def kinds(frames: list[Frame]) -> list[tuple[str, int]]:
    """(type, event id) of RECEIPT and ACK frames, (NAK, reason) of NAKs."""
    return [(f.type.name, f.payload[0] if f.type is FrameType.NAK
             else Ack.from_bytes(f.payload).event_id) for f in frames]


def test_the_window_granted_is_the_smaller_of_the_two() -> None:
    assert window_up(window=8).link.window == 8
    assert window_up(window=255).link.window == 128  # HOST_WINDOW


@pytest.mark.parametrize("raw", [
    window_hello().to_bytes()[:-5],  # WINDOW offered, its fields missing
    window_hello().to_bytes()[:-5] + bytes(5),  # window 0
    HELLO.to_bytes() + bytes.fromhex("08 01 00 00 00"),  # the fields without the feature
])
def test_a_hello_whose_window_fields_do_not_fit_is_naked(raw: bytes) -> None:
    host = Host()
    host.link.connection_made(0.0)
    host.replies()
    assert host.send(FrameType.HELLO, raw) == [FrameRejected("payload:HELLO", raw)]
    assert types_and_payloads(host.replies()) == [(FrameType.NAK, nak().payload)]


@pytest.mark.parametrize("raw", [
    bytes.fromhex("02 00 02 01 00 00 00"),  # WINDOW granted, no window byte
    bytes.fromhex("02 00 02 01 00 00 00 00"),  # window 0
    bytes.fromhex("02 00 02 00 00 00 00 08"),  # a window byte, WINDOW not granted
])
def test_a_hello_ack_whose_window_does_not_fit_is_malformed(raw: bytes) -> None:
    with pytest.raises(ValueError, match="HELLO_ACK"):
        HelloAck.from_bytes(raw)


def test_each_event_is_receipted_at_once_and_acked_cumulatively_in_order() -> None:
    host = window_up()
    for event_id, seq in ((1, 10), (2, 11), (3, 12)):
        assert host.data(event_id, seq=seq) == [Message(SERIAL, event_id, 0x21, b"\x01")]
    assert kinds(host.replies()) == [("RECEIPT", 1), ("RECEIPT", 2), ("RECEIPT", 3)]
    host.link.committed(2)
    assert host.replies() == []  # 1 is not committed: nothing is ACKed
    host.link.committed(1)
    (ack,) = host.replies()
    assert (ack.type, Ack.from_bytes(ack.payload).event_id, ack.seq) == (FrameType.ACK, 2, 12)
    host.link.committed(3)
    host.link.committed(3)  # twice: one ACK
    assert kinds(host.replies()) == [("ACK", 3)]


def test_a_duplicate_is_receipted_while_pending_and_acked_once_committed() -> None:
    host = window_up()
    host.data(1)
    host.data(2)
    host.replies()
    assert host.data(1) == []  # still being committed: a RECEIPT again
    assert kinds(host.replies()) == [("RECEIPT", 1)]
    host.link.committed(2)
    host.replies()
    assert host.data(2) == []  # committed, but 1 is not: RECEIPT (the ACK waits for 1)
    assert kinds(host.replies()) == [("RECEIPT", 2)]
    host.link.committed(1)
    assert kinds(host.replies()) == [("ACK", 2)]
    assert host.data(1) == []  # behind the cumulative point: its ACK again
    assert kinds(host.replies()) == [("ACK", 2)]
    assert host.link.stats.duplicates == 3


def test_a_frame_past_a_gap_waits_and_one_nak_asks_for_the_missing_one() -> None:
    host = window_up(window=4)
    assert host.data(2) == []
    assert host.data(3) == []
    assert kinds(host.replies()) == [("RECEIPT", 2), ("NAK", 3), ("RECEIPT", 3)]
    assert host.data(5) == []  # 4 past the missing 1: beyond the window of 4
    assert host.replies() == []
    assert host.link.stats.held_busy == 1
    got = host.data(1)
    assert [e.event_id for e in got if isinstance(e, Message)] == [1, 2, 3]
    assert kinds(host.replies()) == [("RECEIPT", 1)]


@pytest.mark.parametrize(("next_id", "first_new"), [
    (45, 51),  # its head is committed already (the ACKs were lost): 45..50 are duplicates
    (51, 51),
    (90, 90),  # its ids jumped ahead (9.1): delivery starts at its head
    (0xFFFFFF00, 0xFFFFFF00),  # 305 before 50 (across the wrap): its ids started again
])
def test_the_next_event_after_a_handshake(next_id: int, first_new: int) -> None:
    host = window_up({SERIAL: 50}, next_id=next_id)
    if next_id != first_new:
        assert host.data(next_id) == []
        assert kinds(host.replies()) == [("ACK", 50)]
        assert host.data(first_new + 1) == []  # past the next one: kept
        host.replies()
    assert [e.event_id for e in host.data(first_new) if isinstance(e, Message)][:1] == [
        first_new]


def test_the_link_says_when_the_layer_above_may_defer_an_ack() -> None:
    host = window_up()
    assert host.link.can_defer_ack
    host.link.tick(TIMEOUT + 1)  # silent: no device handshaken
    assert not host.link.can_defer_ack
    assert not up().link.can_defer_ack  # a device without the feature
