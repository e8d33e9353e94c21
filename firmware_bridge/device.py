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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from firmware_bridge.framing import BadFrame, Frame, FrameDecoder, FrameType
from firmware_bridge.messages import (
    PROTOCOL_VERSION,
    Ack,
    Data,
    Heartbeat,
    Hello,
    HelloAck,
    HelloResult,
    PayloadError,
)

RTO_INITIAL_S = 0.25
RTO_MIN_S = 0.05
RTO_MAX_S = 2.0
MAX_RETRIES = 5
HELLO_RETRY_S = 1.0


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


@dataclass
class DeviceLink:
    """Device end of the link. Call :meth:`tick` regularly with the current time."""

    hello: Hello
    next_event_id: int = 1
    queue: deque[QueuedEvent] = field(default_factory=deque)
    stats: DeviceStats = field(default_factory=DeviceStats)

    def __post_init__(self) -> None:
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
        self.hello = Hello(
            self.hello.protocol_version, self.hello.device_class, self.hello.firmware,
            self.hello.boot_count + 1, self.hello.serial,
        )
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
        if self._sent_at is not None:
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
            self._send_hello(now)
        elif frame.type is FrameType.HELLO_ACK:
            ack = HelloAck.from_bytes(frame.payload)
            if ack.result is HelloResult.OK:
                self._up = True
                self._heartbeat_s = max(ack.heartbeat_s, 1)
                self.stats.handshakes += 1
                self._sent_at = None
            else:
                self.stats.rejected_by_host += 1
        elif frame.type is FrameType.ACK:
            self._on_ack(Ack.from_bytes(frame.payload), now)
        elif frame.type is FrameType.NAK:
            self.stats.naks += 1
            if self._up and self._sent_at is not None:
                self.stats.retransmits += 1
                self._send_head(now)

    def _on_ack(self, ack: Ack, now: float) -> None:
        if not self.queue or self.queue[0].event_id != ack.event_id:
            return  # a late ACK of an event already acknowledged
        self.queue.popleft()
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
        self._frame(FrameType.HELLO, self.hello.to_bytes(), now)

    def _send_head(self, now: float) -> None:
        head = self.queue[0]
        self._sent_at = now
        self.stats.sent += 1
        self._frame(FrameType.DATA, Data(head.event_id, head.msg_type, head.body).to_bytes(), now)

    def _frame(self, ftype: FrameType, payload: bytes, now: float) -> None:
        self._out += Frame(ftype, self._seq, payload).to_bytes()
        self._seq = (self._seq + 1) & 0xFF
        self._last_tx = now


__all__ = ["PROTOCOL_VERSION", "DeviceLink", "QueuedEvent"]
