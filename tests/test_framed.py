"""The glue between link and driver: a failing driver never strands a device event."""

from __future__ import annotations

from collections.abc import Callable

from core.record import Reading, SealedRecord
from firmware_bridge.device import DeviceLink
from firmware_bridge.framed import FramedDeviceProtocol
from firmware_bridge.messages import PROTOCOL_VERSION, DeviceClass, Hello


class Sink:
    def __init__(self) -> None:
        self.committed: list[Reading] = []
        self.backlog = 0  # readings not yet committed: none, it commits at once

    def submit(self, reading: Reading,
               on_committed: Callable[[SealedRecord], None] | None = None) -> None:
        self.submit_all([reading], on_committed)

    def submit_all(self, readings: list[Reading],
                   on_committed: Callable[[SealedRecord], None] | None = None) -> None:
        self.committed.extend(readings)  # "commits" at once
        if on_committed is not None:
            on_committed(SealedRecord(0, readings[-1].priority, readings[-1].kind, b"", b""))

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
