"""The one place that builds the running gateway from its typed configuration.

ports -> drivers -> store writer -> uplink. Threads: one per serial port, the
store writer, the uplink forwarder with paho's network loop, the health thread,
the platform's commands (app/commands.py), and the state thread (app/state.py:
``state.json`` for ``gateway.py status``, when the configuration names a runtime
directory). They talk only through queues (and
the clock and the writer's device ledger, both behind their own locks).
docs/architecture.md draws it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, assert_never

from cryptography.exceptions import InvalidTag

from app import systemd
from app.actions import LocalActions
from app.commands import CommandService, load_settings
from app.config import Config, DeviceSection
from app.inputs import InputsWorker, OpenedLines, PowerOff, open_gpio
from app.removals import KIOSK, TAG, Removals
from app.renewal import RenewalTask
from app.snapshot import (
    Heard,
    clock_entry,
    device_entries,
    disk_entry,
    gnss_entry,
    queued_by_class,
    tag_entries,
    uplink_entry,
)
from app.state import AlarmLog, StatePublisher, UplinkTracker, uplink_words, wall_ms
from app.supervision import SupervisionService
from buffer.seal import Sealer
from buffer.store import Store, StoreReader, default_quota, store_path
from buffer.writer import StoreWriter
from core import durable
from core.clock import FLOOR_LEDGER_KEY, TRUSTED_QUALITIES, Clock
from core.devices import PairedKiosk, PairedTag
from core.errors import UserError
from core.mqtt import BrokerConfig
from core.record import JSON, Reading, SealedRecord, Source
from core.session import (
    ROTATE_KIND,
    SESSION_KIND,
    SESSION_LIFETIME_MS,
    rotation_body,
    session_body,
)
from core.suites import key_id
from drivers.gnss import GnssProtocol, time_steps
from drivers.inputs import InputsCore
from drivers.kiosk import KioskDriver
from drivers.tag_receiver import TagReceiverDriver, interval_key, recovered_intervals
from firmware_bridge.framed import Driver, FramedDeviceProtocol
from firmware_bridge.messages import DeviceClass
from firmware_bridge.port import PortProtocol, PortWorker
from provisioning.identity import Identity, IdentityKey
from provisioning.kiosks import open_kiosks
from provisioning.registry import open_registry
from uplink.forwarder import AckHook, Forwarder, StateHook

log = logging.getLogger(__name__)
T_co = TypeVar("T_co", covariant=True)
VERSION = "0.1.0"
#: A session key is renewed after a day (it is certified for SESSION_LIFETIME_MS).
SESSION_RENEW_S = 24 * 3600
HEALTH_INTERVAL_S = 300.0
#: How often the clock is compared with itself (a step is a ``time.step`` record).
CLOCK_WATCH_S = 5.0
#: How often the action journal is looked at (a stat): a command's action (a pairing, a
#: decommission) is recorded within this while the daemon runs.
JOURNAL_WATCH_S = 0.5
#: How long ``stop`` waits for each thread.
JOIN_TIMEOUT_S = 10.0
GNSS_PORT_NAME = "gnss"
#: Ledger entries read at a time when looking for presence intervals left open.
RECOVERY_PAGE = 1000


def restore_floor(clock: Clock, reader: StoreReader, writer: StoreWriter) -> None:
    """Give *clock* the last known good time from the store: the floor the GNSS driver
    keeps in the ledger, and the newest record still stored if its time was trusted."""
    floor = writer.ledger_value(FLOOR_LEDGER_KEY) or 0
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


def _rotated(key: IdentityKey) -> str:
    """The store's ledger entry that a ``key.rotate`` certifying *key* is committed."""
    return f"identity.rotated:{key_id(key.alg, key.public_raw)}"


