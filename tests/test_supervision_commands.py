"""The supervision commands in the running gateway (app/supervision.py, docs/commands.md,
docs/supervision.md), end to end over a real mosquitto with mTLS and the production ACL:
a period over three months refused with its record; no presence record of a tag outside
its authorised period (counted); a must-be-home window breached by the simulated tag and
its return; a leave with a late return; a spot check overtaking a large backlog; and a
set-authorisation applied exactly once across a SIGKILL."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import signal
import subprocess
import time
from typing import Any

import pytest

from app.config import DeviceSection
from app.supervision import GEN_KEY, NEXT_FILE, STATE_FILE
from central.commands import presence_words, wait_presence
from central.db import open_db
from core.record import Reading
from firmware_bridge.messages import DeviceClass
from lab.mosquitto import start_mosquitto
from lab.simulators.tag import SimTag, TagReceiverSim
from provisioning.registry import open_registry
from tests.helpers import wait_for
from tests.test_commands import (
    DAEMON_CONFIG,
    Lab,
    daemon,
    lab,  # noqa: F401 - the fixture (a platform, a gateway identity)
    running,
)

WEEK = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
#: The issue's backlog: a spot check answered while this many records wait to go out.
BACKLOG = 100_000
#: Readings per submit_all while the backlog is built (the writer commits 2000 a group).
BACKLOG_CHUNK = 10_000


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def authorisation(tag: str, *, start: dt.date | None = None, days: int = 30,
                  document: str = "DOC-1") -> dict[str, Any]:
    first = start or today() - dt.timedelta(days=1)
    return {"tag": tag, "basis": "left_area_without_approval", "document": document,
            "approver": "bureau head", "start": first.isoformat(),
            "end": (first + dt.timedelta(days=days)).isoformat(), "zone": "UTC"}


def pair(site: Lab, *tags: SimTag, absent_after_s: int = 10) -> None:
    reg = open_registry(site.identity)
    try:
        for tag in tags:
            reg.pair(tag.tag, tag.key, absent_after_s=absent_after_s)
    finally:
        reg.close()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def applied(site: Lab, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    outcome = site.answer(site.send(kind, body))
    assert outcome.outcome == "applied", outcome.body
    return outcome.body


def tags_of(site: Lab, kind: str) -> list[str]:
    return [r["body"]["tag"] for r in site.records(kind)]


@pytest.mark.slow
def test_authorisation_gates_what_is_recorded(lab: Lab) -> None:  # noqa: F811
    inside, outside = SimTag(0xA001, bytes([1]) * 16), SimTag(0xA002, bytes([2]) * 16)
    never = SimTag(0xA003, bytes([3]) * 16)  # paired, never given an authorisation
    pair(lab, inside, outside, never)
    sim = TagReceiverSim("TR-SUP-0001", tags=[inside, outside, never],
                         link=lab.tmp / "tty-tags").start()
    gateway = running(lab, [DeviceSection("tags", DeviceClass.TAG_RECEIVER, sim.path)])
    try:
        assert gateway.supervision is not None
        # a period over three months: refused with its reason, before anything changes
        too_long = lab.send("set-authorisation", authorisation(inside.tag, days=120))
        got = lab.answer(too_long)
        assert (got.outcome, got.reason, got.body["field"]) == ("rejected", "bad_body", "end")
        assert "period_too_long" in got.body["detail"]
        assert got.body["consumed"] is True
        assert [r["body"]["reason"] for r in lab.records("command.rejected")] == ["bad_body"]
        # one tag authorised now, the other from next week
        body = applied(lab, "set-authorisation", authorisation(inside.tag))
        assert body["state"]["of"] == "supervision"
        state = json.loads((lab.tmp / "data" / STATE_FILE).read_bytes())
        assert body["state"]["sha256"] == hashlib.sha256(
            state["state"].encode()).hexdigest()
        assert state["gen"] == gateway.writer.ledger_value(GEN_KEY)
        applied(lab, "set-authorisation", authorisation(
            outside.tag, start=today() + dt.timedelta(days=7), document="DOC-2"))
        wait_for(lambda: tags_of(lab, "authorisation.started") == [inside.tag], 10,
                 "authorisation.started of the authorised tag")
        driver = gateway._tag_drivers[0]
        before = driver.stats.accepted
        for _ in range(3):
            sim.send_beacon(inside)
            sim.send_beacon(outside)
            sim.send_beacon(never)
        wait_for(lambda: driver.stats.accepted >= before + 9, 10, "the beacons accepted")
        assert gateway.writer.flush()
        # [supervision] require_authorisation (the default): a tag never authorised is
        # ignored as one outside its period
        assert gateway.supervision.require_authorisation is True
        assert gateway.supervision.stats.ignored["tag.presence"] == 6
        health = gateway._health_extra()["supervision"]
        assert health["ignored"] == {"tag.presence": 6}  # type: ignore[comparison-overlap]
        gateway.stop(5)  # a clean stop seals the open presence interval
        wait_for(lambda: inside.tag in tags_of(lab, "tag.interval"), 20,
                 "the authorised tag's presence at the platform")
        # nothing of the other tags was sealed, let alone sent
        assert outside.tag not in tags_of(lab, "tag.interval")
        assert never.tag not in tags_of(lab, "tag.interval")
        assert gateway.writer.stats.by_kind["tag.interval"] == 1
        [interval] = lab.records("tag.interval")
        assert interval["body"]["beacons"] == 3
    finally:
        gateway.stop(2)
        sim.stop()


@pytest.mark.slow
def test_window_breach_return_and_late_return_from_leave(lab: Lab) -> None:  # noqa: F811
    home, away = SimTag(0xB001, bytes([3]) * 16), SimTag(0xB002, bytes([4]) * 16)
    pair(lab, home, away)
    sim = TagReceiverSim("TR-SUP-0002", tags=[home, away], link=lab.tmp / "tty-tags").start()
    gateway = running(lab, [DeviceSection("tags", DeviceClass.TAG_RECEIVER, sim.path)])
    sup = gateway.supervision
    assert sup is not None
    try:
        applied(lab, "set-authorisation", authorisation(home.tag))
        applied(lab, "set-authorisation", authorisation(away.tag, document="DOC-2"))
        # the away tag: on leave until three seconds from now, back within no grace: it
        # is never heard, so it is late
        t = now_ms()
        applied(lab, "approve-leave", {"tag": away.tag, "leave_id": "L-1", "document": "LV-1",
                                       "approver": "officer", "start_ms": t - 60_000,
                                       "end_ms": t + 3_000, "grace_min": 0})
        sim.send_beacon(home)
        wait_for(lambda: sup.sup.presence_now(home.tag, now_ms())["present"] is True, 10,
                 "the home tag seen by the evaluator")
        applied(lab, "set-presence-rules", {
            "tag": home.tag, "zone": "UTC", "grace_min": 0,
            "windows": [{"days": WEEK, "start": "00:00", "end": "24:00"}]})
        # the tag goes quiet: absent after 10 s, a breach at once (no grace)
        wait_for(lambda: home.tag in tags_of(lab, "presence.violation"), 25,
                 "presence.violation of the home tag")
        wait_for(lambda: away.tag in tags_of(lab, "leave.late_return"), 10,
                 "leave.late_return of the away tag")
        assert sorted(tags_of(lab, "tag.absent")) == [home.tag, away.tag]
        for _ in range(3):  # present again after three beacons (the receiver's hysteresis)
            sim.send_beacon(home)
        wait_for(lambda: home.tag in tags_of(lab, "presence.returned"), 15,
                 "presence.returned of the home tag")
        violation = lab.records("presence.violation")[0]
        assert violation["prio"] == "alarm"
        assert lab.records("leave.late_return")[0]["prio"] == "alarm"
        assert tags_of(lab, "presence.violation") == [home.tag]  # once
        assert tags_of(lab, "leave.started") == [away.tag]
        assert tags_of(lab, "leave.ended") == [away.tag]
    finally:
        gateway.stop(2)
        sim.stop()


@pytest.mark.slow
def test_a_spot_check_overtakes_a_large_backlog(lab: Lab) -> None:  # noqa: F811
    tag = SimTag(0xC001, bytes([5]) * 16)
    pair(lab, tag, absent_after_s=600)  # heard once, present while the backlog is built
    sim = TagReceiverSim("TR-SUP-0003", tags=[tag], link=lab.tmp / "tty-tags").start()
    gateway = running(lab, [DeviceSection("tags", DeviceClass.TAG_RECEIVER, sim.path)])
    # a broker keeping sessions across its restarts, as a production one does
    lab.broker.stop()
    wait_for(lambda: not gateway.forwarder.stats.connected, 15, "the first broker gone")
    workdir = lab.tmp / "mosquitto-persistent"
    lab.broker = broker = start_mosquitto(workdir, lab.pki, port=lab.broker.port,
                                          persistence=True)
    try:
        wait_for(lambda: gateway.forwarder.stats.connected, 30, "the uplink on the new broker")
        applied(lab, "set-authorisation", authorisation(tag.tag))
        sim.send_beacon(tag)  # it extends the tag's presence interval: no record yet
        sup = gateway.supervision
        assert sup is not None
        wait_for(lambda: sup.sup.presence_now(tag.tag, now_ms())["present"] is True, 15,
                 "the tag heard")
        broker.stop()
        wait_for(lambda: not gateway.forwarder.stats.connected, 15, "the uplink down")
        source = gateway.source
        built = time.monotonic()
        for start in range(0, BACKLOG, BACKLOG_CHUNK):  # sealed and committed by the writer
            gateway.writer.submit_all([Reading("tag.presence", source, {
                "tag": tag.tag, "counter": 0, "battery_pct": 90, "strap_closed": True,
                "body_contact": True, "rssi_dbm": -60, "dev_event": i, "backlog": True},
                gateway.clock.now_ns()) for i in range(start, start + BACKLOG_CHUNK)])
        assert gateway.writer.flush(120)
        assert gateway.queued() >= BACKLOG
        backlog_last = gateway.writer.last_seq  # the backlog's last record
        print(f"\n{BACKLOG} records queued in {time.monotonic() - built:.1f} s")
        lab.broker = broker = start_mosquitto(workdir, lab.pki, port=broker.port,
                                              persistence=True)
        # the uplink back (after its backoff), the backlog starts to drain: the spot check
        # comes during it
        wait_for(lambda: gateway.forwarder.stats.connected, 60, "the uplink back")
        sent = time.monotonic()
        issued = lab.send("request-presence", {"tag": tag.tag})
        with open_db(lab.db_url, migrate=False) as db:
            answer = wait_presence(db, issued, 60)
        latency_ms = round((time.monotonic() - sent) * 1000)
        assert answer is not None
        print(f"spot check answered in {latency_ms} ms with {BACKLOG} records queued: "
              f"{presence_words(answer)}")
        assert answer["authorised"] is True
        assert answer["present"] is True
        assert answer["rssi_dbm"] == -60
        spot = lab.records("presence.now")[0]
        assert spot["prio"] == "alarm"
        # the ordering, from what the platform received (the ingest stores each message as
        # it arrives: SQLite's rowid is the order of arrival): the answer, sealed after
        # every backlog record (a higher seq), was stored before most of them
        with open_db(lab.db_url, migrate=False) as db, db.transaction(write=False) as tx:
            row = tx.one("SELECT rowid, seq FROM records WHERE gw = ? AND kind = ?",
                         (lab.identity.gateway_id, "presence.now"))
            assert row is not None
            before = tx.one("SELECT COUNT(*) FROM records WHERE gw = ? AND kind = "
                            "'tag.presence' AND seq <= ? AND rowid < ?",
                            (lab.identity.gateway_id, backlog_last, row[0]))
        assert before is not None
        print(f"backlog records at the platform when the answer was stored: {before[0]} of "
              f"{BACKLOG}")
        assert int(row[1]) > backlog_last  # sealed after every backlog record ...
        assert int(before[0]) < BACKLOG // 2  # ... it overtook at least half of them
    finally:
        gateway.stop(2)
        sim.stop()
        broker.stop()


@pytest.mark.slow
def test_set_authorisation_applied_exactly_once_across_a_sigkill(lab: Lab) -> None:  # noqa: F811
    files = lab.pki.client(lab.identity.gateway_id)
    config = lab.tmp / "gateway.toml"
    config.write_text(DAEMON_CONFIG.format(
        identity=lab.identity.directory, data=lab.tmp / "data", run=lab.tmp / "run",
        host=lab.broker.host, port=lab.broker.port, ca=lab.pki.ca_file, cert=files.cert,
        key=files.key))
    tag = "T0000D001"
    proc = daemon(lab, config, kill_at="effect")
    try:
        lab.wait_box()  # the daemon is up and subscribed
        issued = lab.send("set-authorisation", authorisation(tag))
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == -signal.SIGKILL, (lab.records("command.rejected"),
                                         lab.records("command.applied"))
        assert (lab.tmp / "data" / NEXT_FILE).exists()  # the state written, not committed
        assert lab.records("command.applied") == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = daemon(lab, config)
    try:
        outcome = lab.answer(issued, timeout=30)
        assert outcome.outcome == "applied"
        assert outcome.body["recovered"] is True
        marker = lab.send("request-presence", {"tag": tag})
        assert lab.answer(marker, timeout=30).body["cseq"] == 2
        wait_for(lambda: len(lab.records("presence.now")) == 1, 20, "the spot check")
        assert lab.records("presence.now")[0]["body"]["authorised"] is True
        assert [r["body"]["cseq"] for r in lab.records("command.applied")] == [1, 2]
        assert tags_of(lab, "authorisation.started") == [tag]  # once
        assert not (lab.tmp / "data" / NEXT_FILE).exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


