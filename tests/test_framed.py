"""The glue between link and driver: a failing driver never strands a device event."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pytest

from core.record import Reading, SealedRecord, Source
from firmware_bridge.device import DeviceLink
from firmware_bridge.framed import REFUSED_RECORD_INTERVAL_S, FramedDeviceProtocol, LedgerOnly
from firmware_bridge.link import HostLink, Message
from firmware_bridge.messages import PROTOCOL_VERSION, DeviceClass, Feature, Hello

S = 1_000_000_000


class Sink:
    backlog = 0  # readings submitted, not yet committed: this sink commits at once

    def __init__(self) -> None:
        self.committed: list[Reading] = []
        self.ledgers: list[tuple[tuple[tuple[str, int], ...], Callable[[], None] | None,
                                 float | None]] = []
        self.backlog = 0  # readings not yet committed: none, it commits at once
        self.within: list[float | None] = []  # each submit_all's deadline

    def submit(self, reading: Reading,
               on_committed: Callable[[SealedRecord], None] | None = None) -> None:
        self.submit_all([reading], on_committed)

    def submit_all(self, readings: list[Reading],
                   on_committed: Callable[[SealedRecord], None] | None = None,
                   within_s: float | None = None) -> None:
        self.within.append(within_s)
        self.committed.extend(readings)  # "commits" at once
        if on_committed is not None:
            on_committed(SealedRecord(0, readings[-1].priority, readings[-1].kind, b"", b""))

    def submit_ledger(self, updates: tuple[tuple[str, int], ...],
                      on_committed: Callable[[], None] | None = None,
                      within_s: float | None = None) -> None:
        self.ledgers.append((updates, on_committed, within_s))  # committed by the test

    def last_committed_event(self, serial: str) -> int | None:
        return None


class InlineTransport:
    """The port's side, in memory: calls run at once, reopen requests are kept."""

    def __init__(self) -> None:
        self.reopens: list[str] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        fn()

    def reopen(self, reason: str) -> None:
        self.reopens.append(reason)


class BrokenDriver:
    def on_message(self, msg: object, hello: Hello, mono_ns: int) -> list[Reading]:
        raise RuntimeError("bug")

    def on_device_up(self, hello: Hello) -> list[Reading]:
        return []

    def tick(self, mono_ns: int) -> list[Reading]:
        return []


def test_a_driver_exception_is_recorded_and_the_device_acknowledged() -> None:
    sink = Sink()
    proto = FramedDeviceProtocol("tags", DeviceClass.TAG_RECEIVER, BrokenDriver(), sink)
    device = DeviceLink(Hello(PROTOCOL_VERSION, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1, "TR-9"))
    device.enqueue(0x01, b"\x42")
    now_ns = 0
    proto.connection_made(InlineTransport(), now_ns)
    for _ in range(50):
        now_ns += 10_000_000
        device.receive_data(proto.data_to_send(), now_ns / 1e9)
        device.tick(now_ns / 1e9)
        proto.data_received(device.data_to_send(), now_ns)
        proto.tick(now_ns)
    assert not device.queue  # acknowledged
    errors = [r for r in sink.committed if r.kind == "device.error"]
    assert len(errors) == 1
    assert errors[0].body["error"] == "driver_failure"
    assert errors[0].body["raw"] == "42"
    assert proto.stats.driver_errors == 1


class NoDriver(BrokenDriver):
    def on_message(self, msg: object, hello: Hello, mono_ns: int) -> list[Reading]:
        raise AssertionError("a refused device's message reached the driver")