class Pipeline:
    """What every reading passes through: the store, its sealer, the store writer (the one
    thread that seals and commits) and the uplink. Built once here, for the gateway, the
    lab's rigs and the benchmarks alike."""

    def __init__(self, data_dir: Path, identity: Identity, broker: BrokerConfig, *,
                 clock: Clock, source: Source, quota_bytes: int | None = None,
                 on_acked: AckHook | None = None,
                 on_uplink_state: StateHook | None = None,
                 uplink_linger_s: float = 0.0, uplink_deflate: bool = False) -> None:
        self.identity = identity
        self.clock = clock
        self.source = source
        durable.make_dirs(data_dir, 0o700)  # durable: its parent fsynced
        db = store_path(data_dir)
        self.store = Store(db, identity.storage_key, quota_bytes=quota_bytes)
        self.sealer = self.store.sealer(identity.gateway_id)  # keyed by start()'s key.session
        self.reader = StoreReader(db, identity.storage_key)
        self.writer = StoreWriter(self.store, self.sealer, clock, source=source)
        restore_floor(clock, self.reader, self.writer)
        self.forwarder = Forwarder(identity.gateway_id, broker, self.reader, self.writer,
                                   on_acked=on_acked,  # e.g. the lab counting what arrived
                                   source=source, now_ns=clock.now_ns,
                                   # the certificate check: is the time now trusted?
                                   utc_now=clock.utc_now, on_state=on_uplink_state,
                                   backlog=lambda: sum(self.reader.depth().values()),
                                   # positions and heartbeats may wait to share a message
                                   linger_s=uplink_linger_s, deflate=uplink_deflate)
        self.writer.on_commit = lambda _records: self.forwarder.notify()

    def start(self, *, uplink: bool = True) -> None:
        """Start the writer: a ``key.session`` record first (a new session key, certified by
        the identity key), ``gateway.boot``, a staged identity key certified and switched
        to; then the uplink unless *uplink* is false (records then wait in the store)."""
        self.writer.start()
        identity_key = self.identity.key
        next_key = self.identity.next_key
        if next_key is not None and self.writer.ledger_value(_rotated(next_key)):
            # its key.rotate was committed, and the power went before the promotion: the
            # platform follows the new identity from there, so it certifies from now on
            log.warning("completing the promotion of the identity key certified at the "
                        "last start")
            self.identity.promote_next_key()
            identity_key, next_key = next_key, None
        self.identity_key = identity_key
        # the first certificate is made here, so a TPM that does not answer stops the start
        first = self.identity.session_key()
        mono_ns = self.clock.now_ns()
        state = self.store.state
        body = self._session_body(first, identity_key, state.last_seq + 1, state.boot, mono_ns)
        self.writer.key_record(SESSION_KIND, lambda _seq, _boot: body, session=first,
                               mono_ns=mono_ns)
        self.session_started_ns = mono_ns
        self.writer.submit(Reading("gateway.boot", self.source, {
            "boot": state.boot, "version": VERSION, "queued_from_last_run": state.last_seq,
            "key_class": identity_key.key_class, "suite": self.identity.suite.name,
        }, self.clock.now_ns()))
        if next_key is not None:
            log.warning("certifying the staged identity key and switching to it")
            staged = next_key

            def rotate(seq: int, _boot: int) -> dict[str, JSON]:
                return rotation_body(gateway_id=self.identity.gateway_id, new=staged,
                                     new_class=staged.key_class, from_seq=seq,
                                     current=identity_key, current_class=identity_key.key_class)

            self.writer.key_record(ROTATE_KIND, rotate, session=None,
                                   mono_ns=self.clock.now_ns(),
                                   on_committed=lambda _rec: self.identity.promote_next_key(),
                                   ledger=((_rotated(staged), 1),))
            self.identity_key = staged
            self.renew_session()
        if uplink:
            self.forwarder.start()

    def start_forwarding(self) -> None:
        """Start the writer and the uplink only, sealing nothing: a store whose final
        record is committed (decommissioned) forwards what it still holds."""
        self.writer.start()
        self.forwarder.start()

    identity_key: IdentityKey | None = None
    session_started_ns = 0

    def _session_body(self, session: IdentityKey, identity: IdentityKey, seq: int,
                      boot: int, mono_ns: int) -> dict[str, JSON]:
        return session_body(gateway_id=self.identity.gateway_id, session=session, boot=boot,
                            from_seq=seq, until_mono=mono_ns // 1_000_000 + SESSION_LIFETIME_MS,
                            identity=identity, identity_class=identity.key_class)

    def renew_session(self) -> None:
        """A new session key, certified by the identity key (at a rotation, and before the
        session's lifetime ends: :data:`SESSION_RENEW_S`)."""
        identity = self.identity_key or self.identity.key
        session = self.identity.session_key()
        mono_ns = self.clock.now_ns()
        self.writer.key_record(
            SESSION_KIND,
            lambda seq, boot: self._session_body(session, identity, seq, boot, mono_ns),
            session=session, mono_ns=mono_ns)
        self.session_started_ns = mono_ns

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

    def session_due(self) -> bool:
        """Whether the session key should be renewed (a day old: its lifetime is eight)."""
        return self.clock.now_ns() - self.session_started_ns > SESSION_RENEW_S * 1_000_000_000


