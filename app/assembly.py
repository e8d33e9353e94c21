"""The one place that builds the running gateway from its typed configuration.

ports -> drivers -> store writer -> uplink. Threads: one per serial port, the
store writer, the uplink forwarder with paho's network loop, and the health
thread. They talk only through queues (and the clock and the writer's device
ledger, both behind their own locks). docs/architecture.md draws it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, assert_never

from cryptography.exceptions import InvalidTag

from app.config import Config, DeviceSection
from buffer.seal import Sealer
from buffer.store import Store, StoreReader, default_quota, store_path
from buffer.writer import StoreWriter
from core import durable
from core.clock import FLOOR_LEDGER_KEY, TRUSTED_QUALITIES, Clock
from core.mqtt import BrokerConfig
from core.record import JSON, Reading, Source
from drivers.gnss import GnssProtocol, time_steps
from drivers.kiosk import KioskDriver
from drivers.tag_receiver import TagReceiverDriver
from firmware_bridge.framed import Driver, FramedDeviceProtocol
from firmware_bridge.messages import DeviceClass
from firmware_bridge.port import PortProtocol, PortWorker
from provisioning.identity import Identity
from provisioning.kiosks import open_kiosks
from provisioning.registry import open_registry
from uplink.forwarder import AckHook, Forwarder

log = logging.getLogger(__name__)
T_co = TypeVar("T_co", covariant=True)
VERSION = "0.1.0"
HEALTH_INTERVAL_S = 300.0
#: How often the clock is compared with itself (a step is a ``time.step`` record).
CLOCK_WATCH_S = 5.0
#: How long ``stop`` waits for each thread.
JOIN_TIMEOUT_S = 10.0
GNSS_PORT_NAME = "gnss"


def restore_floor(clock: Clock, reader: StoreReader, writer: StoreWriter) -> None:
    """Give *clock* the last known good time from the store: the floor the GNSS driver
    keeps in the ledger, and the newest record still stored if its time was trusted."""
    floor = writer.last_committed_event(FLOOR_LEDGER_KEY) or 0
    try:
        newest = reader.newest_record()
    except InvalidTag:
        log.warning("the newest stored record does not decrypt: its time is not a floor")
        newest = None
    if newest is not None:
        rec = json.loads(newest)
        if rec["tq"] in TRUSTED_QUALITIES:
            floor = max(floor, int(rec["t"]))
    if floor:
        clock.set_floor(floor)


class Pipeline:
    """What every reading passes through: the store, its sealer, the store writer (the one
    thread that seals and commits) and the uplink. Built once here, for the gateway, the
    lab's rigs and the benchmarks alike."""

    def __init__(self, data_dir: Path, identity: Identity, broker: BrokerConfig, *,
                 clock: Clock, source: Source, quota_bytes: int | None = None,
                 on_acked: AckHook | None = None) -> None:
        self.identity = identity
        self.clock = clock
        self.source = source
        durable.make_dirs(data_dir, 0o700)  # durable: its parent fsynced
        db = store_path(data_dir)
        self.store = Store(db, identity.storage_key, quota_bytes=quota_bytes)
        self.sealer = self.store.sealer(identity.gateway_id, identity.signing_key)
        self.reader = StoreReader(db, identity.storage_key)
        self.writer = StoreWriter(self.store, self.sealer, clock, source=source)
        restore_floor(clock, self.reader, self.writer)
        self.forwarder = Forwarder(identity.gateway_id, broker, self.reader, self.writer,
                                   on_acked=on_acked,  # e.g. the lab counting what arrived
                                   source=source, now_ns=clock.now_ns)
        self.writer.on_commit = lambda _records: self.forwarder.notify()

    def start(self, *, uplink: bool = True) -> None:
        """Start the writer (a ``gateway.boot`` record first; a staged key announced), then
        the uplink unless *uplink* is false (records then wait in the store)."""
        self.writer.start()
        state = self.store.state
        self.writer.submit(Reading("gateway.boot", self.source, {
            "boot": state.boot, "version": VERSION, "queued_from_last_run": state.last_seq,
        }, self.clock.now_ns()))
        next_key = self.identity.next_key
        if next_key is not None:
            log.warning("announcing the staged signing key and switching to it")
            self.writer.rotate_key(next_key, lambda _rec: self.identity.promote_next_key())
        if uplink:
            self.forwarder.start()

    def stop(self, drain_s: float) -> bool:
        """Commit what is queued, forward it (up to *drain_s*), stop both threads, close the
        store. True when everything committed was acknowledged by the broker."""
        self.writer.flush()
        drained = self.forwarder.wait_idle(drain_s) if self.forwarder.is_alive() else False
        self.forwarder.stop()
        self.writer.stop()
        self.reader.close()
        self.store.close()
        return drained