def test_a_device_of_the_wrong_class_is_refused_with_a_rate_limited_record() -> None:
    """A kiosk on a tag receiver's port, looping HELLOs for an hour: its events are never
    ACKed nor delivered, and the store gets one device.refused per interval, not one per
    HELLO."""
    sink = Sink()
    proto = FramedDeviceProtocol("tags", DeviceClass.TAG_RECEIVER, NoDriver(), sink)
    kiosk = DeviceLink(Hello(PROTOCOL_VERSION, DeviceClass.KIOSK, (2, 1, 0), 3, "KI-0001"))
    kiosk.enqueue(0x12, b"check-in")
    now_ns = 0
    proto.connection_made(InlineTransport(), now_ns)
    hour_ns = 3600 * S
    while now_ns < hour_ns:
        now_ns += S // 10
        kiosk.receive_data(proto.data_to_send(), now_ns / 1e9)
        kiosk.tick(now_ns / 1e9)
        proto.data_received(kiosk.data_to_send(), now_ns)
        proto.tick(now_ns)
    assert len(kiosk.queue) == 1  # kept by the kiosk for a port that serves it
    assert kiosk.stats.sent == 0
    assert kiosk.stats.rejected_by_host >= 3600 - 2  # it said HELLO every second
    refused = [r for r in sink.committed if r.kind == "device.refused"]
    assert len(refused) == 3600 // REFUSED_RECORD_INTERVAL_S  # 12, not 3600
    assert refused[0].body == {
        "port": "tags", "reason": "wrong_class", "serial": "KI-0001", "class": "kiosk",
        "expected": "tag_receiver", "protocol": PROTOCOL_VERSION, "fw": "2.1.0", "refused": 1,
    }
    assert sum(int(r.body["refused"]) for r in refused) <= kiosk.stats.rejected_by_host
    assert refused[1].body["refused"] >= REFUSED_RECORD_INTERVAL_S - 1
    assert not [r for r in sink.committed if r.kind in ("device.up", "device.error")]