class Gateway:
    """The pipeline, a port per configured device, and the health thread."""

    def __init__(self, config: Config, identity: Identity, *, clock: Clock | None = None,
                 health_interval_s: float = HEALTH_INTERVAL_S,
                 quota_bytes: int | None = None, on_acked: AckHook | None = None,
                 on_decommissioned: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_acked = on_acked
        #: Set (and *on_decommissioned* called) once the final record of a decommission
        #: and everything before it are delivered: the daemon then exits.
        self.decommissioned = threading.Event()
        self._on_decommissioned = on_decommissioned
        self._decommissioning = False
        self.identity = identity
        self.clock = clock or Clock()
        self.health_interval_s = health_interval_s
        self.quota_bytes = quota_bytes
        self.source = Source("gateway", identity.gateway_id, VERSION)
        #: What systemd shows (STATUS=): the uplink's state, at each change.
        self.service = systemd.ServiceStatus(identity.gateway_id)
        #: The uplink's state with since when, and the last alarms: for STATUS=, the health
        #: record and the state file (app/state.py).
        self.uplink = UplinkTracker()
        self.alarms = AlarmLog()
        #: Writes the state file every second (config.runtime_dir; None: none written).
        self.publisher: StatePublisher | None = None
        self.started_at_ms = wall_ms()
        self._heard = Heard()
        self.ports: list[PortWorker] = []
        self._tag_drivers: list[TagReceiverDriver] = []
        self._kiosk_drivers: list[KioskDriver] = []
        self._tags: Mapping[str, PairedTag] | None = None
        self._kiosks: Mapping[str, PairedKiosk] | None = None
        self.protocols: dict[str, PortProtocol] = {}
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped: bool | None = None
        self._health = threading.Thread(target=self._health_loop, name="health", daemon=True)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def start(self) -> None:
        quota = self.quota_bytes or self.config.quota_bytes or default_quota(self.data_dir)
        log.info("record store quota: %d bytes", quota)
        self.pipeline = Pipeline(self.data_dir, self.identity, self.config.broker,
                                 clock=self.clock, source=self.source,
                                 quota_bytes=quota, on_acked=self.on_acked,
                                 on_uplink_state=self._uplink_state,
                                 uplink_linger_s=self.config.uplink.linger_s,
                                 uplink_deflate=self.config.uplink.deflate)
        forward = self.writer.on_commit

        def committed(records: list[SealedRecord]) -> None:
            self.alarms.committed(records)  # the last alarms, for the state file
            if forward is not None:
                forward(records)

        self.writer.on_commit = committed
        self._queue = StoreReader(store_path(self.data_dir), self.identity.storage_key)
        if self.writer.final_seq is not None:
            # decommissioned (provision decommission): forward what is left, seal nothing
            log.warning("this gateway's final record (seq %d) is committed: it only forwards "
                        "what is queued, then stops", self.writer.final_seq)
            self._decommissioning = True
            self.pipeline.start_forwarding()
            self._health.start()
            self._start_publisher()
            return
        self.clock.observe()  # the baseline: later changes are time.step records
        # the platform's commands: subscribed with the uplink's first connect; answered
        # once an interrupted one is completed (before the pairings are read)
        # the supervision rules (app/supervision.py): their state read before the commands
        self.supervision = SupervisionService(
            self.data_dir, self.writer, self.clock, source=self.source,
            require_authorisation=self.config.require_authorisation)
        self.commands = CommandService(self.identity, self.data_dir, self.writer, self.clock,
                                       source=self.source, devices=self,
                                       region=self.config.region,
                                       supervision=self.supervision)
        self.commands.listen(self.forwarder)
        from app import diag_command  # request-diag (imports app.diag, which imports this)

        diag_command.serve(self.identity.gateway_id, self.config, lambda topic, data: (
            self.forwarder.client.publish(topic, data, qos=1).rc == 0))
        self.health_interval_s = load_settings(self.data_dir).get(
            "health_interval_s", self.health_interval_s)
        self.pipeline.start()
        self.supervision.resume()  # before an interrupted command is completed
        self.commands.recover()
        self.commands.announce()
        # local actions (the journal), then the files' hashes, before the pairings are read
        self.actions = LocalActions(self.writer, self.identity, self.config.source,
                                    self.source, self.clock.now_ns, on_final=self._final)
        self.actions.start()
        # the pairings of this start (None: unreadable; an error only where a device needs it)
        self._tags = _readable(lambda: _paired(open_registry(self.identity)))
        self._kiosks = _readable(lambda: _paired(open_kiosks(self.identity)))
        self.removals = Removals(self.writer, self._queue, self._device_in_use, self.source,
                                 self.clock.now_ns)
        self._recover_intervals()
        if self._decommissioning:  # a decommission waited in the journal: no device
            self._health.start()
            self._start_publisher()
            return
        for spec in self.config.devices:
            proto = FramedDeviceProtocol(
                spec.name, spec.kind, self._driver(spec), self.writer,
                ledger_checkpoint_s=self.config.tags.interval_checkpoint_s)
            self._add_port(spec.name, spec.path, spec.baudrate, proto)
        gnss = self.config.gnss
        if gnss is not None:
            gproto = GnssProtocol(GNSS_PORT_NAME, self.writer, self.clock,
                                  fix_interval_s=gnss.fix_interval_s, installed=gnss.installed,
                                  ledger=self.writer.ledger_value)
            self._add_port(GNSS_PORT_NAME, gnss.path, gnss.baudrate, gproto)
        self._start_inputs()
        self._start_renewal()
        self.commands.start()
        self.supervision.start()
        self._health.start()
        self._start_publisher()

    #: The enclosure switch and mains power (config [inputs]; drivers/inputs.py).
    inputs: InputsWorker | None = None
    #: The platform's signed commands (app/commands.py); None while decommissioning.
    commands: CommandService | None = None
    #: The supervision rules' thread (app/supervision.py); None while decommissioning.
    supervision: SupervisionService | None = None

    def _recover_intervals(self) -> None:
        """Seal the presence intervals an unclean stop left open (their ledger entries),
        each ``recovered`` and its entries removed in its transaction (docs/records.md)."""
        mark = interval_key("", "beacons")[len("tag:"):]  # ":ival:beacons"
        tags, after = [], ""
        while page := self.writer.ledger_items("tag:", RECOVERY_PAGE, after):
            tags += [key[len("tag:"):-len(mark)] for key, value in page
                     if key.endswith(mark) and value > 0]
            after = page[-1][0]
        for reading, keys in recovered_intervals(tags, self.writer.ledger_value, self.source,
                                                 self.clock.now_ns()):
            log.warning("the presence interval of a tag left open by an unclean stop is "
                        "sealed (recovered: %s beacons)", reading.body["beacons"])
            self.writer.forget(keys, reading)

    # -- the live side of the platform's commands (app/commands.py Devices) -------------
    def tag_paired(self, tag: str, paired: PairedTag | None) -> None:
        """A command paired, re-keyed or unpaired *tag*: every tag receiver takes it."""
        for driver in self._tag_drivers:
            driver.set_pairing(tag, paired)
        tags = dict(self._tags or {})
        if paired is None:
            tags.pop(tag, None)
            if self.supervision is not None:
                self.supervision.forget(tag)  # its rules go with it
        else:
            tags[tag] = paired
        self._tags = tags

    def _device_in_use(self, device: str, ident: str) -> bool | None:
        """Whether this start still takes *ident*'s readings (app/removals.py): paired when
        it began and not unpaired by a command since, or (a tag) still held by a receiver's
        driver, which drops a command's unpairing before its next message or tick; None:
        its registry was unreadable at the start."""
        if device == TAG:
            if self._tags is None:
                return None
            return ident in self._tags or any(
                view.tag == ident for driver in self._tag_drivers for view in driver.view())
        if device == KIOSK:  # the kiosk driver drops it before its next message
            return None if self._kiosks is None else ident in self._kiosks
        return None

    def kiosk_paired(self, serial: str, paired: PairedKiosk | None) -> None:
        for driver in self._kiosk_drivers:
            driver.set_pairing(serial, paired)
        kiosks = dict(self._kiosks or {})
        if paired is None:
            kiosks.pop(serial, None)
        else:
            kiosks[serial] = paired
        self._kiosks = kiosks

    def setting_changed(self, key: str, value: int) -> None:
        if key == "health_interval_s":  # from the next health record on
            self.health_interval_s = float(value)
    #: The certificate renewing itself (app/renewal.py): with a TLS uplink only.
    renewal: RenewalTask | None = None

    def _start_renewal(self) -> None:
        if not self.config.broker.tls:
            return
        self.renewal = RenewalTask(self.identity, self.config.broker, self.config.renewal,
                                   writer=self.writer, channel=self.forwarder,
                                   clock=self.clock, source=self.source,
                                   data_dir=self.data_dir)
        self.renewal.start()
    #: Opens the input lines: the GPIO chip of the configuration, or the lab's stand-in.
    open_lines: Callable[[], OpenedLines] | None = None

    def _start_inputs(self) -> None:
        inp = self.config.inputs
        if inp is None:
            return
        opener = self.open_lines or functools.partial(open_gpio, inp.chip, inp.spec.lines())
        poweroff = PowerOff(self.writer.flush, self.stop, inp.shutdown_command)
        self.inputs = InputsWorker(InputsCore(inp.spec, self.source), opener,
                                   self.writer.submit, poweroff, now_ns=self.clock.now_ns)
        self.inputs.start()

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
            tags = self._tags if self._tags is not None else \
                _paired(open_registry(self.identity))  # the registry's error, for the user
            driver = TagReceiverDriver(tags, self.writer.ledger_value,
                                       started_ns=self.clock.now_ns(),
                                       interval_max_s=self.config.tags.interval_max_s,
                                       presence=None if self.supervision is None
                                       else self.supervision.presence)
            self._tag_drivers.append(driver)
            return driver
        if kind is DeviceClass.KIOSK:
            kiosks = self._kiosks if self._kiosks is not None else \
                _paired(open_kiosks(self.identity))
            if not kiosks:
                log.warning("%s: no kiosk is paired: its check-ins are recorded as kiosk.spoof "
                            "(provision pair-kiosk)", spec.name)
            kiosk_driver = KioskDriver(kiosks, self.writer.ledger_value)
            self._kiosk_drivers.append(kiosk_driver)
            return kiosk_driver
        assert_never(kind)

    def _add_port(self, name: str, path: str, baud: int, proto: PortProtocol) -> None:
        worker = PortWorker(name, path, baud, proto)
        self.ports.append(worker)
        self.protocols[name] = proto
        worker.start()

    def _health_loop(self) -> None:
        next_health = self.clock.now_ns() + int(self.health_interval_s * 1e9)
        tick = min(CLOCK_WATCH_S, self.health_interval_s)
        next_tick = self.clock.now_ns() + int(tick * 1e9)
        while not self._stopping.wait(min(JOURNAL_WATCH_S, tick)):
            if self._decommissioning:
                self._watch_final()  # until the final record is delivered
                continue
            if self.actions.journal_changed():
                self.actions.poll()  # a command's action while running: recorded at once
            if self.clock.now_ns() < next_tick:
                continue
            next_tick = self.clock.now_ns() + int(tick * 1e9)
            self.actions.poll()  # the compaction of what is committed
            if self._decommissioning:
                continue
            self.removals.poll()  # unpaired devices' data, once delivered
            steps = time_steps(self.clock, self.source)  # e.g. NTP has synchronised
            if steps:
                self.writer.submit_all(steps)
                if self.supervision is not None:
                    self.supervision.clock_stepped(steps)  # handled, never a silent jump
            if self.clock.now_ns() >= next_health:  # the platform may change the interval
                next_health = self.clock.now_ns() + int(self.health_interval_s * 1e9)
                self.writer.submit_health(self._health_extra)
            if self.pipeline.session_due():
                self.pipeline.renew_session()

    def _final(self) -> None:
        """The final record is submitted (a decommission): stop reading devices; the
        uplink goes on until it is delivered (:meth:`_watch_final`)."""
        self._decommissioning = True
        inputs, self.inputs = self.inputs, None
        if inputs is not None:
            inputs.stop()
        ports, self.ports = self.ports, []
        for worker in ports:
            worker.stop()

    def _watch_final(self) -> None:
        """Once the final record and everything before it left the store (the broker
        acknowledged them): :attr:`decommissioned`."""
        final = self.writer.final_seq
        if final is None or self.decommissioned.is_set():
            return
        try:
            lowest = self._queue.lowest_seq()
        except Exception:
            log.exception("decommission: the store could not be read")
            return
        if lowest is not None and lowest <= final:
            return
        log.warning("decommissioned: the final record (seq %d) and everything before it are "
                    "delivered; stopping", final)
        self.decommissioned.set()
        if self._on_decommissioned is not None:
            self._on_decommissioned()

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
                       "state": up.state, "failed_attempts": up.failed_attempts,
                       # in words, since when (wall ms), and the backlog
                       "reason": self.uplink.now.reason, "since_ms": self.uplink.now.since_ms,
                       "queued": self.queued(),
                       "connected": up.connected, "connects": up.connects,
                       "disconnects": up.disconnects, "acked": up.records_acked,
                       "refused": up.refused, "taken_over": up.taken_over,
                       "sessions_lost": up.sessions_lost},
            "ports": ports,
            "clock": dict(self.clock.stats.as_dict()),
        } | ({"inputs": self.inputs.health()} if self.inputs is not None else {}) \
          | ({"commands": self.commands.status()} if self.commands is not None else {}) \
          | ({"supervision": self.supervision.status()} if self.supervision is not None
             else {})

    def stop(self, drain_s: float = 5.0) -> bool:
        """Stop reading devices, forward what is queued (up to *drain_s*), then stop every
        thread and close the store. A second call (a power-off after a UPS shutdown, then
        SIGTERM) waits for the first and returns its result."""
        with self._stop_lock:
            if self._stopped is not None:
                return self._stopped
            self._stopped = self._stop(drain_s)
            return self._stopped

    def _stop(self, drain_s: float) -> bool:
        self._stopping.set()
        if self.inputs is not None:
            self.inputs.stop()
        if self._health.is_alive():
            self._health.join(JOIN_TIMEOUT_S)
        if self.renewal is not None:
            self.renewal.stop()
        for worker in self.ports:
            worker.stop()
        for driver in self._tag_drivers:  # a clean stop: every open interval is sealed
            closed = driver.close_all(self.clock.now_ns())
            if closed:
                self.writer.submit_all(closed)
        if self.commands is not None:
            self.commands.stop()
        if self.supervision is not None:
            self.supervision.stop()
        drained = self.pipeline.stop(drain_s)
        self._queue.close()
        if self.publisher is not None:
            self.publisher.stop()  # a clean stop: no state left behind
        return drained

    # -- the state file (app/state.py, docs/status.md) ------------------------------------
    def _start_publisher(self) -> None:
        runtime = self.config.runtime_dir
        if runtime is None or self.publisher is not None:
            return
        self.publisher = StatePublisher(runtime, self.state, after=self._refresh_status)
        self.publisher.start()

    def queued(self) -> int:
        """Records queued in the store (the writer's counts, no query)."""
        return sum(queued_by_class(self.pipeline.store, self.writer).values())

    def _uplink_state(self, text: str) -> None:
        """The forwarder's new state (its thread): STATUS= says it in words."""
        self.service.uplink(uplink_words(self.uplink.update(text), self.queued()))

    def _refresh_status(self) -> None:
        """After each state write: STATUS= with the queue as it stands (sent if changed)."""
        self.service.uplink(uplink_words(self.uplink.now, self.queued()))

    def state(self) -> dict[str, Any]:
        """What the state file holds (app/state.py; every key present, null when unknown),
        read from the other threads' plain values as they stand."""
        now_mono, now_ms = time.monotonic_ns(), wall_ms()
        store = self.pipeline.store
        roles = {spec.name: spec.kind.label for spec in self.config.devices}
        roles[GNSS_PORT_NAME] = "gnss"
        protocols = dict(self.protocols)
        tags, tags_total = tag_entries(protocols.values(), getattr(self, "_tags", None) or (),
                                       now_mono, now_ms)
        return {
            "version": VERSION, "pid": os.getpid(), "gateway_id": self.identity.gateway_id,
            "started_at_ms": self.started_at_ms, "written_at_ms": now_ms,
            "phase": ("stopping" if self._stopping.is_set() else
                      "decommissioning" if self._decommissioning else "running"),
            "config": None if self.config.source is None else str(self.config.source),
            "data_dir": str(self.data_dir),
            "records": {"sealed": self.writer.stats.committed,
                        "forwarded": self.forwarder.stats.records_acked},
            "uplink": uplink_entry(self.uplink, self.forwarder,
                                   queued_by_class(store, self.writer), self._heard, now_ms),
            "clock": clock_entry(self.clock, now_ms),
            "devices": device_entries(list(self.ports), protocols, roles, self._heard, now_ms),
            "tags": tags, "tags_total": tags_total,
            "gnss": gnss_entry(protocols.get(GNSS_PORT_NAME), now_mono, now_ms),
            "disk": disk_entry(store),
            "last_alarms": self.alarms.entries(),
        }

    def alive(self) -> bool:
        """Every thread of the pipeline is running (the watchdog's question)."""
        return (self.writer.is_alive() and self.forwarder.is_alive()
                and all(w.is_alive() for w in self.ports)
                and (self.inputs is None or self.inputs.is_alive()))

    def status(self) -> dict[str, Any]:
        return {
            "gateway_id": self.identity.gateway_id,
            "committed": self.writer.stats.committed,
            "published": self.forwarder.stats.records_published,
            "acked": self.forwarder.stats.records_acked,
            "uplink_connected": self.forwarder.stats.connected,
            "uplink": self.forwarder.stats.state,  # connected, refused: why, retrying: why
            "ports": {w.name: {"connected": w.stats.connected, "opens": w.stats.opens,
                               "bytes_in": w.stats.bytes_in} for w in self.ports},
        }


class _Registry(Protocol[T_co]):
    def snapshot(self) -> Mapping[str, T_co]: ...
    def close(self) -> None: ...


def _readable(read: Callable[[], Mapping[str, T_co]]) -> Mapping[str, T_co] | None:
    """What *read* returns, or None when the registry cannot be read (logged)."""
    try:
        return read()
    except UserError as exc:
        log.warning("a device registry cannot be read (%s): no unpaired device's data is "
                    "removed until it can", exc)
        return None


def _paired(registry: _Registry[T_co]) -> Mapping[str, T_co]:
    """What a registry of paired devices holds now; the registry is closed."""
    try:
        return registry.snapshot()
    finally:
        registry.close()
