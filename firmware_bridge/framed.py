"""Glue between a port, the host link and a device driver (one per framed device).

Runs on the port's thread. Each new device message becomes readings submitted
to the store writer; the device is ACKed from the writer's commit callback,
hopped back onto the port thread with the transport's ``call_soon``.

Load: while the writer holds more than :data:`BACKLOG_PAUSE` readings not yet
committed, the port stops reading (the transport's ``pause_reading``) until the
backlog falls to :data:`BACKLOG_RESUME`; the link itself holds back new events
beyond its own bound (``link.MAX_PENDING_EVENTS``). Either way the device keeps its
events and retransmits: a flood costs throughput, never memory or evidence. A
device that handshakes again and again (a reboot loop, a HELLO flood) gets at most
:data:`DEVICE_UP_BURST` ``device.up`` records per :data:`FLAP_WINDOW_S`, and one
``device.flapping`` record counting the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from core.devices import device_ledger_key
from core.kinds import Priority
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
#: A port records a refused device (wrong class, version) at most once per this many
#: seconds; the record counts the refusals since the previous one.
REFUSED_RECORD_INTERVAL_S = 300.0
#: Readings submitted to the writer and not yet committed (every port together) above
#: which a port stops reading, and at or below which it reads again.
BACKLOG_PAUSE = 4_000
BACKLOG_RESUME = 1_000
#: device.up records per port in one window; later handshakes of the window are counted
#: and summarised in one device.flapping record when the window ends.
DEVICE_UP_BURST = 3
FLAP_WINDOW_S = 60.0
#: How long ledger entries without a record (:class:`LedgerOnly`), and readings no one
#: waits for (below the check-in class: not an alarm, not a check-in), may wait for a
#: transaction to ride along with when the link may defer its ACKs (a window of frames:
#: ``HostLink.can_defer_ack``); a stop-and-wait device waits only the writer's own linger.
#: The daemon sets it from ``[tags] interval_checkpoint_s``.
LEDGER_CHECKPOINT_S = 20.0

#: Ledger entries (key, integer value) a store transaction keeps.
Ledger = tuple[tuple[str, int], ...]


#: The window assumed when a link that may defer ACKs does not say its own.
DEFER_WINDOW = 32


@dataclass(frozen=True, slots=True)
class LedgerOnly:
    """A message whose whole effect is ledger entries, no record (a beacon that only
    extends its tag's open presence interval): the port commits *updates* with the device's
    event (``StoreWriter.submit_ledger``) and acknowledges the device once they are durable."""

    updates: Ledger


class Driver(Protocol):
    def on_message(
        self, msg: Message, hello: Hello, mono_ns: int
    ) -> list[Reading] | LedgerOnly: ...
    def on_device_up(self, hello: Hello) -> list[Reading]: ...
    def tick(self, mono_ns: int) -> list[Reading]: ...


class Sink(Protocol):
    def submit(
        self, reading: Reading, on_committed: Callable[[SealedRecord], None] | None = None
    ) -> None: ...

    def submit_all(
        self, readings: list[Reading], on_committed: Callable[[SealedRecord], None] | None = None
    ) -> None: ...
    # and, called only with a deadline (a link that may defer its ACKs):
    # submit_all(readings, on_committed, within_s)

    def submit_ledger(
        self, updates: Ledger, on_committed: Callable[[], None] | None = None,
        within_s: float | None = None,
    ) -> None: ...

    def last_committed_event(self, serial: str) -> int | None: ...

    @property
    def backlog(self) -> int:
        """Readings submitted and not yet committed."""


@dataclass
class FramedStats:
    messages: int = 0
    submitted: int = 0
    acked: int = 0
    driver_errors: int = 0
    pauses: int = 0  # times this port stopped reading because the writer was behind
    handshakes_not_recorded: int = 0  # summarised in device.flapping records
    ledger_only: int = 0  # messages committed as ledger entries alone (no record)


@dataclass(frozen=True, slots=True)
class Flapping:
    """A window in which a port saw more handshakes than it records."""

    handshakes: int
    not_recorded: int


class FlapLimiter:
    """Rate limit of one port's ``device.up`` records (sans-IO, time from the caller).

    A window opens at a handshake; the first *burst* handshakes in it are recorded, the
    others only counted, and :meth:`due` returns their summary once the window is over.
    """

    def __init__(self, burst: int = DEVICE_UP_BURST, window_s: float = FLAP_WINDOW_S) -> None:
        self.burst = burst
        self.window_s = window_s
        self._start_ns: int | None = None
        self._count = 0

    def allow(self, now_ns: int) -> bool:
        """A handshake happened: True if it deserves its own device.up record."""
        if self._start_ns is None:
            self._start_ns = now_ns
        self._count += 1
        return self._count <= self.burst

    @property
    def flapping(self) -> bool:
        """The current window has handshakes not recorded."""
        return self._count > self.burst

    def due(self, now_ns: int) -> Flapping | None:
        """The summary of the window if it is over and had handshakes not recorded."""
        start = self._start_ns
        if start is None or now_ns - start < self.window_s * 1e9:
            return None
        return self.close()

    def close(self) -> Flapping | None:
        """End the window now (the port closed); its summary, if it needs one."""
        count, self._start_ns, self._count = self._count, None, 0
        if count <= self.burst:
            return None
        return Flapping(count, count - self.burst)


class RefusalLimiter:
    """One ``device.refused`` record per port per *interval_s* at most (sans-IO): a device
    looping HELLOs is counted, and each record says how many refusals it stands for."""

    def __init__(self, interval_s: float = REFUSED_RECORD_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last_ns: int | None = None
        self._count = 0

    def refused(self, now_ns: int) -> int | None:
        """A HELLO was refused: the refusals to record now (this one included), or None."""
        self._count += 1
        if self._last_ns is not None and now_ns - self._last_ns < self.interval_s * 1e9:
            return None
        self._last_ns = now_ns
        count, self._count = self._count, 0
        return count


class FramedDeviceProtocol:
    def __init__(
        self,
        port_name: str,
        device_class: DeviceClass,
        driver: Driver,
        sink: Sink,
        *,
        link: HostLink | None = None,
        flap: FlapLimiter | None = None,
        backlog_pause: int = BACKLOG_PAUSE,
        backlog_resume: int = BACKLOG_RESUME,
        ledger_checkpoint_s: float = LEDGER_CHECKPOINT_S,
    ) -> None:
        self.port_name = port_name
        self.device_class = device_class
        self.driver = driver
        self.sink = sink
        self.link = link or HostLink(sink.last_committed_event, expected_class=device_class)
        self._refusals = RefusalLimiter()
        self._transport: Transport | None = None
        self._flap = flap or FlapLimiter()
        self._backlog_pause = backlog_pause
        self._backlog_resume = backlog_resume
        self._ledger_checkpoint_s = ledger_checkpoint_s
        #: Events whose ledger entries wait for a checkpoint (their ACK deferred): at half
        #: the device's window, the next one is committed at once with them, so that the
        #: device never waits for a checkpoint with its window full.
        self._deferred: set[int] = set()
        self._paused = False
        self.stats = FramedStats()
        self._source = Source(device_class.label, f"port:{port_name}")
        #: The last device that completed a handshake here (``gateway.py status``).
        self.last_hello: Hello | None = None
        #: Why the last device to say HELLO here was refused (None since one was taken).
        self.refused: str | None = None

    # -- PortProtocol ------------------------------------------------------------
    def connection_made(self, transport: Transport, now_ns: int) -> None:
        self._transport = transport
        self._paused = False  # a port opens reading
        self.link.connection_made(now_ns / 1e9)

    def data_received(self, data: bytes, now_ns: int) -> None:
        self._handle(self.link.receive_data(data, now_ns / 1e9), now_ns)
        self._flow()

    def tick(self, now_ns: int) -> None:
        self._flapping_summary(self._flap.due(now_ns), now_ns)
        self._flow()
        if self._paused:
            # Nothing is read: the link's silence and the driver's timeouts (a tag not
            # heard) would be our own doing. They resume with the reading.
            return
        self._handle(self.link.tick(now_ns / 1e9), now_ns)
        readings = self.driver.tick(now_ns)
        if readings:
            self.sink.submit_all(readings)

    def connection_lost(self, reason: str, now_ns: int) -> None:
        self.link.connection_lost()
        self._deferred.clear()  # a new handshake: the device sends them again
        self._flapping_summary(self._flap.close(), now_ns)
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
                self._on_device_up(event.hello, now_ns)
            elif isinstance(event, DeviceRejected):
                self._on_refused(event, now_ns)
            elif isinstance(event, DeviceSilent):
                self._status("device.lost", {"port": self.port_name, "reason": "silent",
                                             "silent_ms": int(event.silent_s * 1000)}, now_ns)
                if self._transport is not None:  # a wedged USB-UART often needs a reopen
                    self._transport.reopen("device silent: reopening the port")
            elif isinstance(event, FrameRejected):
                log.debug("%s: frame rejected (%s): %s", self.port_name, event.reason,
                          event.raw[:48].hex(" "))

    def _on_device_up(self, hello: Hello, now_ns: int) -> None:
        self._source = Source(self.device_class.label, hello.serial, hello.firmware_text)
        self.last_hello, self.refused = hello, None
        self._flapping_summary(self._flap.due(now_ns), now_ns)
        was_flapping = self._flap.flapping
        if self._flap.allow(now_ns):
            log.info("%s: %s %s fw %s up (boot %d)", self.port_name, self.device_class.label,
                     hello.serial, hello.firmware_text, hello.boot_count)
            self._status("device.up", {
                "port": self.port_name, "boot": hello.boot_count,
                "protocol": hello.protocol_version,
            }, now_ns)
        else:
            self.stats.handshakes_not_recorded += 1
            if not was_flapping:
                log.warning("%s: %s %s handshakes again and again: more than %d in %.0f s; "
                            "the next ones are counted in a device.flapping record",
                            self.port_name, self.device_class.label, hello.serial,
                            self._flap.burst, self._flap.window_s)
        readings = self.driver.on_device_up(hello)
        if readings:
            self.sink.submit_all(readings)

    def _flapping_summary(self, flapping: Flapping | None, now_ns: int) -> None:
        if flapping is None:
            return
        log.warning("%s: device flapping: %d handshakes in one window (%.0f s at most), %d "
                    "of them summarised in one device.flapping record", self.port_name,
                    flapping.handshakes, self._flap.window_s, flapping.not_recorded)
        self._status("device.flapping", {
            "port": self.port_name, "handshakes": flapping.handshakes,
            "not_recorded": flapping.not_recorded, "window_s": round(self._flap.window_s),
        }, now_ns)

    def _flow(self) -> None:
        """Backpressure: stop reading while the writer is behind, read again once it
        caught up (hysteresis between the two bounds)."""
        transport = self._transport
        if transport is None:
            return
        backlog = self.sink.backlog
        if not self._paused and backlog >= self._backlog_pause:
            self._paused = True
            self.stats.pauses += 1
            log.debug("%s: %d readings wait for the store: not reading", self.port_name,
                      backlog)
            transport.pause_reading()
        elif self._paused and backlog <= self._backlog_resume:
            self._paused = False
            transport.resume_reading()

    def _on_refused(self, event: DeviceRejected, now_ns: int) -> None:
        """A device the port does not serve said HELLO: it gets no ACK for its data, and a
        ``device.refused`` record says so (rate-limited: a HELLO loop cannot flood the store)."""
        hello = event.hello
        self.refused = event.result.name.lower()
        count = self._refusals.refused(now_ns)
        if count is None:
            log.debug("%s: device %s refused again (%s)", self.port_name, hello.serial,
                      event.result.name)
            return
        try:
            offered = DeviceClass(hello.device_class).label
        except ValueError:
            offered = str(hello.device_class)
        log.error("%s: device %s (%s, protocol %d) refused: %s; this port serves a %s",
                  self.port_name, hello.serial, offered, hello.protocol_version,
                  event.result.name.lower(), self.device_class.label)
        body: dict[str, JSON] = {
            "port": self.port_name, "reason": event.result.name.lower(), "serial": hello.serial,
            "class": offered, "expected": self.device_class.label,
            "protocol": hello.protocol_version, "fw": hello.firmware_text, "refused": count,
        }
        self.sink.submit(Reading("device.refused", Source(self.device_class.label,
                                                          f"port:{self.port_name}"),
                                 body, now_ns))

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
        if isinstance(readings, LedgerOnly):
            self._submit_ledger(msg, readings.updates)
            return
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

        within_s = None
        if all(_may_wait(r) for r in readings):
            within_s = self._defer_within(event_id)
        if within_s is None:
            self.sink.submit_all(readings, on_committed)
        else:
            self.sink.submit_all(readings, on_committed, within_s)  # type: ignore[call-arg]

    def _submit_ledger(self, msg: Message, updates: Ledger) -> None:
        """Commit a message's ledger entries, with its device event, without a record; ACK
        it once they are durable (soon for a stop-and-wait device; within the checkpoint
        when the link may defer its ACKs)."""
        transport = self._transport
        if transport is None:  # pragma: no cover - messages arrive only on a connection
            return
        self.stats.ledger_only += 1
        event_id = msg.event_id
        self.sink.submit_ledger(
            (*updates, (device_ledger_key(msg.serial), event_id)),
            lambda: transport.call_soon(lambda: self._ack(event_id)),
            self._defer_within(event_id))

    def _defer_within(self, event_id: int) -> float | None:
        """How long the commit of *event_id*'s effect may wait (None: as the writer's
        linger): the checkpoint when the link may defer its ACKs and fewer than half its
        window wait; at half, this one and those before it commit now."""
        if not getattr(self.link, "can_defer_ack", False):
            return None
        window = getattr(self.link, "window", 0) or DEFER_WINDOW
        if len(self._deferred) + 1 < max(1, window // 2):
            self._deferred.add(event_id)
            return self._ledger_checkpoint_s
        self._deferred.clear()  # half the window waits: commit now
        return None

    def _ack(self, event_id: int) -> None:
        self.stats.acked += 1
        self._deferred.discard(event_id)
        self.link.committed(event_id)

    def _status(self, kind: str, body: dict[str, JSON], mono_ns: int) -> None:
        self.sink.submit(Reading(kind, self._source, body, mono_ns))


def _may_wait(reading: Reading) -> bool:
    """Whether no one waits for *reading*'s commit beyond its device: not an alarm, not a
    check-in (a person at the kiosk), not of an unknown kind (sealed at once)."""
    try:
        return reading.priority > Priority.CHECKIN
    except KeyError:
        return False


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
