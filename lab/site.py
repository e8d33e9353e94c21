"""A home or office imitated on this machine: devices on ptys, the gateway, the platform.

:class:`Site` starts the simulators an installer would have wired (a tag receiver
with its tags paired to the gateway's identity, a kiosk paired likewise, a GNSS receiver), writes
the gateway's configuration for them, builds the gateway with the product's own
assembly and stops everything in the right order. :class:`Platform` is the
platform's verifier on a broker, collecting what arrives. The demo, the fault
scenarios and the end-to-end tests are all built from these.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from app.assembly import HEALTH_INTERVAL_S, Gateway
from app.config import Config, DeviceSection, GnssSection
from central.client import VerifierClient
from central.record import Registration, VerifiedRecord
from core.errors import UserError
from core.mqtt import BrokerConfig
from firmware_bridge.messages import PROTOCOL_VERSION, DeviceClass
from lab.simulators.gnss import GnssSim
from lab.simulators.kiosk import KioskSim
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.wire import Damage
from provisioning.identity import Identity
from provisioning.kiosks import KIOSK_KEY_BYTES, open_kiosks
from provisioning.registry import open_registry
from provisioning.renewal import RenewalPolicy
from uplink.forwarder import AckHook

#: A broker no gateway reaches: records stay in the store (the discard port on loopback).
NOWHERE = BrokerConfig("127.0.0.1", 9, tls=False)
#: How long the platform's consumer may take to subscribe, seconds.
SUBSCRIBE_TIMEOUT_S = 15.0


class PlatformError(UserError):
    """The platform's consumer could not subscribe (broker unreachable, refused)."""


def pair_tags(identity: Identity, tags: list[SimTag]) -> None:
    """What the installer does: pair each tag (its id and key) with this gateway."""
    registry = open_registry(identity)
    try:
        for tag in tags:
            registry.pair(tag.tag, tag.key)
    finally:
        registry.close()


def pair_kiosk(identity: Identity, serial: str, key: bytes) -> None:
    """What the installer does: pair the kiosk (its serial and check-in key)."""
    registry = open_kiosks(identity)
    try:
        registry.pair(serial, key)
    finally:
        registry.close()


class Site:
    """Simulated devices and the gateway configured for them. Add devices, then
    :meth:`start`; :meth:`close` stops the gateway (draining) and then the devices."""

    def __init__(self, workdir: Path, identity: Identity, broker: BrokerConfig, *,
                 health_interval_s: float = HEALTH_INTERVAL_S,
                 on_acked: AckHook | None = None, runtime_dir: Path | None = None,
                 renewal: RenewalPolicy | None = None,
                 require_authorisation: bool = False) -> None:
        self.workdir = workdir
        #: [supervision] require_authorisation: off in the lab (simulated tags, no
        #: authorisation sent) unless a scenario authorises its tags
        self.require_authorisation = require_authorisation
        self.renewal = renewal  # [enrolment] (None: the default)
        self.runtime_dir = runtime_dir  # the state file for 'gateway.py status' (None: none)
        self.identity = identity
        self.broker = broker
        self.health_interval_s = health_interval_s
        self.on_acked = on_acked
        self.devices: list[DeviceSection] = []
        self.gnss_section: GnssSection | None = None
        self._sims = contextlib.ExitStack()
        self._gateway: Gateway | None = None
        self._stopped = False
        self.drained = False

    def tag_receiver(self, tags: list[SimTag], serial: str = "TR-SITE-0001", *,
                     name: str = "tags", to_host: Damage | None = None,
                     from_host: Damage | None = None,
                     byte_delay_s: float = 0.0, protocol_version: int = PROTOCOL_VERSION,
                     window: int = 0, baudrate: int | None = None) -> TagReceiverSim:
        """A tag receiver on a pty, its *tags* paired with the gateway (protocol: see
        :class:`lab.simulators.device.FramedDeviceSim`)."""
        pair_tags(self.identity, tags)
        sim = TagReceiverSim(serial, tags=tags, link=self.workdir / f"tty-{name}",
                             to_host=to_host, from_host=from_host, byte_delay_s=byte_delay_s,
                             protocol_version=protocol_version, window=window,
                             baudrate=baudrate)
        self._sims.callback(sim.stop)
        sim.start()
        self.devices.append(DeviceSection(name, DeviceClass.TAG_RECEIVER, sim.path))
        return sim

    def kiosk(self, serial: str = "KI-SITE-0001", *, name: str = "kiosk",
              to_host: Damage | None = None, from_host: Damage | None = None,
              paired: bool = True) -> KioskSim:
        """A kiosk on a pty, paired with the gateway (a fresh key) unless *paired* is false."""
        key = secrets.token_bytes(KIOSK_KEY_BYTES)
        if paired:
            pair_kiosk(self.identity, serial, key)
        sim = KioskSim(serial, key=key, link=self.workdir / f"tty-{name}", to_host=to_host,
                       from_host=from_host)
        self._sims.callback(sim.stop)
        sim.start()
        self.devices.append(DeviceSection(name, DeviceClass.KIOSK, sim.path))
        return sim

    def gnss(self, *, period_s: float = 1.0, fix_interval_s: float = 60.0) -> GnssSim:
        sim = GnssSim(link=self.workdir / "tty-gnss", period_s=period_s)
        self._sims.callback(sim.stop)
        sim.start()
        self.gnss_section = GnssSection(sim.path, fix_interval_s=fix_interval_s)
        return sim

    @property
    def config(self) -> Config:
        """The configuration an installer would write for these devices."""
        return Config(self.workdir / "data", self.broker, devices=list(self.devices),
                      gnss=self.gnss_section, identity_dir=self.identity.directory,
                      runtime_dir=self.runtime_dir,
                      renewal=self.renewal if self.renewal is not None else RenewalPolicy(),
                      require_authorisation=self.require_authorisation)

    def start(self) -> Gateway:
        self._gateway = Gateway(self.config, self.identity,
                                health_interval_s=self.health_interval_s,
                                on_acked=self.on_acked)
        self._gateway.start()
        return self._gateway

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise RuntimeError("the site's gateway is not started: call start() first")
        return self._gateway

    def stop_gateway(self, drain_s: float = 5.0) -> bool:
        """Stop the gateway once (ports, then the uplink after up to *drain_s* of
        forwarding); True when everything committed was acknowledged by the broker."""
        if self._gateway is not None and not self._stopped:
            self._stopped = True
            self.drained = self._gateway.stop(drain_s)
        return self.drained

    def close(self, drain_s: float = 5.0) -> bool:
        try:
            return self.stop_gateway(drain_s)
        finally:
            self._sims.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def registrations(*identities: Identity) -> dict[str, Registration]:
    """What the platform registered at enrolment for these gateways."""
    return {i.gateway_id: Registration.from_json(i.registration()) for i in identities}


