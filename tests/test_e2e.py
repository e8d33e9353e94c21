"""The whole path: simulated devices on ptys -> gateway -> real mosquitto (mTLS) -> verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.topics import PLATFORM_CN
from lab.acked import AckedCounter
from lab.mosquitto import Mosquitto, Pki, client_config
from lab.simulators.tag import SimTag
from lab.site import Platform, Site
from provisioning.identity import Identity
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def test_every_beacon_arrives_verified_in_order_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, identity: Identity
) -> None:
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    arrived = platform.arrived
    acked = AckedCounter()
    site = Site(tmp_path, identity, client_config(mosquitto, pki, identity.gateway_id),
                on_acked=acked)
    tags = [SimTag(0x1000 + i, bytes([i + 1]) * 16) for i in range(3)]
    sim = site.tag_receiver(tags, "TR-E2E-0001")
    site.gnss(period_s=0.2, fix_interval_s=0.5)
    site.start()
    try:
        n = 120
        for i in range(n):
            sim.send_beacon(tags[i % 3])
        wait_for(lambda: len(sim.acked()) == n, 30, "the gateway to ack every beacon")
        wait_for(lambda: any(r.kind == "gnss.fix" for r in arrived), 15, "a GNSS fix record")
    finally:
        assert site.close(drain_s=15)
    published = acked.count
    wait_for(lambda: platform.summary()["received"] >= published, 15, "the verifier")
    platform.stop()

    summary = platform.summary()
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
