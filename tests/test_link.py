"""HostLink and the reference DeviceLink wired to each other in memory.

Sans-IO: a fake clock, two in-memory one-way lines (:class:`lab.wire.Line`: FIFO,
optional latency, seeded byte drops and bit flips), a fake store that commits what
the host delivers. No port, no thread, no sleep. After every step the rig checks the
safety invariant of the protocol: the device never holds an ACK for an event
the store has not committed.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from firmware_bridge.device import (
    HELLO_NAKS_FALLBACK,
    HELLO_RETRY_S,
    MAX_RETRIES,
    RECEIPT_TIMEOUT_S,
    RTO_INITIAL_S,
    RTO_MAX_S,
    RTO_MIN_S,
    DeviceLink,
)
from firmware_bridge.framing import Frame, FrameDecoder, FrameType
from firmware_bridge.link import (
    ACK_DEFER_MAX_S,
    HEARTBEAT_S,
    HOST_FEATURES,
    LINK_TIMEOUT_S,
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
    Receipt,
)
from lab.wire import Damage, Line, byte_flip_rate

STEP_S = 0.005


def make_device(serial: str = "TR-0001", *, version: int = PROTOCOL_VERSION,
                device_class: int = DeviceClass.TAG_RECEIVER, first_id: int = 1,
                features: int = 0, window: int = 0) -> DeviceLink:
    """A reference device; *window* > 0 offers the WINDOW feature with that window."""
    if window:
        features |= Feature.WINDOW
    return DeviceLink(Hello(version, device_class, (1, 4, 2), 1, serial, features, window),
                      next_event_id=first_id)


@dataclass
class Store:
    """The durable store, as far as the link is concerned: what was committed, per device."""

    records: list[tuple[str, int, bytes]] = field(default_factory=list)

    def last_committed(self, serial: str) -> int | None:
        ids = [event_id for s, event_id, _ in self.records if s == serial]
        return ids[-1] if ids else None

    def committed_ids(self, serial: str) -> list[int]:
        return [event_id for s, event_id, _ in self.records if s == serial]


def frames_in(chunks: list[bytes]) -> list[Frame]:
    decoder = FrameDecoder()
    return [f for chunk in chunks for f in decoder.feed(chunk) if isinstance(f, Frame)]


class Rig:
    """A host link, a device link, the wire between them and a store behind the host."""

    def __init__(
        self,
        device: DeviceLink,
        *,
        store: Store | None = None,
        to_host: Line | None = None,
        to_device: Line | None = None,
        auto_commit: bool = True,
        commit_delay_s: float = 0.0,
        expected_class: DeviceClass | None = DeviceClass.TAG_RECEIVER,
        host_features: Feature = Feature.NONE,
    ) -> None:
        self.now = 0.0
        self.expected_class = expected_class
        self.host_features = host_features
        self.device = device
        self.store = store or Store()
        self.to_host = to_host or Line()
        self.to_device = to_device or Line()
        self.auto_commit = auto_commit
        self.commit_delay_s = commit_delay_s
        self.events: list[LinkEvent] = []
        self.messages: list[Message] = []
        self.awaiting: deque[tuple[float, Message]] = deque()  # delivered, not yet committed
        self.device_running = True
        self.host = self._new_host()

    def _new_host(self) -> HostLink:
        self.delivered_by_host: set[tuple[str, int]] = set()
        return HostLink(self.store.last_committed, expected_class=self.expected_class,
                        features=self.host_features)

    # -- actions -----------------------------------------------------------------
    def connect(self) -> None:
        self.host.connection_made(self.now)
        self._flush_host()

    def restart_host(self) -> None:
        """The gateway process dies and starts again: what was not committed is gone."""
        self.awaiting.clear()
        self.to_device.clear()
        self.to_host.clear()
        self.host = self._new_host()
        self.connect()

    def commit(self, count: int | None = None) -> int:
        """The store commits the oldest *count* delivered events (all by default)."""
        done = 0
        while self.awaiting and (count is None or done < count):
            _, msg = self.awaiting.popleft()
            self._commit(msg)
            done += 1
        self._flush_host()
        return done

    def commit_group(self, count: int) -> int:
        """One group commit of the oldest *count* delivered events: durable together, in
        delivery order; their commit callbacks then run in the reverse order."""
        group = [self.awaiting.popleft()[1] for _ in range(min(count, len(self.awaiting)))]
        self.store.records += [(m.serial, m.event_id, m.body) for m in group]
        for msg in reversed(group):
            self.host.committed(msg.event_id)
        self._flush_host()
        return len(group)

    def _commit(self, msg: Message) -> None:
        self.store.records.append((msg.serial, msg.event_id, msg.body))
        self.host.committed(msg.event_id)

    def step(self, dt: float = STEP_S) -> None:
        self.now += dt
        if self.device_running:
            self.device.tick(self.now)
            self.to_host.send(self.device.data_to_send(), self.now)
        for chunk in self.to_host.receive(self.now):
            self._on_events(self.host.receive_data(chunk, self.now))
        self._on_events(self.host.tick(self.now))
        while (self.auto_commit and self.awaiting
               and self.awaiting[0][0] + self.commit_delay_s <= self.now):
            self._commit(self.awaiting.popleft()[1])
        self._flush_host()
        for chunk in self.to_device.receive(self.now):
            if self.device_running:
                self.device.receive_data(chunk, self.now)
        self.check_safety()

    def run(self, seconds: float, dt: float = STEP_S) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step(dt)

    def run_until(self, done: Callable[[], bool], limit_s: float, dt: float = STEP_S) -> None:
        end = self.now + limit_s
        while not done():
            assert self.now < end, f"not done after {limit_s} s of simulated time"
            self.step(dt)

    def drain(self, limit_s: float = 120.0) -> None:
        self.run_until(lambda: not self.device.queue, limit_s)

    # -- internals ---------------------------------------------------------------
    def _flush_host(self) -> None:
        self.to_device.send(self.host.data_to_send(), self.now)

    def _on_events(self, events: list[LinkEvent]) -> None:
        self.events += events
        for event in events:
            if isinstance(event, Message):
                key = (event.serial, event.event_id)
                # delivered once as new by one host: the second time would be a duplicate
                assert key not in self.delivered_by_host, f"{key} delivered twice"
                self.delivered_by_host.add(key)
                self.messages.append(event)
                self.awaiting.append((self.now, event))

    def check_safety(self) -> None:
        committed = set(self.store.committed_ids(self.device.hello.serial))
        unsafe = [i for i in self.device.acked_ids if i not in committed]
        assert not unsafe, f"device dropped events {unsafe} that were never committed"

    def of_type(self, kind: type) -> list[LinkEvent]:
        return [e for e in self.events if isinstance(e, kind)]


def up_rig(device: DeviceLink | None = None, **kwargs: object) -> Rig:
    rig = Rig(device or make_device(), **kwargs)
    rig.connect()
    rig.run_until(lambda: rig.device.up and rig.host.hello is not None, 1.0)
    return rig


# -- handshake --------------------------------------------------------------------------

def test_handshake_on_port_open() -> None:
    rig = Rig(make_device())
    rig.connect()
    assert frames_in(rig.to_device.sent) == [Frame(FrameType.HELLO_REQ, 0)]
    rig.step()
    hellos = [f for f in frames_in(rig.to_host.sent) if f.type is FrameType.HELLO]
    assert [Hello.from_bytes(f.payload) for f in hellos] == [rig.device.hello]
    assert rig.of_type(DeviceUp) == [DeviceUp(rig.device.hello)]
    assert rig.host.hello == rig.device.hello
    ack = [f for f in frames_in(rig.to_device.sent) if f.type is FrameType.HELLO_ACK]
    assert [HelloAck.from_bytes(f.payload) for f in ack] == [
        HelloAck(PROTOCOL_VERSION, HelloResult.OK, HEARTBEAT_S, 0)
    ]
    assert rig.device.up
    assert rig.device.stats.handshakes == 1


def test_device_says_hello_by_itself_at_boot_and_retries() -> None:
    rig = Rig(make_device())
    rig.to_host.tamper_next = lambda _data: b""  # the first HELLO is lost
    rig.run(0.5)
    assert not rig.device.up
    rig.run(HELLO_RETRY_S)  # no HELLO_REQ from the host: the device retries on its own
    assert rig.device.up
    assert rig.host.hello == rig.device.hello


def test_heartbeat_before_handshake_gets_a_hello_request() -> None:
    rig = up_rig()
    rig.restart_host()  # a new host knows nobody; the device still believes it is up
    rig.to_device.clear()  # ... and misses the new host's HELLO_REQ
    rig.run(HEARTBEAT_S + 0.1)
    assert rig.host.hello == rig.device.hello
    assert rig.host.stats.handshakes == 1


@pytest.mark.parametrize(
    ("version", "device_class", "result"),
    [
        (0, DeviceClass.TAG_RECEIVER, HelloResult.UNSUPPORTED_VERSION),
        (PROTOCOL_VERSION, 0x7F, HelloResult.UNKNOWN_CLASS),
        (PROTOCOL_VERSION, DeviceClass.KIOSK, HelloResult.WRONG_CLASS),
    ],
)
def test_rejected_device_sends_no_data(version: int, device_class: int,
                                       result: HelloResult) -> None:
    device = make_device(version=version, device_class=device_class)
    rig = Rig(device)
    device.enqueue(0x01, b"kept")
    rig.connect()
    rig.run(10.0)
    rejected = rig.of_type(DeviceRejected)
    assert rejected
    assert rejected[0] == DeviceRejected(device.hello, result)
    assert not rig.of_type(DeviceUp)
    assert rig.host.hello is None
    assert not device.up
    assert device.stats.rejected_by_host >= 1
    sent_types = {f.type for f in frames_in(rig.to_host.sent)}
    assert sent_types == {FrameType.HELLO}  # no DATA, no HEARTBEAT
    assert len(device.queue) == 1  # the event is kept for a host that will take it
    assert rig.messages == []
    answers = [HelloAck.from_bytes(f.payload) for f in frames_in(rig.to_device.sent)
               if f.type is FrameType.HELLO_ACK]
    assert answers
    assert {a.result for a in answers} == {result}
    assert {a.protocol_version for a in answers} == {PROTOCOL_VERSION}
    assert {a.features for a in answers} == {None}  # a refusal grants nothing


# -- version 2: versions, features, the device class of the port -----------------------

def test_a_version_1_device_is_served_in_version_1() -> None:
    rig = up_rig(make_device(version=1), host_features=Feature.WINDOW)
    answers = [HelloAck.from_bytes(f.payload) for f in frames_in(rig.to_device.sent)
               if f.type is FrameType.HELLO_ACK]
    assert answers == [HelloAck(1, HelloResult.OK, HEARTBEAT_S)]  # 3 bytes, as in version 1
    assert rig.of_type(DeviceUp) == [DeviceUp(rig.device.hello, Feature.NONE)]
    ids = [rig.device.enqueue(0x01, b"v1") for _ in range(3)]
    rig.drain(2.0)
    assert rig.store.committed_ids("TR-0001") == ids


def test_a_device_of_a_later_version_falls_back_and_is_served() -> None:
    device = make_device(version=PROTOCOL_VERSION + 1, features=0x3)
    rig = up_rig(device)
    assert device.stats.fallbacks >= 1
    assert device.hello.protocol_version == PROTOCOL_VERSION
    assert rig.host.hello == device.hello
    assert isinstance(rig.events[0], DeviceRejected)
    assert rig.of_type(DeviceUp) == [DeviceUp(device.hello, Feature.NONE)]


def test_a_version_2_device_falls_back_to_version_1_on_a_nak_of_its_hello() -> None:
    """A version-1 host cannot read the features field: it NAKs the HELLO."""
    device = make_device()
    device.tick(0.0)
    (hello,) = frames_in([device.data_to_send()])
    assert Hello.from_bytes(hello.payload).protocol_version == 2
    nak = Frame(FrameType.NAK, 0, Nak(1).to_bytes()).to_bytes()
    for _ in range(HELLO_NAKS_FALLBACK - 1):  # line noise, may be: said again at once
        device.receive_data(nak, 0.01)
        (again,) = frames_in([device.data_to_send()])
        assert Hello.from_bytes(again.payload).protocol_version == 2
    device.receive_data(nak, 0.01)
    (again,) = frames_in([device.data_to_send()])
    assert Hello.from_bytes(again.payload) == Hello(1, DeviceClass.TAG_RECEIVER, (1, 4, 2), 1,
                                                    "TR-0001")
    device.reboot(1.0)  # at its next power-up it offers version 2 again
    device.tick(1.0)
    (hello,) = frames_in([device.data_to_send()])
    assert Hello.from_bytes(hello.payload).protocol_version == 2


@pytest.mark.parametrize(("host", "offered", "granted"), [
    (Feature.NONE, Feature.WINDOW | Feature.FIRMWARE, Feature.NONE),
    (Feature.WINDOW | Feature.FIRMWARE, Feature.WINDOW, Feature.WINDOW),
    (Feature.WINDOW, 0x80000001, Feature.WINDOW),  # an unknown bit: not granted, not refused
    (Feature.FIRMWARE, Feature.WINDOW, Feature.NONE),
])
def test_features_granted_are_those_both_sides_implement(
    host: Feature, offered: int, granted: Feature,
) -> None:
    rig = up_rig(make_device(features=offered), host_features=host)
    acks = [HelloAck.from_bytes(f.payload) for f in frames_in(rig.to_device.sent)
            if f.type is FrameType.HELLO_ACK]
    assert [a.features for a in acks] == [granted]
    assert rig.host.features == rig.device.features == granted
    assert rig.of_type(DeviceUp) == [DeviceUp(rig.device.hello, granted)]


def test_a_device_of_the_wrong_class_is_refused_and_none_of_its_data_acked() -> None:
    """A kiosk on a tag receiver's port: refused at HELLO, and a DATA it sends anyway
    (a device ignoring the refusal) draws a HELLO_REQ, never an ACK or a delivery."""
    for version, told in ((2, HelloResult.WRONG_CLASS), (1, HelloResult.UNKNOWN_CLASS)):
        kiosk = make_device("KI-0001", version=version, device_class=DeviceClass.KIOSK)
        rig = Rig(kiosk)
        rig.connect()
        rig.run(3.0)
        rejected = rig.of_type(DeviceRejected)
        assert rejected
        assert {e.result for e in rejected if isinstance(e, DeviceRejected)} == {
            HelloResult.WRONG_CLASS}
        answers = {HelloAck.from_bytes(f.payload).result for f in frames_in(rig.to_device.sent)
                   if f.type is FrameType.HELLO_ACK}
        assert answers == {told}  # a version-1 device hears the nearest it knows
        rig.to_device.clear()
        rig.host.receive_data(Frame(FrameType.DATA, 9, Data(1, 0x12, b"x").to_bytes())
                              .to_bytes(), rig.now)
        sent = frames_in([rig.host.data_to_send()])
        assert [f.type for f in sent] == [FrameType.HELLO_REQ]
        assert rig.messages == []


# -- DATA and ACK -----------------------------------------------------------------------

def test_events_are_acked_only_after_commit() -> None:
    rig = up_rig(auto_commit=False)
    ids = [rig.device.enqueue(0x01, bytes([n]) * 5) for n in range(3)]
    rig.run(0.1)
    # stop-and-wait: one event delivered, kept by the device, not acknowledged
    assert [m.event_id for m in rig.messages] == ids[:1]
    assert rig.host.pending == 1
    assert len(rig.device.queue) == 3
    assert not any(f.type is FrameType.ACK for f in frames_in(rig.to_device.sent))
    rig.run(3.0)  # the device retransmits; the host waits for the commit, delivers once
    assert rig.device.stats.retransmits >= 2
    assert rig.host.stats.retransmits_while_pending >= 2
    assert [m.event_id for m in rig.messages] == ids[:1]
    for n in range(3):
        assert rig.commit() == 1
        rig.run(0.05)
        assert rig.device.acked_ids == ids[: n + 1]
    assert not rig.device.queue
    assert [m.event_id for m in rig.messages] == ids
    assert [m.body for m in rig.messages] == [bytes([n]) * 5 for n in range(3)]
    assert rig.host.pending == 0


def test_ack_echoes_the_seq_of_the_data_frame() -> None:
    rig = up_rig()
    rig.device.enqueue(0x01, b"x")
    rig.run(0.05)
    data = [f for f in frames_in(rig.to_host.sent) if f.type is FrameType.DATA]
    acks = [f for f in frames_in(rig.to_device.sent) if f.type is FrameType.ACK]
    assert len(data) == len(acks) == 1
    assert acks[0].seq == data[0].seq
    assert Ack.from_bytes(acks[0].payload).event_id == Data.from_bytes(data[0].payload).event_id


def test_lost_ack_leads_to_retransmission_reacked_and_delivered_once() -> None:
    rig = up_rig()
    event_id = rig.device.enqueue(0x01, b"beacon")
    rig.to_device.tamper_next = lambda _data: b""  # the ACK is lost
    rig.run(0.1)
    assert rig.device.queue  # no ACK yet
    assert rig.store.committed_ids("TR-0001") == [event_id]
    rig.run(RTO_INITIAL_S + 0.05)
    assert not rig.device.queue
    assert rig.device.stats.retransmits == 1
    assert rig.host.stats.duplicates == 1
    assert [m.event_id for m in rig.messages] == [event_id]
    assert rig.store.committed_ids("TR-0001") == [event_id]


def test_host_restart_between_commit_and_ack_reacks_without_redelivery() -> None:
    rig = up_rig(auto_commit=False)
    event_id = rig.device.enqueue(0x01, b"beacon")
    rig.run(0.05)
    assert [m.event_id for m in rig.messages] == [event_id]
    # the store commits; the gateway dies before the ACK leaves
    rig.store.records.append(("TR-0001", event_id, b"beacon"))
    rig.awaiting.clear()
    rig.restart_host()
    rig.run(3.0)
    assert not rig.device.queue
    assert rig.device.acked_ids == [event_id]
    assert rig.host.stats.duplicates == 1
    assert [m.event_id for m in rig.messages] == [event_id]  # not delivered again
    assert rig.store.committed_ids("TR-0001") == [event_id]


def test_host_restart_before_commit_redelivers() -> None:
    rig = up_rig(auto_commit=False)
    event_id = rig.device.enqueue(0x01, b"beacon")
    rig.run(0.05)
    rig.restart_host()  # delivered, never committed: gone with the process
    rig.auto_commit = True
    rig.run(3.0)
    assert not rig.device.queue
    assert [m.event_id for m in rig.messages] == [event_id, event_id]
    assert rig.store.committed_ids("TR-0001") == [event_id]


def test_device_reboot_keeps_its_queue() -> None:
    rig = up_rig(auto_commit=False)
    ids = [rig.device.enqueue(0x01, b"a"), rig.device.enqueue(0x01, b"b")]
    rig.run(0.05)
    rig.device.reboot(rig.now)
    assert rig.device.hello.boot_count == 2
    rig.auto_commit = True
    rig.drain(5.0)
    assert rig.device.acked_ids == ids
    assert rig.store.committed_ids("TR-0001") == ids


def test_nak_on_a_corrupted_frame_makes_the_device_retransmit_at_once() -> None:
    rig = up_rig()
    event_id = rig.device.enqueue(0x01, b"beacon")

    def flip(data: bytes) -> bytes:
        damaged = bytearray(data)
        damaged[5] ^= 0x04
        return bytes(damaged)

    rig.to_host.tamper_next = flip
    rig.run(0.02)  # well under the retransmission timeout
    assert len(rig.of_type(FrameRejected)) == 1
    naks = [f for f in frames_in(rig.to_device.sent) if f.type is FrameType.NAK]
    assert [Nak.from_bytes(f.payload).reason for f in naks] == [1]
    assert rig.device.stats.naks == 1
    assert rig.device.stats.retransmits == 1
    assert rig.device.acked_ids == [event_id]
    assert [m.event_id for m in rig.messages] == [event_id]


def test_device_down_sends_no_data_even_after_a_late_ack() -> None:
    device = make_device()
    device.receive_data(Frame(FrameType.HELLO_ACK, 0, HelloAck(1, HelloResult.OK, 2).to_bytes())
                        .to_bytes(), 0.0)
    first, _second = device.enqueue(0x01, b"a"), device.enqueue(0x01, b"b")
    device.tick(0.0)
    assert [f.type for f in frames_in([device.data_to_send()])] == [FrameType.DATA]
    device.receive_data(Frame(FrameType.HELLO_REQ, 1).to_bytes(), 0.01)  # the link goes down
    device.receive_data(Frame(FrameType.ACK, 0, Ack(first).to_bytes()).to_bytes(), 0.02)
    assert device.acked_ids == [first]  # an ACK proves the commit: accepted in any state
    device.tick(0.03)
    assert [f.type for f in frames_in([device.data_to_send()])] == [FrameType.HELLO]


def test_nak_without_data_in_flight_is_ignored() -> None:
    rig = up_rig()
    rig.host.receive_data(b"\x13\x37\x00", rig.now)  # line noise: the host NAKs it
    rig.run(0.05)
    assert rig.device.stats.naks == 1
    assert rig.device.stats.sent == 0


def test_events_shortly_before_the_last_committed_are_recognised() -> None:
    """Ids are never reused and events are committed in their order: an event among the
    255 before the last committed was committed (a device that held a window of them and
    then said HELLO in version 1 sends them again). It is ACKed again, not delivered."""
    rig = up_rig()
    first, second = rig.device.enqueue(0x01, b"a"), rig.device.enqueue(0x01, b"b")
    rig.drain(1.0)
    assert rig.store.committed_ids("TR-0001") == [first, second]
    rig.host.data_to_send()
    events = rig.host.receive_data(Frame(FrameType.DATA, 9, Data(first, 1, b"a").to_bytes())
                                   .to_bytes(), rig.now)
    assert events == []
    assert rig.host.data_to_send() == Frame(FrameType.ACK, 9, Ack(first).to_bytes()).to_bytes()
    # one far older than any window is another matter: taken as new, as in version 1
    far = (second - 300) % 0xFFFFFFFF or 1
    events = rig.host.receive_data(Frame(FrameType.DATA, 10, Data(far, 1, b"z").to_bytes())
                                   .to_bytes(), rig.now)
    assert events == [Message("TR-0001", far, 1, b"z")]


# -- silence and heartbeats ---------------------------------------------------------------

def test_heartbeats_keep_an_idle_link_up() -> None:
    rig = up_rig()
    rig.run(10 * LINK_TIMEOUT_S, dt=0.05)
    assert rig.of_type(DeviceSilent) == []
    beats = [Heartbeat.from_bytes(f.payload) for f in frames_in(rig.to_host.sent)
             if f.type is FrameType.HEARTBEAT]
    assert len(beats) >= 10 * LINK_TIMEOUT_S / HEARTBEAT_S - 2
    assert beats[-1].queued == 0
    assert beats[-1].uptime_s >= 10 * LINK_TIMEOUT_S - HEARTBEAT_S - 1


def test_silence_gives_device_silent_once_then_recovers() -> None:
    rig = up_rig()
    rig.device_running = False  # brown-out: the device says nothing at all
    rig.run(LINK_TIMEOUT_S - 0.1, dt=0.05)
    assert rig.of_type(DeviceSilent) == []
    rig.run(0.2, dt=0.05)
    silent = rig.of_type(DeviceSilent)
    assert len(silent) == 1
    assert isinstance(silent[0], DeviceSilent)
    assert silent[0].serial == "TR-0001"
    assert silent[0].silent_s >= LINK_TIMEOUT_S
    assert rig.host.hello is None
    rig.run(3 * LINK_TIMEOUT_S, dt=0.05)
    assert len(rig.of_type(DeviceSilent)) == 1  # reported once
    rig.device_running = True  # its next heartbeat gets a HELLO_REQ
    rig.run(HEARTBEAT_S + 0.5)
    assert rig.host.hello == rig.device.hello
    assert len(rig.of_type(DeviceUp)) == 2


def test_line_noise_does_not_count_as_the_device_speaking() -> None:
    rig = up_rig()
    rig.device_running = False
    for _ in range(int(2 * LINK_TIMEOUT_S / 0.1)):
        rig.now += 0.1
        rig.host.receive_data(b"\x55\xaa\x00", rig.now)
        rig.events += rig.host.tick(rig.now)
    assert len(rig.of_type(DeviceSilent)) == 1


def test_heartbeat_queue_count_saturates() -> None:
    rig = Rig(make_device(), auto_commit=False)
    rig.host = HostLink(rig.store.last_committed, heartbeat_s=1)
    for _ in range(0x10000 + 5):
        rig.device.enqueue(0x01, b"")
    rig.connect()
    # an unanswered DATA: the RTO backs off past the (1 s) heartbeat interval
    rig.run(4.0, dt=0.05)
    beats = [Heartbeat.from_bytes(f.payload) for f in frames_in(rig.to_host.sent)
             if f.type is FrameType.HEARTBEAT]
    assert beats
    assert beats[-1].queued == 0xFFFF


# -- retransmission timeout ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("commit_delay_s", "low", "high"),
    [
        # the round trip is the commit time plus up to two steps of the fake clock
        (0.1, 4 * 0.1, 4 * (0.1 + 3 * STEP_S)),
        (0.6, RTO_MAX_S, RTO_MAX_S),  # 4 x 0.6 s is over the ceiling
        (0.0, RTO_MIN_S, RTO_MIN_S),  # an instant commit hits the floor
    ],
)
def test_rto_converges_on_four_round_trips_within_its_clamps(
    commit_delay_s: float, low: float, high: float,
) -> None:
    # rto <- 7/8 rto + 1/2 rtt has 4 x rtt as its fixed point; the host's commit time
    # is part of the round trip.
    rig = up_rig(commit_delay_s=commit_delay_s)
    assert rig.device.rto == RTO_INITIAL_S
    for _ in range(40):
        rig.device.enqueue(0x01, b"x")
    rig.drain(60.0)
    assert low - 1e-9 <= rig.device.rto <= high + 1e-9


def test_rto_doubles_then_device_handshakes_again() -> None:
    rig = up_rig(auto_commit=False)
    rig.device.enqueue(0x01, b"x")
    rig.to_host.damage = Damage(drop_rate=1.0)  # the host hears nothing more
    sends: list[float] = []
    hello_at: float | None = None
    while hello_at is None:
        before = rig.device.stats.sent
        rig.step(0.001)
        if rig.device.stats.sent > before:
            sends.append(rig.now)
        if not rig.device.up:
            hello_at = rig.now
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sends)]
    expected = [min(RTO_INITIAL_S * 2**k, RTO_MAX_S) for k in range(MAX_RETRIES)]
    assert gaps == pytest.approx(expected, abs=0.002)
    assert len(sends) == 1 + MAX_RETRIES
    assert hello_at - sends[-1] == pytest.approx(RTO_MAX_S, abs=0.002)


def test_rto_constants_are_those_of_the_document() -> None:
    assert (RTO_INITIAL_S, RTO_MIN_S, RTO_MAX_S, MAX_RETRIES, HELLO_RETRY_S) == (
        0.25, 0.05, 2.0, 5, 1.0)
    assert (HEARTBEAT_S, LINK_TIMEOUT_S) == (2, 7)


# -- a device swapped on the same port -----------------------------------------------------

def test_swapped_device_is_not_acked_for_the_previous_ones_event() -> None:
    """The receiver on a port is replaced while its last event is being committed;
    the new one numbers its events the same way. Neither event may be lost."""
    store = Store()
    old = make_device("TR-OLD", first_id=5)
    rig = up_rig(old, store=store, auto_commit=False)
    old.enqueue(0x01, b"old")
    rig.run(0.05)
    assert [m.body for m in rig.messages] == [b"old"]
    # swap: the old device is gone, a new one answers on the same port
    new = make_device("TR-NEW", first_id=5)
    new.enqueue(0x01, b"new")
    rig.device = new
    rig.host.connection_lost()
    rig.to_device.clear()
    rig.to_host.clear()
    rig.connect()
    rig.run(0.5)
    assert rig.host.hello == new.hello
    assert [m.body for m in rig.messages] == [b"old"]  # same id: held back for now
    rig.commit()  # the old device's event is committed at last
    assert rig.store.committed_ids("TR-OLD") == [5]
    rig.run(0.05)
    assert new.acked_ids == []  # no ACK meant for the old device reaches the new one
    rig.auto_commit = True
    rig.drain(10.0)
    assert [m.body for m in rig.messages] == [b"old", b"new"]
    assert rig.store.committed_ids("TR-NEW") == [5]
    assert new.acked_ids == [5]


def test_swapped_device_without_a_reopen_loses_nothing() -> None:
    """Finding 9: the device behind an open port is swapped for another that numbers its
    events the same way, while the ACK of the old one's last event is still on the line.
    The newcomer must not take that ACK for its own event of the same id."""
    old = make_device("TR-OLD", first_id=5)
    rig = up_rig(old, auto_commit=False)
    old.enqueue(0x01, b"old")
    rig.run(0.05)
    assert rig.commit() == 1  # committed: the ACK for the old device leaves the host
    assert any(f.type is FrameType.ACK for f in frames_in(rig.to_device.sent))
    new = make_device("TR-NEW", first_id=5)  # powers up as the old ACK arrives
    new.enqueue(0x01, b"new")
    rig.device = new  # no reopen: the host's link object, and the line, go on
    rig.auto_commit = True
    rig.drain(10.0)
    assert rig.store.committed_ids("TR-NEW") == [5]
    assert new.acked_ids == [5]
    assert new.stats.stale_acks == 1
    assert [m.body for m in rig.messages] == [b"old", b"new"]
    assert rig.host.hello == new.hello


# -- a lossy line --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("drop", "ber", "bytewise"),
    [(0.0, 0.0, True), (0.01, 0.0, False), (0.0, 1e-3, False), (0.01, 1e-3, True)],
)
def test_lossy_line_delivers_every_event_exactly_once_in_order(
    seed: int, drop: float, ber: float, bytewise: bool,
) -> None:
    rng = random.Random(seed)

    def line() -> Line:  # ber is per bit: a byte is hit with probability 8 x ber
        return Line(Damage(bit_error_rate=byte_flip_rate(ber), drop_rate=drop, rng=rng),
                    latency_s=0.002, chunk_size=1 if bytewise else 0)

    rig = Rig(
        make_device(first_id=0xFFFFFFF0),  # crosses the wrap from 0xFFFFFFFF to 1
        to_host=line(),
        to_device=line(),
        commit_delay_s=0.02,
    )
    bodies = [rng.randbytes(rng.randrange(0, 40)) for _ in range(60)]
    ids = [rig.device.enqueue(0x01, body) for body in bodies]
    assert 1 in ids
    rig.connect()
    rig.drain(300.0)
    assert rig.store.records == [("TR-0001", i, b) for i, b in zip(ids, bodies, strict=True)]
    assert rig.device.acked_ids == ids
    # every delivery beyond the first of an event is a redelivery the host could not
    # avoid: none, since neither side restarted
    assert [m.event_id for m in rig.messages] == ids


# -- WINDOW: several frames in flight (section 9.8) ----------------------------------------

def window_rig(window: int = 4, **kwargs: object) -> Rig:
    kwargs.setdefault("host_features", HOST_FEATURES)
    return up_rig(make_device(window=window), **kwargs)


def test_the_window_is_negotiated_and_only_then_can_the_host_defer() -> None:
    rig = window_rig(8)
    assert rig.host.features == rig.device.features == Feature.WINDOW
    assert rig.host.window == rig.device.window == 8
    assert rig.host.can_defer_ack
    assert not up_rig(make_device()).host.can_defer_ack  # stop-and-wait: no window
    old_host = up_rig(make_device(window=8))  # a host that does not grant it
    assert old_host.device.window == 0
    assert not old_host.host.can_defer_ack
    assert not HostLink(lambda _s: None).can_defer_ack  # no device yet


def test_the_host_grants_at_most_its_own_window() -> None:
    rig = up_rig(make_device(window=200), host_features=HOST_FEATURES)
    assert rig.device.window == rig.host.window == 128


def test_a_window_of_frames_is_in_flight_receipted_and_acked_after_commit() -> None:
    rig = window_rig(4, auto_commit=False)
    ids = [rig.device.enqueue(1, bytes([n])) for n in range(10)]
    rig.run(0.1)
    # four frames went out, all four delivered and receipted; none ACKed (no commit)
    assert [m.event_id for m in rig.messages] == ids[:4]
    assert rig.device.stats.receipts == 4
    assert rig.device.acked_ids == []
    rig.commit()
    rig.run(0.1)
    assert rig.device.acked_ids == ids[:4]
    assert [m.event_id for m in rig.messages] == ids[:8]
    rig.auto_commit = True
    rig.drain()
    assert rig.store.committed_ids("TR-0001") == ids
    assert rig.device.stats.retransmits == 0


def test_one_cumulative_ack_for_a_group_committed_in_any_order() -> None:
    rig = window_rig(8, auto_commit=False)
    ids = [rig.device.enqueue(1, b"x") for _ in range(6)]
    rig.run(0.1)
    rig.to_device.clear()
    sent = []
    original = rig.host.data_to_send

    def spy() -> bytes:
        out = original()
        sent.extend(f for f in frames_in([out]) if f.type is FrameType.ACK)
        return out

    rig.host.data_to_send = spy  # type: ignore[method-assign]
    assert rig.commit_group(6) == 6  # committed together, callbacks in reverse order
    assert [Ack.from_bytes(f.payload).event_id for f in sent] == [ids[-1]]
    rig.run(0.1)
    assert rig.device.acked_ids == ids


def test_an_ack_waits_for_the_commit_of_every_event_before_it() -> None:
    rig = window_rig(8, auto_commit=False)
    ids = [rig.device.enqueue(1, b"x") for _ in range(3)]
    rig.run(0.1)
    first, second, third = (m for _, m in list(rig.awaiting))
    rig.awaiting.clear()
    rig.store.records.append((third.serial, third.event_id, third.body))
    rig.host.committed(third.event_id)  # its callback runs first
    rig._flush_host()
    rig.run(0.1)
    assert rig.device.acked_ids == []  # the first two are not committed yet
    for msg in (first, second):
        rig.store.records.append((msg.serial, msg.event_id, msg.body))
        rig.host.committed(msg.event_id)
    rig._flush_host()
    rig.run(0.1)
    assert rig.device.acked_ids == ids


def test_an_ack_deferred_for_ack_defer_max_s_costs_no_retransmission() -> None:
    rig = window_rig(4, auto_commit=False)
    ids = [rig.device.enqueue(1, b"x") for _ in range(3)]
    rig.run(ACK_DEFER_MAX_S, dt=0.05)
    assert [m.event_id for m in rig.messages] == ids
    assert rig.device.stats.retransmits == 0
    assert rig.of_type(DeviceSilent) == []  # heartbeats keep the link up meanwhile
    assert rig.host.hello is not None
    rig.commit()
    rig.run(0.1)
    assert rig.device.acked_ids == ids
    assert ACK_DEFER_MAX_S < RECEIPT_TIMEOUT_S


def test_a_receipted_frame_is_sent_again_once_its_ack_is_overdue() -> None:
    rig = window_rig(4, auto_commit=False)
    event_id = rig.device.enqueue(1, b"x")
    rig.run(RECEIPT_TIMEOUT_S + 0.5, dt=0.05)
    assert rig.device.stats.retransmits == 1  # sent again after RECEIPT_TIMEOUT_S
    assert rig.host.stats.retransmits_while_pending == 1  # receipted again, not redelivered
    assert [m.event_id for m in rig.messages] == [event_id]
    rig.commit()
    rig.run(0.1)
    assert rig.device.acked_ids == [event_id]


def test_a_frame_lost_in_the_window_is_asked_for_and_order_is_kept() -> None:
    rig = window_rig(8, auto_commit=False)
    ids = [rig.device.enqueue(1, bytes([n])) for n in range(5)]
    rig.device.tick(rig.now)
    frames = [f for f in frames_in([rig.device.data_to_send()]) if f.type is FrameType.DATA]
    assert [Data.from_bytes(f.payload).event_id for f in frames] == ids
    wire = [f.to_bytes() for f in frames]
    rig.to_host.send(wire[0] + b"".join(wire[2:]), rig.now)  # the second one is lost
    rig.step()
    assert [m.event_id for m in rig.messages] == ids[:1]  # the others wait for it
    assert rig.host.stats.gaps == 1
    rig.run(0.05)  # the NAK reaches the device: it sends the missing one at once
    assert [m.event_id for m in rig.messages] == ids
    assert rig.device.stats.retransmits == 1
    rig.commit()
    rig.run(0.1)
    assert rig.device.acked_ids == ids


def test_frames_past_a_gap_are_receipted_and_held_within_the_window() -> None:
    host = HostLink(lambda _s: None, features=HOST_FEATURES, window=4)
    host.connection_made(0.0)
    hello = Hello(2, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1, "TR-0009", Feature.WINDOW, 4, 10)
    host.receive_data(Frame(FrameType.HELLO, 0, hello.to_bytes()).to_bytes(), 0.0)
    host.data_to_send()

    def data(event_id: int, seq: int) -> bytes:
        return Frame(FrameType.DATA, seq, Data(event_id, 1, b"").to_bytes()).to_bytes()

    assert host.receive_data(data(12, 1) + data(13, 2) + data(14, 3), 0.0) == []
    answers = frames_in([host.data_to_send()])
    kinds = [(f.type, f.payload) for f in answers]
    assert (FrameType.NAK, Nak(NakReason.GAP).to_bytes()) in kinds  # once for 10
    assert [Receipt.from_bytes(p).event_id for t, p in kinds if t is FrameType.RECEIPT] == \
        [12, 13]  # 14 is 4 past the missing 10: beyond the window, held back unanswered
    got = host.receive_data(data(10, 4) + data(11, 5), 0.0)
    assert [m.event_id for m in got if isinstance(m, Message)] == [10, 11, 12, 13]


def test_host_restart_with_a_window_redelivers_only_what_was_not_committed() -> None:
    rig = window_rig(8, auto_commit=False)
    ids = [rig.device.enqueue(1, bytes([n])) for n in range(6)]
    rig.run(0.1)
    rig.commit(3)
    rig.to_device.clear()  # that ACK is lost; then the gateway dies
    rig.restart_host()
    rig.auto_commit = True
    rig.drain()
    assert rig.store.committed_ids("TR-0001") == ids  # each once
    assert rig.device.acked_ids == ids


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("drop", "ber"), [(0.01, 0.0), (0.0, 1e-3), (0.01, 1e-3)])
def test_lossy_line_with_a_window_delivers_every_event_once_in_order(
    seed: int, drop: float, ber: float,
) -> None:
    rng = random.Random(seed)

    def line() -> Line:
        return Line(Damage(bit_error_rate=byte_flip_rate(ber), drop_rate=drop, rng=rng),
                    latency_s=0.002)

    rig = Rig(make_device(first_id=0xFFFFFFF0, window=8), to_host=line(), to_device=line(),
              commit_delay_s=0.02, host_features=HOST_FEATURES)
    bodies = [rng.randbytes(rng.randrange(0, 40)) for _ in range(120)]
    ids = [rig.device.enqueue(0x01, body) for body in bodies]
    rig.connect()
    rig.drain(300.0)
    assert rig.store.records == [("TR-0001", i, b) for i, b in zip(ids, bodies, strict=True)]
    assert rig.device.acked_ids == ids
    assert [m.event_id for m in rig.messages] == ids


def test_a_window_beats_stop_and_wait_on_a_slow_commit() -> None:
    """Simulated time, not a timing assertion: 50 events with a 20 ms commit."""
    spent = {}
    for window in (0, 16):
        rig = up_rig(make_device(window=window), commit_delay_s=0.02,
                     host_features=HOST_FEATURES)
        for _ in range(50):
            rig.device.enqueue(1, b"x")
        start = rig.now
        rig.drain()
        spent[window] = rig.now - start
    assert spent[16] * 5 < spent[0]


# -- any schedule of faults --------------------------------------------------------------------

class LinkMachine(RuleBasedStateMachine):
    """Events, time, losses, restarts, commits, and devices swapped behind the open port,
    in any order; then a clean line must deliver everything, and at every moment nothing
    ACKed is uncommitted. Each device offers features; what it is granted is what the
    host implements too, whatever happened before."""

    SERIALS = ("TR-0001", "TR-0002")

    @initialize(host=st.sampled_from(list(Feature)), offered=st.integers(0, 0xFFFFFFFF),
                version=st.sampled_from([1, PROTOCOL_VERSION]),
                window=st.sampled_from([0, 1, 2, 5, 16]))
    def start(self, host: Feature, offered: int, version: int, window: int) -> None:
        # both devices number their events alike: the same ids on one port; a window
        # (when the device offers WINDOW) of one frame, a few, or more than are queued
        self.devices = {serial: make_device(serial, version=version, features=offered,
                                            window=window)
                        for serial in self.SERIALS}
        if window:
            offered |= Feature.WINDOW
        self.granted = Feature(offered & host) if version >= 2 else Feature.NONE
        self.rig = Rig(self.devices[self.SERIALS[0]], auto_commit=False, host_features=host)
        self.rig.check_safety = self.check_safety  # every device, not only the one plugged
        self.rig.connect()
        self.expected: dict[str, list[tuple[int, bytes]]] = {s: [] for s in self.SERIALS}

    def check_safety(self) -> None:
        for serial, device in self.devices.items():
            committed = set(self.rig.store.committed_ids(serial))
            unsafe = [i for i in device.acked_ids if i not in committed]
            assert not unsafe, f"{serial} dropped events {unsafe} never committed"

    @rule(body=st.binary(max_size=16))
    def enqueue(self, body: bytes) -> None:
        device = self.rig.device
        self.expected[device.hello.serial].append((device.enqueue(0x01, body), body))

    @rule(ms=st.integers(1, 1500))
    def advance(self, ms: int) -> None:
        self.rig.run(ms / 1000, dt=0.01)

    @rule(count=st.integers(1, 3))
    def commit(self, count: int) -> None:
        self.rig.commit(count)

    @rule(bodies=st.lists(st.binary(max_size=8), min_size=2, max_size=12))
    def enqueue_burst(self, bodies: list[bytes]) -> None:
        """Several events at once: a window fills."""
        for body in bodies:
            self.enqueue(body)

    @rule(count=st.integers(2, 8))
    def commit_group(self, count: int) -> None:
        """One group commit; its ACKs are called for in the reverse order."""
        self.rig.commit_group(count)

    @rule(s=st.integers(2, 40))
    def hold_commits(self, s: int) -> None:
        """The host holds its commits (deferred ACKs) for up to 40 s: past ACK_DEFER_MAX_S,
        the device sends its receipted frames again."""
        self.rig.run(float(s), dt=0.25)

    @rule()
    def lose_next_to_host(self) -> None:
        self.rig.to_host.tamper_next = lambda _data: b""

    @rule()
    def lose_next_to_device(self) -> None:
        self.rig.to_device.tamper_next = lambda _data: b""

    @rule(position=st.integers(0, 200), bit=st.integers(0, 7))
    def corrupt_next_to_host(self, position: int, bit: int) -> None:
        def flip(data: bytes) -> bytes:
            damaged = bytearray(data)
            damaged[position % len(damaged)] ^= 1 << bit
            return bytes(damaged)

        self.rig.to_host.tamper_next = flip

    @rule()
    def restart_host(self) -> None:
        self.rig.restart_host()

    @rule()
    def reopen_port(self) -> None:
        self.rig.host.connection_lost()
        self.rig.to_host.clear()
        self.rig.to_device.clear()
        self.rig.connect()

    @rule()
    def swap_device(self) -> None:
        """The other device takes the place of this one behind the open port (no reopen:
        what is on the line stays on it); it powers up as it is plugged in."""
        serial = self.rig.device.hello.serial
        other = self.devices[self.SERIALS[1 - self.SERIALS.index(serial)]]
        other.reboot(self.rig.now)
        self.rig.device = other

    @rule(ms=st.integers(100, 10_000))
    def device_stalls(self, ms: int) -> None:
        """The device says nothing for a while (long enough, the host calls it silent)."""
        self.rig.device_running = False
        self.rig.run(ms / 1000, dt=0.05)
        self.rig.device_running = True

    @rule()
    def reboot_device(self) -> None:
        self.rig.device.reboot(self.rig.now)

    @invariant()
    def committed_is_a_prefix_of_what_was_queued(self) -> None:
        for serial, device in self.devices.items():
            committed = [(i, b) for s, i, b in self.rig.store.records if s == serial]
            assert committed == self.expected[serial][: len(committed)]
            assert device.acked_ids == [i for i, _ in self.expected[serial][: len(
                device.acked_ids)]]

    @invariant()
    def features_in_force_are_the_granted_ones(self) -> None:
        device = self.rig.device
        if self.rig.host.hello is not None and device.up:
            assert self.rig.host.features in (self.granted, Feature.NONE)
        assert device.features in (self.granted, Feature.NONE)  # NONE: fell back to v1

    def teardown(self) -> None:
        self.rig.to_host.tamper_next = self.rig.to_device.tamper_next = None
        self.rig.auto_commit = True
        for _ in self.SERIALS:  # each device in turn, until both queues are empty
            self.rig.drain(60.0)
            self.swap_device()
        self.rig.drain(60.0)
        for serial in self.SERIALS:
            assert [(i, b) for s, i, b in self.rig.store.records if s == serial] == \
                self.expected[serial]


LinkMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLinkMachine = LinkMachine.TestCase


@given(st.lists(st.binary(max_size=300), max_size=10))
def test_host_never_raises_on_garbage(chunks: list[bytes]) -> None:
    host = HostLink(lambda _serial: None)
    host.connection_made(0.0)
    for n, chunk in enumerate(chunks):
        for event in host.receive_data(chunk, float(n)):
            assert isinstance(event, FrameRejected | DeviceUp | DeviceRejected | Message)
        host.tick(float(n))
    assert isinstance(host.data_to_send(), bytes)


def test_the_backoff_ends_with_the_ack() -> None:
    rig = Rig(make_device(), commit_delay_s=0.02)
    rig.connect()
    rig.run_until(lambda: rig.device.up, 5)
    for _ in range(5):
        rig.device.enqueue(1, b"x")
    rig.run_until(lambda: not rig.device.queue, 10)
    estimate = rig.device.rto
    rig.to_device.tamper_next = lambda _data: b""  # the next ACK is lost on the wire
    rig.device.enqueue(1, b"y")
    rig.run_until(lambda: rig.device.stats.retransmits > 0, 10)
    assert rig.device.rto == pytest.approx(min(2 * estimate, RTO_MAX_S))
    rig.run_until(lambda: not rig.device.queue, 10)
    assert rig.device.rto == pytest.approx(min(2 * estimate, RTO_MAX_S))  # ambiguous ACK
    rig.device.enqueue(1, b"z")  # answered at once: an unambiguous sample
    rig.run_until(lambda: not rig.device.queue, 10)
    assert rig.device.rto == pytest.approx(estimate, rel=0.2)
    assert rig.store.committed_ids("TR-0001") == [1, 2, 3, 4, 5, 6, 7]
