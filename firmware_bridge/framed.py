"""Glue between a port, the host link and a device driver (one per framed device).

Runs on the port's thread. Each new device message becomes readings submitted
to the store writer; the device is ACKed from the writer's commit callback,
hopped back onto the port thread with the transport's ``call_soon``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from core.record import JSON, Reading, SealedRecord, Source
from firmware_bridge.link import (
    DeviceRejected,
    DeviceSilent,
    DeviceUp,
    FrameRejected,
    HostLink,
    LinkEvent,
    Message,
)
from firmware_bridge.messages import DeviceClass, Hello
from firmware_bridge.port import Transport

log = logging.getLogger(__name__)
#: How much of a port error's text a device.lost record keeps.
REASON_CHARS = 120

class Driver(Protocol):
    def on_message(self, msg: Message, hello: Hello, mono_ns: int) -> list[Reading]: ...
    def on_device_up(self, hello: Hello) -> list[Reading]: ...
    def tick(self, mono_ns: int) -> list[Reading]: ...


class Sink(Protocol):
    def submit(
        self, reading: Reading, on_committed: Callable[[SealedRecord], None] | None = None
    ) -> None: ...

    def submit_all(
        self, readings: list[Reading], on_committed: Callable[[SealedRecord], None] | None = None
    ) -> None: ...

    def last_committed_event(self, serial: str) -> int | None: ...


@dataclass
class FramedStats:
    messages: int = 0
    submitted: int = 0
    acked: int = 0
    driver_errors: int = 0


class FramedDeviceProtocol:
    def __init__(
        self,
        port_name: str,
        device_class: DeviceClass,
        driver: Driver,
        sink: Sink,
        *,
        link: HostLink | None = None,
    ) -> None:
        self.port_name = port_name
        self.device_class = device_class
        self.driver = driver
        self.sink = sink
        self.link = link or HostLink(sink.last_committed_event)
        self._transport: Transport | None = None
        self.stats = FramedStats()
        self._source = Source(device_class.label, f"port:{port_name}")

    # -- PortProtocol ------------------------------------------------------------
    def connection_made(self, transport: Transport, now_ns: int) -> None:
        self._transport = transport
        self.link.connection_made(now_ns / 1e9)

    def data_received(self, data: bytes, now_ns: int) -> None:
        self._handle(self.link.receive_data(data, now_ns / 1e9), now_ns)

    def tick(self, now_ns: int) -> None:
        self._handle(self.link.tick(now_ns / 1e9), now_ns)
        readings = self.driver.tick(now_ns)
        if readings:
            self.sink.submit_all(readings)

    def connection_lost(self, reason: str, now_ns: int) -> None:
        self.link.connection_lost()
        self._status("device.lost", {"port": self.port_name, "reason": reason[:REASON_CHARS]},
                     now_ns)

    def data_to_send(self) -> bytes:
        return self.link.data_to_send()

    # -- internals ---------------------------------------------------------------
    def _handle(self, events: list[LinkEvent], now_ns: int) -> None:
        for event in events:
            if isinstance(event, Message):
                self._on_message(event, now_ns)
            elif isinstance(event, DeviceUp):
                hello = event.hello
                self._source = Source(self.device_class.label, hello.serial, hello.firmware_text)
                log.info("%s: %s %s fw %s up (boot %d)", self.port_name, self.device_class.label,
                         hello.serial, hello.firmware_text, hello.boot_count)
                self._status("device.up", {
                    "port": self.port_name, "boot": hello.boot_count,
                    "protocol": hello.protocol_version,
                }, now_ns)
                readings = self.driver.on_device_up(hello)
                if readings:
                    self.sink.submit_all(readings)
            elif isinstance(event, DeviceRejected):
                log.error("%s: device %s rejected: %s (protocol %d)", self.port_name,
                          event.hello.serial, event.result.name, event.hello.protocol_version)
            elif isinstance(event, DeviceSilent):
                self._status("device.lost", {"port": self.port_name, "reason": "silent",
                                             "silent_ms": int(event.silent_s * 1000)}, now_ns)
                if self._transport is not None:  # a wedged USB-UART often needs a reopen
                    self._transport.reopen("device silent: reopening the port")
            elif isinstance(event, FrameRejected):
                log.debug("%s: frame rejected (%s): %s", self.port_name, event.reason,
                          event.raw[:48].hex(" "))

    def _on_message(self, msg: Message, mono_ns: int) -> None:
        hello = self.link.hello
        if hello is None:  # pragma: no cover - the link only delivers after a handshake
            return
        self.stats.messages += 1
        try:
            readings = self.driver.on_message(msg, hello, mono_ns)
        except Exception:
            # A driver bug must not leave the event unacknowledged for ever (the device
            # would resend it without end): it is recorded raw, like an unreadable message.
            self.stats.driver_errors += 1
            log.exception("%s: driver failed on message %d", self.port_name, msg.msg_type)
            readings = [device_error(self._source, msg, "driver_failure", mono_ns,
                                     (msg.serial, msg.event_id))]
        if not readings:
            self.link.committed(msg.event_id)
            return
        event_id = msg.event_id
        self.stats.submitted += len(readings)

        transport = self._transport
        if transport is None:  # pragma: no cover - messages arrive only on a connection
            return

        def on_committed(_rec: SealedRecord) -> None:
            transport.call_soon(lambda: self._ack(event_id))

        self.sink.submit_all(readings, on_committed)

    def _ack(self, event_id: int) -> None:
        self.stats.acked += 1
        self.link.committed(event_id)

    def _status(self, kind: str, body: dict[str, JSON], mono_ns: int) -> None:
        self.sink.submit(Reading(kind, self._source, body, mono_ns))


def device_error(
    source: Source, msg: Message, why: str, mono_ns: int, event: tuple[str, int]
) -> Reading:
    """A message we cannot read is still evidence: it is recorded, raw, never dropped."""
    body: dict[str, JSON] = {
        "error": why,
        "msg_type": msg.msg_type,
        "raw": msg.body.hex(),
        "dev_event": msg.event_id,
    }
    return Reading("device.error", source, body, mono_ns, event)
