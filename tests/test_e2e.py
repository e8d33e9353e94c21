"""The whole path: simulated devices on ptys -> gateway -> real mosquitto (mTLS) -> verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.assembly import Gateway
from app.config import Config, DeviceSection, GnssSection
from central.client import VerifierClient
from central.record import VerifiedRecord
from core.devices import tag_ref
from core.topics import PLATFORM_CN
from firmware_bridge.messages import DeviceClass
from lab.acked import AckedCounter
from lab.mosquitto import Mosquitto, Pki
from lab.simulators.gnss import GnssSim
from lab.simulators.tag import SimTag, TagReceiverSim
from provisioning.identity import Identity
from provisioning.registry import open_registry
from tests.conftest import broker_for
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def test_every_beacon_arrives_verified_in_order_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, identity: Identity
) -> None:
    keys = {identity.kid: identity.public_key}
    verifier = VerifierClient(broker_for(mosquitto, pki, PLATFORM_CN), keys)
    arrived: list[VerifiedRecord] = []
    verifier.verifier._on_record = arrived.append
    verifier.start()
    assert verifier.subscribed.wait(10)

    tags = [SimTag(0x1000 + i, bytes([i + 1]) * 16) for i in range(3)]
    registry = open_registry(identity)
    for tag in tags:
        registry.pair(tag_ref(tag.tag_id), tag.key)
    sim = TagReceiverSim("TR-E2E-0001", tags=tags, link=tmp_path / "ttyTAGS").start()
    gnss = GnssSim(link=tmp_path / "ttyGNSS", period_s=0.2).start()
    config = Config(tmp_path / "data", broker_for(mosquitto, pki, identity.gateway_id),
                    devices=[DeviceSection("tags", DeviceClass.TAG_RECEIVER, sim.path)],
                    gnss=GnssSection(gnss.path, fix_interval_s=0.5))
    acked = AckedCounter()
    gateway = Gateway(config, identity, on_acked=acked)
    gateway.start()
    try:
        n = 120
        for i in range(n):
            sim.send_beacon(tags[i % 3])
        wait_for(lambda: len(sim.acked()) == n, 30, "the gateway to ack every beacon")
        wait_for(lambda: any(r.kind == "gnss.fix" for r in arrived), 15, "a GNSS fix record")
    finally:
        gnss.stop()
        sim.stop()
        assert gateway.stop(drain_s=15)
    published = acked.count
    wait_for(lambda: verifier.summary()["received"] >= published, 15, "the verifier")
    verifier.stop()

    summary = verifier.summary()
    assert summary["bad_signature"] == 0
    assert summary["chain_gaps"] == 0
    assert summary["received"] == summary["verified"] == published
    beacons = sorted((r for r in arrived if r.kind == "tag.presence"), key=lambda r: r.seq)
    assert len(beacons) == n  # exactly once after de-duplication
    for tag in tags:
        counters = [r.record["body"]["counter"] for r in beacons
                    if r.record["body"]["tag"] == f"T{tag.tag_id:08X}"]
        assert counters == list(range(1, n // 3 + 1))  # in order, none missing
    fix = next(r for r in arrived if r.kind == "gnss.fix")
    assert fix.record["body"]["lat_e7"] == 468100000
    assert fix.record["body"]["lon_e7"] == -712100000
    assert {r.record["tq"] for r in arrived} <= {"ntp", "gnss", "unsynced"}
    assert json.loads(json.dumps(fix.record))["prio"] == "position"