class Platform:
    """The platform's verifier on *broker*, keeping every verified record it received."""

    def __init__(self, broker: BrokerConfig, identity: Identity, *,
                 persistent_session: bool = False,
                 on_record: Callable[[VerifiedRecord], None] | None = None) -> None:
        self.arrived: list[VerifiedRecord] = []
        self._on_record = on_record
        self.client = VerifierClient(broker, registrations(identity),
                                     persistent_session=persistent_session,
                                     on_record=self._record)
        self._lock = threading.Lock()

    def _record(self, rec: VerifiedRecord) -> None:
        self.arrived.append(rec)
        if self._on_record is not None:
            self._on_record(rec)

    def start(self) -> Self:
        """Connect and subscribe; RuntimeError if the subscription does not come."""
        self.client.start()
        if not self.client.subscribed.wait(SUBSCRIBE_TIMEOUT_S):
            self.client.stop()
            raise PlatformError("the platform's verifier could not subscribe to the broker "
                                f"{self.client.broker.host}:{self.client.broker.port} within "
                                f"{SUBSCRIBE_TIMEOUT_S:.0f} s: is it running, and does its ACL "
                                "let the platform read?")
        return self

    def summary(self) -> dict[str, int]:
        return self.client.summary()

    def stop(self) -> None:
        self.client.stop()


class IngestPlatform:
    """The platform as a province runs it: the ingest (``central/ingest.py``) on a database
    (SQLite by default: ``sqlite:///PATH``) fed by one consumer on a shared subscription,
    with the gateway enrolled from its registration. ``summary()`` has the counts of
    :class:`Platform`'s.

    It is a guest on the broker: its group (default ``<gateway id>``, never a real
    ingest's ``ingest``) is its own, so it never takes a share of a real ingest's records;
    it subscribes to its own gateway's records only; and its session does not outlast it
    (expiry 0, clean start), so nothing is left queued for its client id once it stops.
    *client_id* defaults to ``<gateway id>-platform``; on a broker that binds client ids to
    certificates, give the certificate's CN."""

    def __init__(self, broker: BrokerConfig, identity: Identity, db_url: str, *,
                 client_id: str | None = None, group: str | None = None) -> None:
        from central.consumer import Consumer
        from central.db import open_db
        from central.ingest import Ingest

        self.db_url = db_url
        self.gateway_id = identity.gateway_id
        with open_db(db_url) as db:
            Ingest(db).enrol(Registration.from_json(identity.registration()))
        self.consumer = Consumer(db_url, broker,
                                 client_id=client_id or f"{self.gateway_id}-platform",
                                 group=group or self.gateway_id, session_expiry_s=0,
                                 gateway=self.gateway_id)

    def start(self) -> Self:
        self.consumer.start()
        if not self.consumer.subscribed.wait(SUBSCRIBE_TIMEOUT_S):
            self.consumer.stop()
            raise PlatformError("the platform's ingest could not subscribe to the broker "
                                f"{self.consumer.broker.host}:{self.consumer.broker.port} "
                                f"within {SUBSCRIBE_TIMEOUT_S:.0f} s: is it running, and does "
                                "its ACL let the platform read?")
        return self

    def stop(self) -> None:
        self.consumer.stop()

    def report(self) -> dict[str, object]:
        """``python -m central report --gw`` of the gateway."""
        from central.db import open_db
        from central.ingest import report

        with open_db(self.db_url, migrate=False) as db:
            return dict(report(db, self.gateway_id))

    def summary(self) -> dict[str, int]:
        rep: dict[str, Any] = self.report()
        quarantined: dict[str, int] = rep["quarantined"]
        ingest = getattr(self.consumer, "ingest", None)
        totals = ingest.totals if ingest is not None else {}
        return {
            "received": int(rep["records"]), "verified": int(rep["records"]),
            "bad_signature": int(quarantined.get("bad_signature", 0)),
            "forged_certificate": int(quarantined.get("forged_certificate", 0)),
            "quarantined": sum(int(v) for v in quarantined.values()),
            "chain_gaps": len(rep["gaps_unexplained"]) + len(rep["chain_breaks"]),
            "duplicates": int(totals.get("duplicates", 0)),
            "conflicts": len(rep["conflicts"]),
            "held": int(rep["held_for_key"]),
        }
