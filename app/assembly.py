"""Assembly of the running gateway: ports -> drivers -> store writer -> uplink.

Threads: one per serial port, the store writer, the uplink forwarder and
paho's network loop. They talk only through queues (and the clock and the
writer's device ledger, both behind their own locks).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer.seal import Sealer
from buffer.store import Store, StoreReader
from buffer.writer import StoreWriter
from core.clock import Clock
from core.mqtt import BrokerConfig
from core.record import JSON, Reading, Source
from drivers.gnss import Installed, time_steps
from drivers.kiosk import KioskDriver
from drivers.tag_receiver import TagReceiverDriver
from firmware_bridge.framed import Driver, FramedDeviceProtocol
from firmware_bridge.messages import DeviceClass
from firmware_bridge.port import PortProtocol, PortWorker
from provisioning.identity import Identity
from provisioning.registry import TagRegistry, open_registry
from uplink.forwarder import Forwarder

log = logging.getLogger(__name__)
VERSION = "0.1.0"
HEALTH_INTERVAL_S = 300.0
CLOCK_WATCH_S = 5.0


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: str  # tag_receiver | kiosk
    path: str
    baudrate: int = 115200


@dataclass(frozen=True)
class GnssSpec:
    path: str
    baudrate: int = 9600
    fix_interval_s: float = 60.0
    installed: Installed | None = None


@dataclass
class Gateway:
    identity: Identity
    data_dir: Path
    broker: BrokerConfig
    devices: list[DeviceSpec] = field(default_factory=list)
    gnss: GnssSpec | None = None
    clock: Clock = field(default_factory=Clock)
    track_acked: bool = False
    health_interval_s: float = HEALTH_INTERVAL_S
    quota_bytes: int | None = None

    def __post_init__(self) -> None:
        self.ports: list[PortWorker] = []
        self.protocols: dict[str, PortProtocol] = {}
        self._stopping = threading.Event()
        self._health = threading.Thread(target=self._health_loop, name="health", daemon=True)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = self.data_dir / "records.db"
        self.store = Store(db, self.identity.storage_key, quota_bytes=self.quota_bytes)
        state = self.store.state
        self.sealer = Sealer(self.identity.gateway_id, self.identity.signing_key,
                             last_seq=state.last_seq, last_digest=state.last_digest,
                             boot=state.boot)
        self.reader = StoreReader(db, self.identity.storage_key)
        self.writer = StoreWriter(self.store, self.sealer, self.clock, source=self.source)
        self.forwarder = Forwarder(self.identity.gateway_id, self.broker, self.reader,
                                   self.writer, track_acked=self.track_acked)
        self.writer.on_commit = lambda _records: self.forwarder.notify()
        self.writer.start()
        self.clock.observe()  # the baseline: later changes are time.step records
        self.writer.submit(Reading("gateway.boot", self.source, {
            "boot": state.boot, "version": VERSION, "queued_from_last_run": state.last_seq,
        }, time.monotonic_ns()))
        next_key = self.identity.next_key
        if next_key is not None:
            log.warning("announcing the staged signing key and switching to it")
            self.writer.rotate_key(next_key, lambda _rec: self.identity.promote_next_key())
        self.forwarder.start()
        for spec in self.devices:
            driver: Driver
            if spec.kind == "kiosk":
                cls, driver = DeviceClass.KIOSK, KioskDriver(self.writer.last_committed_event)
            else:
                cls = DeviceClass.TAG_RECEIVER
                driver = TagReceiverDriver(self.tag_registry().snapshot(),
                                           self.writer.last_committed_event,
                                           started_ns=time.monotonic_ns())
            proto = FramedDeviceProtocol(spec.name, cls, driver, self.writer)
            self._add_port(spec.name, spec.path, spec.baudrate, proto)
        if self.gnss is not None:
            from drivers.gnss import GnssProtocol  # pynmea2 is loaded only when needed

            gproto = GnssProtocol("gnss", self.writer, self.clock,
                                  fix_interval_s=self.gnss.fix_interval_s,
                                  installed=self.gnss.installed)
            self._add_port("gnss", self.gnss.path, self.gnss.baudrate, gproto)
        self._health.start()

    def _health_loop(self) -> None:
        next_health = time.monotonic() + self.health_interval_s
        while not self._stopping.wait(min(CLOCK_WATCH_S, self.health_interval_s)):
            steps = time_steps(self.clock, self.source)  # e.g. NTP has synchronised
            if steps:
                self.writer.submit_all(steps)
            if time.monotonic() >= next_health:
                next_health += self.health_interval_s
                self.writer.submit_health(self._health_extra)

    def _health_extra(self) -> dict[str, JSON]:
        """Counters of the other threads (plain integers, read as they stand)."""
        up = self.forwarder.stats
        ports: dict[str, JSON] = {}
        for worker in self.ports:
            entry: dict[str, JSON] = {
                "connected": worker.stats.connected, "opens": worker.stats.opens,
                "losses": worker.stats.losses, "open_failures": worker.stats.open_failures,
                "protocol_errors": worker.stats.protocol_errors,
            }
            proto = self.protocols[worker.name]
            if isinstance(proto, FramedDeviceProtocol):
                link = proto.link.stats
                entry.update(bad_frames=link.bad_frames, naks_sent=link.naks_sent,
                             duplicates=link.duplicates, handshakes=link.handshakes)
            ports[worker.name] = entry
        return {
            "uplink": {"connected": up.connected, "connects": up.connects,
                       "disconnects": up.disconnects, "acked": up.records_acked,
                       "refused": up.refused},
            "ports": ports,
        }

    def tag_registry(self) -> TagRegistry:
        return open_registry(self.identity)

    @property
    def source(self) -> Source:
        return Source("gateway", self.identity.gateway_id, VERSION)

    def _add_port(self, name: str, path: str, baud: int,
                  proto: PortProtocol) -> None:
        worker = PortWorker(name, path, baud, proto)
        if isinstance(proto, FramedDeviceProtocol):
            proto.post = worker.call_soon
        self.ports.append(worker)
        self.protocols[name] = proto
        worker.start()

    def stop(self, drain_s: float = 5.0) -> bool:
        """Stop reading devices, forward what is queued (up to *drain_s*), then stop."""
        self._stopping.set()
        for worker in self.ports:
            worker.stop()
        self.writer.flush()
        drained = self.forwarder.wait_idle(drain_s)
        self.forwarder.stop()
        self.writer.stop()
        self.reader.close()
        self.store.close()
        return drained

    def alive(self) -> bool:
        """Every thread of the pipeline is running (the watchdog's question)."""
        return (self.writer.is_alive() and self.forwarder.is_alive()
                and all(w.is_alive() for w in self.ports))

    def status(self) -> dict[str, Any]:
        return {
            "gateway_id": self.identity.gateway_id,
            "committed": self.writer.stats.committed,
            "published": self.forwarder.stats.records_published,
            "acked": self.forwarder.stats.records_acked,
            "uplink_connected": self.forwarder.stats.connected,
            "ports": {w.name: {"connected": w.stats.connected, "opens": w.stats.opens,
                               "bytes_in": w.stats.bytes_in} for w in self.ports},
        }
