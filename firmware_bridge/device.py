"""Device side of the link, as the protocol document describes it (reference model).

Sans-IO; used by the simulators and the tests, and a model for firmware. The
device keeps every event in its queue ("flash") until the host acknowledges it,
sends one DATA frame at a time (stop-and-wait), and retransmits after an
adaptive timeout: the estimate ``srto = 7/8 * srto + 1/2 * rtt`` after each
unambiguous ACK; the timer ``rto`` doubles on each timeout and returns to ``srto``
at the next unambiguous ACK (Karn: so one loss slows at most the next event, and a
round trip longer than ``srto`` is still measured); both clamped
to [:data:`RTO_MIN_S`, :data:`RTO_MAX_S`]. After
:data:`MAX_RETRIES` timeouts in a row it starts the handshake again; it never
drops an event.

Version 2 (docs/serial-protocol.md, section 8): the HELLO offers features; the device
uses only those the HELLO_ACK grants. Answered by a version-1 host (a HELLO_ACK
"unsupported version" naming version 1, or a NAK of the longer HELLO it cannot read),
it says HELLO again in version 1. An ACK is taken only for a head the device sent since
it powered up: an ACK still on its way to the device that was on the port before
(swapped without the port being reopened) must not erase the newcomer's event.

WINDOW (section 9.8), when the device offers it (``hello.features``) and the host grants
it: up to ``window`` DATA frames unacknowledged, the first ones of the queue, sent in
order. A RECEIPT stops the retransmission timer of its frame (the host holds it and
will ACK it after its commit, within ``ACK_DEFER_MAX_S``); an ``ACK(x)`` is cumulative:
it erases the head of the queue up to ``x``. A frame neither receipted nor acknowledged
is sent again when its timer expires (``rto``, as in stop-and-wait; the oldest expired
one per tick) and, the oldest such, at once on a NAK; a receipted one after
:data:`RECEIPT_TIMEOUT_S`. After each handshake every event not acknowledged is sent
again.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field

from firmware_bridge.framing import BadFrame, Frame, FrameDecoder, FrameType
from firmware_bridge.messages import (
    FEATURES_VERSION,
    PROTOCOL_VERSION,
    Ack,
    Data,
    Feature,
    Heartbeat,
    Hello,
    HelloAck,
    HelloResult,
    PayloadError,
    Receipt,
)

RTO_INITIAL_S = 0.25
RTO_MIN_S = 0.05
RTO_MAX_S = 2.0
MAX_RETRIES = 5
HELLO_RETRY_S = 1.0
#: WINDOW: the window the reference device offers (frames kept unacknowledged).
WINDOW_DEFAULT = 128
#: WINDOW: how long a receipted frame waits for its ACK before it is sent again, seconds
#: (``link.ACK_DEFER_MAX_S`` + 5: the host's longest deferral, and some margin).
RECEIPT_TIMEOUT_S = 35.0
#: NAKs in a row, in answer to HELLO of version 2 (one per HELLO counts), after which the
#: device says HELLO in version 1 (the host is of version 1); the first ones are said
#: again at once.
HELLO_NAKS_FALLBACK = 3


@dataclass(slots=True)
class _InFlight:
    """WINDOW: one DATA frame sent and not yet acknowledged."""

    sent_at: float
    retries: int = 0
    receipted_at: float | None = None


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    event_id: int
    msg_type: int
    body: bytes


@dataclass
class DeviceStats:
    sent: int = 0
    retransmits: int = 0
    acked: int = 0
    naks: int = 0
    handshakes: int = 0
    rejected_by_host: int = 0
    bad_frames: int = 0
    stale_acks: int = 0
    fallbacks: int = 0
    receipts: int = 0


@dataclass
class DeviceLink:
    """Device end of the link. Call :meth:`tick` regularly with the current time."""

    hello: Hello
    next_event_id: int = 1
    queue: deque[QueuedEvent] = field(default_factory=deque)
    stats: DeviceStats = field(default_factory=DeviceStats)

    def __post_init__(self) -> None:
        if self.hello.features & Feature.WINDOW and not self.hello.window:
            self.hello = dataclasses.replace(self.hello, window=WINDOW_DEFAULT)
        self._offered = self.hello  # what the device says at power-up (its own version)
        #: the features the host granted at the handshake in force
        self.features = Feature.NONE
        self._head_sent = False  # the head went out at least once since power-up
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._seq = 0
        self._up = False
        self._heartbeat_s = 2.0
        self._rto = RTO_INITIAL_S  # the timer, backed off on timeouts
        self._srto = RTO_INITIAL_S  # the estimate from round trips
        self._sent_at: float | None = None
        self._retries = 0
        self._hello_sent_at: float | None = None
        self._last_tx = 0.0
        self._start: float | None = None
        self.acked_ids: list[int] = []
        #: WINDOW: the window granted (0: stop-and-wait) and the frames in flight, which
        #: are the first ones of the queue, in its order
        self.window = 0
        self._flight: dict[int, _InFlight] = {}
        self._hello_naks = 0
        self._hello_naked = False  # the HELLO last sent was answered by a NAK

    @property
    def up(self) -> bool:
        return self._up

    @property
    def rto(self) -> float:
        return self._rto

    def enqueue(self, msg_type: int, body: bytes) -> int:
        """Store a new event; it stays queued until the host acknowledges it."""
        event_id = self.next_event_id
        self.next_event_id = (self.next_event_id + 1) & 0xFFFFFFFF or 1
        self.queue.append(QueuedEvent(event_id, msg_type, body))
        return event_id

    def reboot(self, now: float) -> None:
        """Power cycle: the queue survives (it is in flash), the link does not."""
        self.hello = self._offered = dataclasses.replace(
            self._offered, boot_count=self.hello.boot_count + 1)
        self.features = Feature.NONE
        self.window = 0
        self._flight.clear()
        self._hello_naks = 0
        self._head_sent = False
        self._decoder = FrameDecoder()
        self._out.clear()
        self._up = False
        self._sent_at = None
        self._hello_sent_at = None
        self._start = now

    def receive_data(self, data: bytes, now: float) -> None:
        for item in self._decoder.feed(data):
            if isinstance(item, BadFrame):
                self.stats.bad_frames += 1
                continue
            try:
                self._handle(item, now)
            except PayloadError:
                self.stats.bad_frames += 1

    def tick(self, now: float) -> None:
        if self._start is None:
            self._start = now
        if not self._up:
            if self._hello_sent_at is None or now - self._hello_sent_at >= HELLO_RETRY_S:
                self._send_hello(now)
            return
        if self.window:
            self._tick_window(now)
        elif self._sent_at is not None:
            if now - self._sent_at >= self._rto:
                self._retries += 1
                self._rto = min(self._rto * 2, RTO_MAX_S)
                if self._retries > MAX_RETRIES:
                    self._up = False
                    self._sent_at = None
                    self._send_hello(now)
                    return
                self.stats.retransmits += 1
                self._send_head(now)
        elif self.queue:
            self._retries = 0
            self._send_head(now)
        if now - self._last_tx >= self._heartbeat_s:
            uptime = int(now - self._start)
            queued = min(len(self.queue), 0xFFFF)  # u16 on the wire: saturates
            self._frame(FrameType.HEARTBEAT, Heartbeat(uptime, queued).to_bytes(), now)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _handle(self, frame: Frame, now: float) -> None:
        if frame.type is FrameType.HELLO_REQ:
            self._up = False
            self._sent_at = None
            self._flight.clear()
            self._send_hello(now)
        elif frame.type is FrameType.HELLO_ACK:
            self._on_hello_ack(HelloAck.from_bytes(frame.payload), now)
        elif frame.type is FrameType.ACK:
            if self.window:
                self._on_window_ack(Ack.from_bytes(frame.payload), now)
            else:
                self._on_ack(Ack.from_bytes(frame.payload), now)
        elif frame.type is FrameType.RECEIPT:
            if self.window:
                self._on_receipt(Receipt.from_bytes(frame.payload), now)
        elif frame.type is FrameType.NAK:
            self.stats.naks += 1
            if self._up and self.window:
                self._resend_oldest(now)
            elif self._up and self._sent_at is not None:
                self.stats.retransmits += 1
                self._send_head(now)
            elif not self._up and self.hello.protocol_version >= FEATURES_VERSION:
                # a version-1 host cannot read this HELLO: it NAKs every one (line noise
                # damages one now and then, and the device would lose its window)
                if self._hello_naked:
                    return  # one NAK per HELLO counts (noise makes several bad chunks)
                self._hello_naked = True
                self._hello_naks += 1
                if self._hello_naks >= HELLO_NAKS_FALLBACK:
                    self._fall_back(1, now)
                else:
                    self._send_hello(now)

    def _on_hello_ack(self, ack: HelloAck, now: float) -> None:
        self._hello_naks = 0
        if ack.result is HelloResult.OK:
            was_up, window = self._up, self.window
            self._up = True
            self._heartbeat_s = max(ack.heartbeat_s, 1)
            self.features = Feature(self.hello.features & (ack.features or 0))
            self.window = ack.window if self.features & Feature.WINDOW else 0
            self.stats.handshakes += 1
            self._sent_at = None
            if not (was_up and window and self.window == window):
                # a new handshake: everything not acknowledged goes out again (an answer
                # to a repeated HELLO, while up, changes nothing in flight)
                self._flight.clear()
            if self.window:
                self._fill(now)
            return
        self.stats.rejected_by_host += 1
        if (ack.result is HelloResult.UNSUPPORTED_VERSION
                and 1 <= ack.protocol_version < self.hello.protocol_version):
            self._fall_back(ack.protocol_version, now)

    def _fall_back(self, version: int, now: float) -> None:
        """Say HELLO again in an older *version* (this model speaks every one up to its own)."""
        self.stats.fallbacks += 1
        hello = self.hello
        features = hello.features if version >= FEATURES_VERSION else 0
        self.hello = dataclasses.replace(hello, protocol_version=version, features=features)
        self._send_hello(now)

    def _on_ack(self, ack: Ack, now: float) -> None:
        if not self.queue or self.queue[0].event_id != ack.event_id:
            return  # a late ACK of an event already acknowledged
        if not self._head_sent:
            # not sent since power-up: an ACK meant for the device that was on the port
            self.stats.stale_acks += 1
            return
        self.queue.popleft()
        self._head_sent = False
        self.acked_ids.append(ack.event_id)
        self.stats.acked += 1
        if self._sent_at is not None and self._retries == 0:
            rtt = now - self._sent_at
            self._srto = min(max(7 / 8 * self._srto + 1 / 2 * rtt, RTO_MIN_S), RTO_MAX_S)
            self._rto = self._srto  # the backoff ends with an unambiguous ACK
        self._sent_at = None
        self._retries = 0
        if self.queue and self._up:  # while down, the next event waits for the handshake
            self._send_head(now)

    def _send_hello(self, now: float) -> None:
        self._hello_sent_at = now
        self._hello_naked = False
        if self.hello.offers_window:  # where the host is to expect the device's events
            next_id = self.queue[0].event_id if self.queue else self.next_event_id
            self.hello = dataclasses.replace(self.hello, next_id=next_id)
        self._frame(FrameType.HELLO, self.hello.to_bytes(), now)

    # -- WINDOW (section 9.8) ----------------------------------------------------------
    def _tick_window(self, now: float) -> None:
        timed_out = False
        for event, sent in zip(self.queue, list(self._flight.values()), strict=False):
            if sent.receipted_at is not None:
                if now - sent.receipted_at >= RECEIPT_TIMEOUT_S:  # its ACK is overdue
                    sent.receipted_at = None
                    self.stats.retransmits += 1
                    self._send_data(event, sent, now)
                continue
            if timed_out or now - sent.sent_at < self._rto:
                continue
            # one retransmission by timeout per tick, the oldest: the others wait for the
            # doubled timer (a host slow to answer gets a trickle, not the whole window)
            timed_out = True
            sent.retries += 1
            self._rto = min(self._rto * 2, RTO_MAX_S)
            if sent.retries > MAX_RETRIES:
                self._up = False
                self._flight.clear()
                self._send_hello(now)
                return
            self.stats.retransmits += 1
            self._send_data(event, sent, now)
        self._fill(now)

    def _fill(self, now: float) -> None:
        """Send the next events of the queue while the window has room."""
        if not self._up:
            return
        sent = len(self._flight)
        for event in itertools.islice(self.queue, sent, self.window):
            record = _InFlight(now)
            self._flight[event.event_id] = record
            self._send_data(event, record, now)

    def _send_data(self, event: QueuedEvent, record: _InFlight, now: float) -> None:
        record.sent_at = now
        self.stats.sent += 1
        self._frame(FrameType.DATA,
                    Data(event.event_id, event.msg_type, event.body).to_bytes(), now)

    def _sample(self, record: _InFlight, now: float) -> None:
        """An unambiguous round trip (sent once, answered): Karn's rule, as in 10."""
        if record.retries == 0 and record.receipted_at is None:
            rtt = now - record.sent_at
            self._srto = min(max(7 / 8 * self._srto + 1 / 2 * rtt, RTO_MIN_S), RTO_MAX_S)
            self._rto = self._srto

    def _on_receipt(self, receipt: Receipt, now: float) -> None:
        record = self._flight.get(receipt.event_id)
        if record is None or record.receipted_at is not None:
            return
        self.stats.receipts += 1
        self._sample(record, now)
        record.retries = 0
        record.receipted_at = now

    def _on_window_ack(self, ack: Ack, now: float) -> None:
        """Cumulative: every event of the queue up to ``ack.event_id``, if that one was
        sent since the last handshake (else a late ACK, or one meant for another device)."""
        record = self._flight.get(ack.event_id)
        if record is None:
            self.stats.stale_acks += 1
            return
        self._sample(record, now)
        while self.queue:
            event = self.queue.popleft()
            self._flight.pop(event.event_id, None)
            self.acked_ids.append(event.event_id)
            self.stats.acked += 1
            if event.event_id == ack.event_id:
                break
        self._fill(now)

    def _resend_oldest(self, now: float) -> None:
        """A NAK: the oldest frame neither receipted nor acknowledged goes out again."""
        for event, sent in zip(self.queue, list(self._flight.values()), strict=False):
            if sent.receipted_at is None:
                self.stats.retransmits += 1
                self._send_data(event, sent, now)
                return

    def _send_head(self, now: float) -> None:
        head = self.queue[0]
        self._sent_at = now
        self._head_sent = True
        self.stats.sent += 1
        self._frame(FrameType.DATA, Data(head.event_id, head.msg_type, head.body).to_bytes(), now)

    def _frame(self, ftype: FrameType, payload: bytes, now: float) -> None:
        self._out += Frame(ftype, self._seq, payload).to_bytes()
        self._seq = (self._seq + 1) & 0xFF
        self._last_tx = now


__all__ = ["PROTOCOL_VERSION", "DeviceLink", "Feature", "QueuedEvent"]