class GroupSink(Sink):
    """A store that commits what was submitted only when told to, in one group, and runs
    the group's callbacks in the reverse order."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[tuple[list[Reading], Callable[[SealedRecord], None] | None]] = []

    def submit_all(self, readings: list[Reading],
                   on_committed: Callable[[SealedRecord], None] | None = None,
                   within_s: float | None = None) -> None:
        self.within.append(within_s)
        self.queued.append((readings, on_committed))

    def commit_group(self) -> None:
        group, self.queued = self.queued, []
        for readings, _ in group:
            self.committed.extend(readings)
        for readings, callback in reversed(group):
            if callback is not None:
                callback(SealedRecord(0, readings[-1].priority, readings[-1].kind, b"", b""))


class EchoDriver(BrokenDriver):
    def on_message(self, msg: object, hello: Hello, mono_ns: int) -> list[Reading]:
        assert isinstance(msg, Message)
        return [Reading("device.error", Source("tag_receiver", hello.serial),
                        {"dev_event": msg.event_id}, mono_ns, (msg.serial, msg.event_id))]


class Pump:
    """Both ends of a link driven in steps of 10 ms of a fake clock."""

    def __init__(self, proto: FramedDeviceProtocol, device: DeviceLink) -> None:
        self.proto, self.device, self.now_ns = proto, device, 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.now_ns += 10_000_000
            self.device.receive_data(self.proto.data_to_send(), self.now_ns / 1e9)
            self.device.tick(self.now_ns / 1e9)
            self.proto.data_received(self.device.data_to_send(), self.now_ns)
            self.proto.tick(self.now_ns)


def test_a_window_device_is_acked_after_one_group_commit() -> None:
    """Version 2 with WINDOW through the glue: a window of events delivered at once, the
    driver may defer (can_defer_ack), nothing ACKed before the group commit, then all."""
    sink = GroupSink()
    proto = FramedDeviceProtocol("tags", DeviceClass.TAG_RECEIVER, EchoDriver(), sink)
    device = DeviceLink(Hello(PROTOCOL_VERSION, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1, "TR-9",
                              Feature.WINDOW, 8))
    ids = [device.enqueue(0x01, bytes([n])) for n in range(8)]
    proto.connection_made(InlineTransport(), 0)
    clock = Pump(proto, device)
    clock.run(20)
    assert proto.link.can_defer_ack
    assert [r.body["dev_event"] for readings, _ in sink.queued for r in readings
            if r.kind == "device.error"] == ids
    assert device.acked_ids == []  # nothing committed yet
    sink.commit_group()
    clock.run(5)
    assert device.acked_ids == ids
    assert device.stats.retransmits == 0


class LedgerDriver:
    """Every message is ledger entries alone (a beacon extending its tag's interval)."""

    def on_message(self, msg: Message, hello: Hello, mono_ns: int) -> LedgerOnly:
        return LedgerOnly((("tag:T1", msg.event_id),))

    def on_device_up(self, hello: Hello) -> list[Reading]:
        return []

    def tick(self, mono_ns: int) -> list[Reading]:
        return []


class DeferringLink(HostLink):
    """A link that negotiated a window of frames (protocol v2: ``can_defer_ack``)."""

    can_defer_ack = True


def tag_receiver(sink: Sink, driver: object, *, defer: bool
                 ) -> tuple[FramedDeviceProtocol, DeviceLink]:
    """A tag receiver's port (its ACKs deferrable when *defer*: a checkpoint of 7 s) and
    the device at the other end."""
    link = DeferringLink(sink.last_committed_event, expected_class=DeviceClass.TAG_RECEIVER) \
        if defer else None
    proto = FramedDeviceProtocol("tags", DeviceClass.TAG_RECEIVER, driver, sink,  # type: ignore[arg-type]
                                 link=link, ledger_checkpoint_s=7.0)
    return proto, DeviceLink(Hello(PROTOCOL_VERSION, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1,
                                   "TR-9"))


@pytest.mark.parametrize("defer", [False, True])
def test_ledger_entries_alone_are_committed_with_the_event_before_the_ack(defer: bool) -> None:
    sink = Sink()
    proto, device = tag_receiver(sink, LedgerDriver(), defer=defer)
    event = device.enqueue(0x01, b"\x42")
    proto.connection_made(InlineTransport(), 0)
    clock = Pump(proto, device)
    clock.run(20)
    assert [r.kind for r in sink.committed] == ["device.up"]  # no record of the message
    assert len(sink.ledgers) == 1
    updates, on_committed, within_s = sink.ledgers[0]
    assert updates == (("tag:T1", event), ("dev:TR-9", event))  # with the device's event
    assert within_s == (7.0 if defer else None)
    assert device.queue  # not acknowledged before the entries are durable
    assert on_committed is not None
    on_committed()
    clock.run(20)
    assert not device.queue
    assert proto.stats.ledger_only == 1
    assert len(sink.ledgers) == 1  # not submitted again


class KindDriver(LedgerDriver):
    """Every message is one reading of the kind its body names."""

    KINDS: ClassVar[dict[int, str]] = {0: "device.error", 1: "tag.tamper", 2: "checkin"}

    def on_message(self, msg: Message, hello: Hello, mono_ns: int) -> list[Reading]:  # type: ignore[override]
        return [Reading(self.KINDS[msg.body[0]], Source("tag_receiver", hello.serial),
                        {"dev_event": msg.event_id}, mono_ns, (msg.serial, msg.event_id))]


@pytest.mark.parametrize("defer", [False, True])
def test_on_a_windowed_link_readings_no_one_waits_for_wait_for_the_checkpoint(
        defer: bool) -> None:
    """A device whose ACK may wait: its status readings ride the checkpoint (within_s);
    an alarm and a check-in (a person at the kiosk) never wait. Stop-and-wait: none."""
    sink = Sink()
    proto, device = tag_receiver(sink, KindDriver(), defer=defer)
    for kind in (0, 1, 2, 0):
        device.enqueue(0x01, bytes([kind]))
    proto.connection_made(InlineTransport(), 0)
    Pump(proto, device).run(40)
    kinds = [r.kind for r in sink.committed]
    assert kinds == ["device.up", "device.error", "tag.tamper", "checkin", "device.error"]
    # device.up (the port's own: at once), then one per message
    assert sink.within == ([None, 7.0, None, None, 7.0] if defer else [None] * 5)
