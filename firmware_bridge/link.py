"""Host side of the device link: handshake, sequence numbers, ACK/NAK, duplicates.

Sans-IO. Fed with bytes and the time, it returns :class:`LinkEvent` objects and
queues bytes to write (:meth:`HostLink.data_to_send`). It never raises on input.

The host acknowledges a DATA frame only when told its event was committed
(:meth:`HostLink.committed`): the device keeps the event until then and
retransmits it, so between them no event is lost. A retransmission of the last
committed event of a device (its ACK was lost, or the gateway restarted between
commit and ACK) is acknowledged again and not delivered twice.

With a device granted :attr:`Feature.WINDOW` (docs/serial-protocol.md, section 9.8)
up to ``window`` DATA frames are in flight: the host answers each new one at once with a
RECEIPT (the device stops retransmitting it), delivers events in the order of their ids
(a frame past a missing one waits, bounded by the window), and acknowledges
cumulatively: ``ACK(x)`` says every event of the device up to ``x`` is committed. Its
ACK may therefore wait up to :data:`ACK_DEFER_MAX_S` (:attr:`HostLink.can_defer_ack`).
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
    WINDOW_LIMIT,
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
    Receipt,
)

log = logging.getLogger(__name__)

#: Interval at which a device sends HEARTBEAT frames when idle, seconds (told in HELLO_ACK).
HEARTBEAT_S = 2
#: Silence after which the host declares the device gone, seconds.
LINK_TIMEOUT_S = 3 * HEARTBEAT_S + 1
#: The link features this host implements (granted to a device that offers them).
HOST_FEATURES = Feature.WINDOW
#: Events delivered and not yet committed, at most, per link. A stop-and-wait device has
#: one; beyond this bound a new event is neither delivered nor ACKed (the device keeps it
#: and retransmits), so a device that ignores stop-and-wait costs throughput, not memory.
MAX_PENDING_EVENTS = 32
#: The largest window this host grants (WINDOW: DATA frames a device keeps unacknowledged).
HOST_WINDOW = 128
#: WINDOW: the longest the host may hold the commit-ACK of an event it sent a RECEIPT
#: for, seconds. The device waits :data:`firmware_bridge.device.RECEIPT_TIMEOUT_S` (longer)
#: before it sends such an event again.
ACK_DEFER_MAX_S = 30.0
#: Event ids run 1..0xFFFFFFFF, then 1 again (0 is never used): a cycle of this length.
ID_CYCLE = 0xFFFFFFFF
_HALF_CYCLE = 1 << 31


def id_distance(a: int, b: int) -> int:
    """Steps from event id *a* forward to *b* (ids wrap from 0xFFFFFFFF to 1)."""
    return (b - a) % ID_CYCLE


def id_next(a: int) -> int:
    return a % ID_CYCLE + 1


def id_prev(a: int) -> int:
    return (a - 2) % ID_CYCLE + 1


def id_after(a: int, b: int) -> bool:
    """*b* comes after *a* (within half the cycle)."""
    return 0 < id_distance(a, b) < _HALF_CYCLE


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
    receipts: int = 0  # WINDOW: RECEIPT frames sent
    held_ahead: int = 0  # WINDOW: frames received past a missing one, kept until it comes
    gaps: int = 0  # WINDOW: NAKs sent for a missing frame
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
        window: int = HOST_WINDOW,
    ) -> None:
        self._last_committed_of = last_committed
        self._heartbeat_s = heartbeat_s
        self._link_timeout_s = link_timeout_s
        self._expected_class = expected_class
        self._host_features = features
        #: the features granted at the handshake in force
        self.features = Feature.NONE
        self._max_pending = max_pending
        self._host_window = max(1, min(window, WINDOW_LIMIT))
        #: WINDOW: the window granted at the handshake in force (0: stop-and-wait)
        self.window = 0
        # WINDOW state, for the device handshaken (kept across its own re-handshakes):
        self._delivered: int | None = None  # the last event delivered, in id order
        self._expected: int | None = None  # the next id to deliver
        self._ahead: dict[int, tuple[Data, int]] = {}  # received past a missing one
        self._gap_naked: int | None = None  # the missing id a NAK was sent for
        self._acked_to: int | None = None  # the last cumulative ACK sent
        self._ack_due = False
        self._last_data_seq = 0
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
        self._ack_due = False

    @property
    def can_defer_ack(self) -> bool:
        """The device handshaken has the WINDOW feature: after a RECEIPT it waits for the
        commit-ACK up to :data:`ACK_DEFER_MAX_S` without retransmitting, so the layer
        above may let an event's commit wait (e.g. to share one fsync with later ones),
        for fewer than :attr:`window` events at a time."""
        return self.hello is not None and bool(self.features & Feature.WINDOW)

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
        if self.window:
            self._ack_due = True  # one cumulative ACK for all the commits of this turn
            return
        last = self._last_committed
        if last is None or id_after(last, event_id):  # only forward (commits of a window)
            self._last_committed = event_id
        self._send(FrameType.ACK, Ack(event_id).to_bytes(), seq)

    def data_to_send(self) -> bytes:
        if self._ack_due:
            self._ack_due = False
            self._send_cumulative_ack()
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
        if not hello.offers_window:
            granted &= ~Feature.WINDOW
        ack_features = (int(granted) if result is HelloResult.OK
                        and version >= FEATURES_VERSION else None)
        window = min(hello.window, self._host_window) if granted & Feature.WINDOW else 0
        self._send(FrameType.HELLO_ACK, HelloAck(version, wire_result, self._heartbeat_s,
                                                 ack_features, window).to_bytes())
        if result is not HelloResult.OK:
            self.hello = None
            self.features = Feature.NONE
            self.window = 0
            events.append(DeviceRejected(hello, result))
            return
        self.stats.handshakes += 1
        reload = self.hello is None or self.hello.serial != hello.serial
        self.hello = hello
        if reload:
            self._last_committed = self._last_committed_of(hello.serial)
            # delivered: the last committed, or after it, the events still being committed
            pending = [i for i, (serial, _seq) in self._pending.items() if serial == hello.serial]
            self._delivered = pending[-1] if pending else self._last_committed
            self._acked_to = id_prev(pending[0]) if pending else self._last_committed
        self.features = granted if ack_features is not None else Feature.NONE
        self.window = window if ack_features is not None else 0
        if self.window:
            self._start_window(hello)
        events.append(DeviceUp(hello, self.features))

    def _start_window(self, hello: Hello) -> None:
        """The device resends from its head (``next_id``): delivery continues after the
        last event delivered, or at the head when that is further on (a new device)."""
        self._ahead.clear()
        self._gap_naked = None
        delivered = self._delivered
        if (delivered is None or id_after(delivered, hello.next_id)
                or id_distance(hello.next_id, delivered) > WINDOW_LIMIT):
            # a new device, one further on, or one whose ids started again (section 9.1)
            self._expected = hello.next_id
        else:
            self._expected = id_next(delivered)

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
        if self.window:
            self._on_window_data(frame, data, events)
            return
        if self._committed_before(data.event_id):
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
        self._delivered = data.event_id
        events.append(Message(serial, data.event_id, data.msg_type, data.body))

    def _committed_before(self, event_id: int) -> bool:
        """The last committed event, or one of the WINDOW_LIMIT before it: committed
        already (ids are never reused, and events are committed in their order), though
        the device did not hear the ACK (a device that held a window of them, then said
        HELLO in version 1, sends them again)."""
        last = self._last_committed
        return last is not None and (event_id == last or (
            id_after(event_id, last) and id_distance(event_id, last) <= WINDOW_LIMIT))

    # -- WINDOW (section 9.8) ----------------------------------------------------
    def _on_window_data(self, frame: Frame, data: Data, events: list[LinkEvent]) -> None:
        event_id, expected = data.event_id, self._expected
        self._last_data_seq = frame.seq
        if expected is None:  # pragma: no cover - set at every windowed handshake
            return
        if event_id == expected:
            if self._deliver(frame.seq, data, events):
                self._deliver_held(events)
        elif id_after(expected, event_id):
            self._on_ahead(frame.seq, data, expected)
        else:
            self._on_behind(frame.seq, event_id)

    def _deliver_held(self, events: list[LinkEvent]) -> None:
        """Deliver the frames that waited for the one just delivered."""
        while self._expected in self._ahead:
            held, seq = self._ahead.pop(self._expected)
            if not self._deliver(seq, held, events, receipted=True):
                self._ahead[held.event_id] = (held, seq)
                return

    def _on_ahead(self, seq: int, data: Data, expected: int) -> None:
        """A frame past a missing one: kept (within the window) and receipted; the
        missing one is asked for with one NAK."""
        if id_distance(expected, data.event_id) >= self.window:
            self.stats.held_busy += 1  # beyond the window: held back unanswered
            return
        self.stats.held_ahead += 1
        self._ahead[data.event_id] = (data, seq)
        self._receipt(data.event_id, seq)
        if self._gap_naked != expected:  # once per missing frame: it is resent at once
            self._gap_naked = expected
            self.stats.gaps += 1
            self.stats.naks_sent += 1
            self._send(FrameType.NAK, Nak(NakReason.GAP).to_bytes())

    def _on_behind(self, seq: int, event_id: int) -> None:
        """A frame before the next one: delivered already, committed or not."""
        self.stats.duplicates += 1
        entry = self._pending.get(event_id)
        if entry is not None:
            if self.hello is None or entry[0] != self.hello.serial:
                self.stats.held_for_other_device += 1
            else:
                self.stats.retransmits_while_pending += 1
                self._receipt(event_id, seq)
            return
        acked_to = self._cumulative()
        if acked_to is not None and not id_after(acked_to, event_id):
            self._acked_to = None  # say it again: that ACK was lost
            self._ack_due = True
        else:
            self._receipt(event_id, seq)  # committed, behind one that is not yet

    def _deliver(self, seq: int, data: Data, events: list[LinkEvent], *,
                 receipted: bool = False) -> bool:
        """Deliver the next event in id order (False: held back, the host is full); a
        frame held past a gap was receipted when it came."""
        hello = self.hello
        if hello is None:  # pragma: no cover - only called after a handshake
            return False
        event_id = data.event_id
        entry = self._pending.get(event_id)
        if entry is not None and entry[0] != hello.serial:
            self.stats.held_for_other_device += 1
            return False
        if len(self._pending) >= max(self._max_pending, self.window):
            self.stats.held_busy += 1
            return False
        self._pending[event_id] = (hello.serial, seq)
        if self._delivered is None:  # the device's first event: nothing before it to ACK
            self._acked_to = id_prev(event_id)
        self._delivered = event_id
        self._expected = id_next(event_id)
        self._gap_naked = None
        if not receipted:
            self._receipt(event_id, seq)
        events.append(Message(hello.serial, event_id, data.msg_type, data.body))
        return True

    def _cumulative(self) -> int | None:
        """The id up to which every event of the device is committed: the one before
        its oldest pending event, or the last delivered."""
        hello = self.hello
        if hello is None:
            return None
        for event_id, (serial, _seq) in self._pending.items():
            if serial == hello.serial:
                return id_prev(event_id)
        return self._delivered

    def _send_cumulative_ack(self) -> None:
        if not self.window:
            return
        upto = self._cumulative()
        if upto is None or upto == self._acked_to:
            return
        self._acked_to = upto
        self._last_committed = upto
        self._send(FrameType.ACK, Ack(upto).to_bytes(), self._last_data_seq)

    def _receipt(self, event_id: int, seq: int) -> None:
        self.stats.receipts += 1
        self._send(FrameType.RECEIPT, Receipt(event_id).to_bytes(), seq)

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
