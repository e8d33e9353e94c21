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
    # presence goes out as intervals: one per tag here (no change of state), sealed at the
    # clean stop, covering its 40 beacons, in order, none missing, none twice
    intervals = sorted((r for r in arrived if r.kind == "tag.interval"), key=lambda r: r.seq)
    for tag in tags:
        mine = [r.record["body"] for r in intervals if r.record["body"]["tag"] == tag.tag]
        assert [(b["first_counter"], b["last_counter"], b["beacons"], b["closed"])
                for b in mine] == [(1, n // 3, n // 3, "stop")]
    fix = next(r for r in arrived if r.kind == "gnss.fix")
    assert fix.record["body"]["lat_e7"] == 468100000
    assert fix.record["body"]["lon_e7"] == -712100000
    assert {r.record["tq"] for r in arrived} <= {"ntp", "gnss", "unsynced"}
    assert json.loads(json.dumps(fix.record))["prio"] == "position"


def test_a_home_s_beacons_go_out_as_a_few_intervals_and_a_tamper_closes_one_first(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, identity: Identity
) -> None:
    """Three tags beaconing through the real simulator on a pty: a few signed intervals
    instead of a record per beacon; the strap opening seals its tag's interval first."""
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    arrived = platform.arrived
    acked = AckedCounter()
    site = Site(tmp_path, identity, client_config(mosquitto, pki, identity.gateway_id),
                on_acked=acked)
    tags = [SimTag(0x1000 + i, bytes([i + 1]) * 16) for i in range(3)]
    sim = site.tag_receiver(tags, "TR-E2E-0002")
    site.start()
    rounds = 30
    try:
        for i in range(rounds * 3):
            sim.send_beacon(tags[i % 3])
        wait_for(lambda: len(sim.acked()) == rounds * 3, 30, "the gateway to ack every beacon")
        # a beacon that only extends an interval makes no record: nothing out yet but the
        # gateway's own (key.session, device.up, ...)
        assert not [r for r in arrived if r.kind.startswith("tag.")]
        tags[0].strap_closed = False  # the strap is cut
        for i in range(rounds * 3):
            sim.send_beacon(tags[i % 3])
        wait_for(lambda: any(r.kind == "tag.tamper" for r in arrived), 30, "the tamper alarm")
        wait_for(lambda: len(sim.acked()) == rounds * 6, 30, "the gateway to ack every beacon")
    finally:
        assert site.close(drain_s=15)
    wait_for(lambda: platform.summary()["received"] >= acked.count, 15, "the verifier")
    platform.stop()

    assert platform.summary()["chain_gaps"] == 0
    records = sorted(arrived, key=lambda r: r.seq)
    tag_records = [r for r in records if r.kind.startswith("tag.")]
    # 180 beacons: 5 records (an interval per tag, and the tamper and its interval)
    assert [r.kind for r in tag_records].count("tag.interval") == 4
    assert len(tag_records) == 5
    cut = [r for r in tag_records if r.record["body"]["tag"] == tags[0].tag]
    assert [r.kind for r in cut] == ["tag.interval", "tag.tamper", "tag.interval"]
    first, tamper, second = (r.record["body"] for r in cut)
    assert (first["first_counter"], first["last_counter"], first["beacons"]) == \
        (1, rounds, rounds)
    assert first["closed"] == "state_change"
    assert first["strap_closed"] is True
    assert tamper["counter"] == rounds + 1  # the beacon after the interval's last
    assert (second["first_counter"], second["last_counter"], second["closed"]) == \
        (rounds + 1, 2 * rounds, "stop")
    assert second["strap_closed"] is False
    for tag in tags[1:]:
        (body,) = [r.record["body"] for r in tag_records if r.record["body"]["tag"] == tag.tag]
        assert (body["first_counter"], body["last_counter"], body["beacons"]) == \
            (1, 2 * rounds, 2 * rounds)
