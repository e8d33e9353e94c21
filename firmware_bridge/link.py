"""Host side of the device link: handshake, sequence numbers, ACK/NAK, duplicates.

Sans-IO. Fed with bytes and the time, it returns :class:`LinkEvent` objects and
queues bytes to write (:meth:`HostLink.data_to_send`). It never raises on input.

The host acknowledges a DATA frame only when told its event was committed
(:meth:`HostLink.committed`): the device keeps the event until then and
retransmits it, so between them no event is lost. A retransmission of the last
committed event of a device (its ACK was lost, or the gateway restarted between
commit and ACK) is acknowledged again and not delivered twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware_bridge.framing import BadFrame, Frame, FrameDecoder, FrameType
from firmware_bridge.messages import (
    FEATURES_VERSION,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Ack,
    Data,
    DeviceClass,
    Feature,
    Hello,
    HelloAck,
    HelloResult,
    Nak,
    NakReason,
    PayloadError,
)

log = logging.getLogger(__name__)

#: Interval at which a device sends HEARTBEAT frames when idle, seconds (told in HELLO_ACK).
HEARTBEAT_S = 2
#: Silence after which the host declares the device gone, seconds.
LINK_TIMEOUT_S = 3 * HEARTBEAT_S + 1
#: The link features this host implements (granted to a device that offers them).
HOST_FEATURES = Feature.NONE
#: Events delivered and not yet committed, at most, per link. A stop-and-wait device has
#: one; beyond this bound a new event is neither delivered nor ACKed (the device keeps it
#: and retransmits), so a device that ignores stop-and-wait costs throughput, not memory.
MAX_PENDING_EVENTS = 32


@dataclass(frozen=True, slots=True)
class DeviceUp:
    """A device completed the handshake (first contact, reconnect or reboot); *features*
    are those granted to it (always none for a version-1 device)."""

    hello: Hello
    features: Feature = Feature.NONE


@dataclass(frozen=True, slots=True)
class DeviceRejected:
    """A HELLO refused: *result* is the reason (``WRONG_CLASS`` also when a version-1
    device was told ``UNKNOWN_CLASS``, the nearest its version knows)."""

    hello: Hello
    result: HelloResult


@dataclass(frozen=True, slots=True)
class Message:
    """A new device event, to be committed and then acknowledged."""

    serial: str
    event_id: int
    msg_type: int
    body: bytes


@dataclass(frozen=True, slots=True)
class DeviceSilent:
    """Nothing heard from the device for :data:`LINK_TIMEOUT_S`."""

    serial: str | None
    silent_s: float


@dataclass(frozen=True, slots=True)
class FrameRejected:
    reason: str
    raw: bytes


LinkEvent = DeviceUp | DeviceRejected | Message | DeviceSilent | FrameRejected


@dataclass
class LinkStats:
    frames_in: int = 0
    frames_out: int = 0
    bad_frames: int = 0
    naks_sent: int = 0
    duplicates: int = 0
    retransmits_while_pending: int = 0
    held_for_other_device: int = 0
    held_busy: int = 0
    data_before_hello: int = 0
    handshakes: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)


class HostLink:
    """Host end of one device link. One instance per port; it outlives reconnects."""

    def __init__(
        self,
        last_committed: Callable[[str], int | None],
        *,
        heartbeat_s: int = HEARTBEAT_S,
        link_timeout_s: float = LINK_TIMEOUT_S,
        expected_class: DeviceClass | None = None,
        features: Feature = HOST_FEATURES,
        max_pending: int = MAX_PENDING_EVENTS,
    ) -> None:
        self._last_committed_of = last_committed
        self._heartbeat_s = heartbeat_s
        self._link_timeout_s = link_timeout_s
        self._expected_class = expected_class
        self._host_features = features
        #: the features granted at the handshake in force
        self.features = Feature.NONE
        self._max_pending = max_pending
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._seq = 0
        self.hello: Hello | None = None
        self._last_committed: int | None = None
        # event_id -> (serial of the device that sent it, seq of its latest DATA frame)
        self._pending: dict[int, tuple[str, int]] = {}
        self._last_rx: float | None = None
        self.stats = LinkStats()

    # -- connection lifecycle ------------------------------------------------
    def connection_made(self, now: float) -> None:
        """A port was (re)opened: forget partial input, ask the device who it is."""
        self._decoder = FrameDecoder()
        self.hello = None
        self._last_rx = now
        self._send(FrameType.HELLO_REQ, b"")

    def connection_lost(self) -> None:
        self.hello = None
        self._out.clear()

    # -- input ---------------------------------------------------------------
    def receive_data(self, data: bytes, now: float) -> list[LinkEvent]:
        events: list[LinkEvent] = []
        for item in self._decoder.feed(data):
            if isinstance(item, BadFrame):
                self._reject(events, item.reason.value, item.raw)
                continue
            # Only a valid frame proves the device is there: line noise does not.
            self._last_rx = now
            self.stats.frames_in += 1
            try:
                self._handle(item, events)
            except PayloadError as exc:
                self._reject(events, f"payload:{item.type.name}", exc.raw)
        return events

    def tick(self, now: float) -> list[LinkEvent]:
        if self._last_rx is None or self.hello is None:
            return []
        silent = now - self._last_rx
        if silent < self._link_timeout_s:
            return []
        serial = self.hello.serial
        self.hello = None
        return [DeviceSilent(serial, silent)]

    def committed(self, event_id: int) -> None:
        """The event was durably committed: acknowledge it to the device.

        If the device that sent the event is no longer the one handshaken on this
        port (it was unplugged, or swapped for another, while the event was being
        committed), nothing is sent: that device learns of the commit from
        ``last_committed`` at its next handshake and is re-ACKed then.
        """
        entry = self._pending.pop(event_id, None)
        if entry is None:
            return
        serial, seq = entry
        if self.hello is None or self.hello.serial != serial:
            return
        self._last_committed = event_id
        self._send(FrameType.ACK, Ack(event_id).to_bytes(), seq)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- internals -----------------------------------------------------------
    def _handle(self, frame: Frame, events: list[LinkEvent]) -> None:
        if frame.type is FrameType.HELLO:
            self._on_hello(Hello.from_bytes(frame.payload), events)
        elif frame.type is FrameType.DATA:
            self._on_data(frame, Data.from_bytes(frame.payload), events)
        elif frame.type is FrameType.HEARTBEAT:
            if self.hello is None:
                self._send(FrameType.HELLO_REQ, b"")
        else:
            self._reject(events, f"unexpected:{frame.type.name}", frame.payload)

    def _on_hello(self, hello: Hello, events: list[LinkEvent]) -> None:
        result = self._decide(hello)
        version = hello.protocol_version
        if version not in SUPPORTED_VERSIONS:
            version = PROTOCOL_VERSION  # the device may try again in this version
        wire_result = result
        if result is HelloResult.WRONG_CLASS and version < FEATURES_VERSION:
            wire_result = HelloResult.UNKNOWN_CLASS  # all a version-1 device knows
        granted = Feature(hello.features & self._host_features)
        ack_features = (int(granted) if result is HelloResult.OK
                        and version >= FEATURES_VERSION else None)
        self._send(FrameType.HELLO_ACK,
                   HelloAck(version, wire_result, self._heartbeat_s, ack_features).to_bytes())
        if result is not HelloResult.OK:
            self.hello = None
            self.features = Feature.NONE
            events.append(DeviceRejected(hello, result))
            return
        self.stats.handshakes += 1
        if self.hello is None or self.hello.serial != hello.serial:
            self._last_committed = self._last_committed_of(hello.serial)
        self.hello = hello
        self.features = granted if ack_features is not None else Feature.NONE
        events.append(DeviceUp(hello, self.features))

    def _decide(self, hello: Hello) -> HelloResult:
        if hello.protocol_version not in SUPPORTED_VERSIONS:
            return HelloResult.UNSUPPORTED_VERSION
        if hello.device_class not in DeviceClass.__members__.values():
            return HelloResult.UNKNOWN_CLASS
        if self._expected_class is not None and hello.device_class != self._expected_class:
            return HelloResult.WRONG_CLASS
        return HelloResult.OK

    def _on_data(self, frame: Frame, data: Data, events: list[LinkEvent]) -> None:
        if self.hello is None:
            # The device keeps the event; it resends it after the handshake.
            self.stats.data_before_hello += 1
            self._send(FrameType.HELLO_REQ, b"")
            return
        if data.event_id == self._last_committed:
            self.stats.duplicates += 1
            self._send(FrameType.ACK, Ack(data.event_id).to_bytes(), frame.seq)
            return
        serial = self.hello.serial
        entry = self._pending.get(data.event_id)
        if entry is not None:
            if entry[0] != serial:
                # The same id is still being committed for the device that was on this
                # port before; this one is held back until then (the device retransmits).
                self.stats.held_for_other_device += 1
                return
            self.stats.retransmits_while_pending += 1
            self._pending[data.event_id] = (serial, frame.seq)
            return
        if len(self._pending) >= self._max_pending:
            # backpressure (section 9.7): held back unanswered; the device retransmits
            self.stats.held_busy += 1
            return
        self._pending[data.event_id] = (serial, frame.seq)
        events.append(Message(serial, data.event_id, data.msg_type, data.body))

    def _reject(self, events: list[LinkEvent], reason: str, raw: bytes) -> None:
        self.stats.bad_frames += 1
        self.stats.by_reason[reason] += 1
        self.stats.naks_sent += 1
        self._send(FrameType.NAK, Nak(NakReason.BAD_FRAME).to_bytes())
        events.append(FrameRejected(reason, raw))

    def _send(self, ftype: FrameType, payload: bytes, seq: int | None = None) -> None:
        if seq is None:
            seq = self._seq
            self._seq = (self._seq + 1) & 0xFF
        self._out += Frame(ftype, seq, payload).to_bytes()
        self.stats.frames_out += 1