class Gateway:
    """The pipeline, a port per configured device, and the health thread."""

    def __init__(self, config: Config, identity: Identity, *, clock: Clock | None = None,
                 health_interval_s: float = HEALTH_INTERVAL_S,
                 quota_bytes: int | None = None, on_acked: AckHook | None = None) -> None:
        self.config = config
        self.on_acked = on_acked
        self.identity = identity
        self.clock = clock or Clock()
        self.health_interval_s = health_interval_s
        self.quota_bytes = quota_bytes
        self.source = Source("gateway", identity.gateway_id, VERSION)
        self.ports: list[PortWorker] = []
        self.protocols: dict[str, PortProtocol] = {}
        self._stopping = threading.Event()
        self._health = threading.Thread(target=self._health_loop, name="health", daemon=True)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def start(self) -> None:
        quota = self.quota_bytes or self.config.quota_bytes or default_quota(self.data_dir)
        log.info("record store quota: %d bytes", quota)
        self.pipeline = Pipeline(self.data_dir, self.identity, self.config.broker,
                                 clock=self.clock, source=self.source,
                                 quota_bytes=quota, on_acked=self.on_acked)
        self.clock.observe()  # the baseline: later changes are time.step records
        self.pipeline.start()
        for spec in self.config.devices:
            proto = FramedDeviceProtocol(spec.name, spec.kind, self._driver(spec), self.writer)
            self._add_port(spec.name, spec.path, spec.baudrate, proto)
        gnss = self.config.gnss
        if gnss is not None:
            gproto = GnssProtocol(GNSS_PORT_NAME, self.writer, self.clock,
                                  fix_interval_s=gnss.fix_interval_s, installed=gnss.installed,
                                  ledger=self.writer.last_committed_event)
            self._add_port(GNSS_PORT_NAME, gnss.path, gnss.baudrate, gproto)
        self._health.start()

    @property
    def writer(self) -> StoreWriter:
        return self.pipeline.writer

    @property
    def forwarder(self) -> Forwarder:
        return self.pipeline.forwarder

    @property
    def sealer(self) -> Sealer:
        return self.pipeline.sealer

    def _driver(self, spec: DeviceSection) -> Driver:
        """The driver of a framed device, by its class (mypy checks every class is here)."""
        kind = spec.kind
        if kind is DeviceClass.TAG_RECEIVER:
            tags = _paired(open_registry(self.identity))
            return TagReceiverDriver(tags, self.writer.last_committed_event,
                                     started_ns=self.clock.now_ns())
        if kind is DeviceClass.KIOSK:
            kiosks = _paired(open_kiosks(self.identity))
            if not kiosks:
                log.warning("%s: no kiosk is paired: its check-ins are recorded as kiosk.spoof "
                            "(provision pair-kiosk)", spec.name)
            return KioskDriver(kiosks, self.writer.last_committed_event)
        assert_never(kind)

    def _add_port(self, name: str, path: str, baud: int, proto: PortProtocol) -> None:
        worker = PortWorker(name, path, baud, proto)
        self.ports.append(worker)
        self.protocols[name] = proto
        worker.start()

    def _health_loop(self) -> None:
        interval_ns = int(self.health_interval_s * 1e9)
        next_health = self.clock.now_ns() + interval_ns
        while not self._stopping.wait(min(CLOCK_WATCH_S, self.health_interval_s)):
            steps = time_steps(self.clock, self.source)  # e.g. NTP has synchronised
            if steps:
                self.writer.submit_all(steps)
            if self.clock.now_ns() >= next_health:
                next_health += interval_ns
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
                "pauses": worker.stats.pauses,  # reading stopped: the writer was behind
            }
            proto = self.protocols[worker.name]
            if isinstance(proto, FramedDeviceProtocol):
                link = proto.link.stats
                entry.update(bad_frames=link.bad_frames, naks_sent=link.naks_sent,
                             duplicates=link.duplicates, handshakes=link.handshakes,
                             held_busy=link.held_busy,
                             handshakes_not_recorded=proto.stats.handshakes_not_recorded)
            ports[worker.name] = entry
        return {
            "uplink": {"tls": self.config.broker.tls,  # false: plaintext, opted in
                       "connected": up.connected, "connects": up.connects,
                       "disconnects": up.disconnects, "acked": up.records_acked,
                       "refused": up.refused, "taken_over": up.taken_over,
                       "sessions_lost": up.sessions_lost},
            "ports": ports,
            "clock": dict(self.clock.stats.as_dict()),
        }

    def stop(self, drain_s: float = 5.0) -> bool:
        """Stop reading devices, forward what is queued (up to *drain_s*), then stop every
        thread and close the store."""
        self._stopping.set()
        if self._health.is_alive():
            self._health.join(JOIN_TIMEOUT_S)
        for worker in self.ports:
            worker.stop()
        return self.pipeline.stop(drain_s)

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


class _Registry(Protocol[T_co]):
    def snapshot(self) -> Mapping[str, T_co]: ...
    def close(self) -> None: ...


def _paired(registry: _Registry[T_co]) -> Mapping[str, T_co]:
    """What a registry of paired devices holds now; the registry is closed."""
    try:
        return registry.snapshot()
    finally:
        registry.close()
