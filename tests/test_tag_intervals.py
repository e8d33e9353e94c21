"""Presence as intervals (docs/records.md ``tag.interval``), sans-IO: whatever the beacons,
losses, ticks, faults, authorisation changes, pairings and restarts, the intervals of a tag
cover every beacon recorded exactly once, in disjoint increasing counter ranges, and every
hole between two of them is explained."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from hypothesis import example, given, settings
from hypothesis import strategies as st

from core.devices import PairedTag
from core.record import JSON, Reading, Source
from drivers.tag_receiver import (
    MSG_BEACON,
    Beacon,
    TagReceiverDriver,
    counter_key,
    interval_key,
    interval_keys,
    recovered_intervals,
)
from firmware_bridge.framed import LedgerOnly
from firmware_bridge.link import Message
from firmware_bridge.messages import DeviceClass, Hello
from lab.simulators.tag import SimTag

HELLO = Hello(1, DeviceClass.TAG_RECEIVER, (1, 2, 3), 1, "TR-0001")
S = 1_000_000_000
ABSENT_AFTER_S = 30
INTERVAL_MAX_S = 60.0
TRANSITIONS = frozenset({"tag.absent", "tag.present", "tag.tamper", "tag.tamper_restored",
                         "tag.battery_low", "tag.battery_ok", "tag.spoof"})
#: Records (or, here, marks) that explain a hole between two intervals of a tag
#: (central/presence.py); "authorisation" stands for the supervision's authorisation.*
#: record sealed when the tag's authorised period starts or ends (the gate).
EXPLAINING = frozenset({"tag.absent", "tag.spoof", "authorisation"})


@dataclass
class Home:
    """The driver, its store (a ledger committed with every output) and what it made."""

    tags: list[SimTag]
    ledger: dict[str, int] = field(default_factory=dict)
    records: list[tuple[str, dict[str, JSON]]] = field(default_factory=list)
    gate: dict[str, bool] = field(default_factory=dict)
    paired: dict[str, bool] = field(default_factory=dict)
    recorded: dict[str, list[int]] = field(default_factory=dict)  # counters of beacons
    t_ns: int = 0
    event: int = 0
    drv: TagReceiverDriver = field(init=False)

    def __post_init__(self) -> None:
        for tag in self.tags:
            self.gate[tag.tag] = self.paired[tag.tag] = True
            self.recorded[tag.tag] = []
        self.drv = self._driver()

    def pairing(self, tag: SimTag) -> PairedTag:
        return PairedTag(tag.tag, tag.key, ABSENT_AFTER_S, 0)

    def _driver(self) -> TagReceiverDriver:
        tags = {t.tag: self.pairing(t) for t in self.tags if self.paired[t.tag]}
        return TagReceiverDriver(tags, self.ledger.get, started_ns=self.t_ns,
                                 presence=lambda tag, _e, _t, _r: self.gate[tag],
                                 interval_max_s=INTERVAL_MAX_S)

    def commit(self, out: list[Reading] | LedgerOnly) -> None:
        if isinstance(out, LedgerOnly):
            self.ledger.update(out.updates)
            return
        for reading in out:
            self.records.append((reading.kind, dict(reading.body)))
            self.ledger.update(reading.ledger)

    def feed(self, raw: bytes) -> list[Reading] | LedgerOnly:
        self.event += 1
        return self.drv.on_message(Message("TR-0001", self.event, MSG_BEACON, raw), HELLO,
                                   self.t_ns)

    def step(self, action: tuple[str, int, int]) -> None:
        what, index, value = action
        tag = self.tags[index % len(self.tags)]
        before = {t: list(c) for t, c in self.recorded.items()}
        mark = len(self.records)
        if what == "beacon":
            self.beacon(tag.beacon(rssi=-40 - value % 50))
        elif what == "lost":  # the tag beaconed, the receiver did not hear it
            tag.beacon()
        elif what == "wait":
            self.t_ns += (value % 90 + 1) * S
            self.commit(self.drv.tick(self.t_ns))
        elif what == "strap":
            tag.strap_closed = not tag.strap_closed
        elif what == "battery":
            tag.battery_pct = value % 101
        elif what == "forge":
            self.commit(self.feed(tag.forged().to_bytes()))
        elif what == "replay" and tag.history:  # accepted if never heard (lost before)
            self.beacon(tag.history[value % len(tag.history)])
        elif what == "gate":  # the authorised period starts or ends: a record says so
            self.gate[tag.tag] = not self.gate[tag.tag]
            self.records.append(("authorisation", {"tag": tag.tag}))
        elif what == "pairing":
            self.paired[tag.tag] = not self.paired[tag.tag]
            self.drv.set_pairing(tag.tag, self.pairing(tag) if self.paired[tag.tag] else None)
        elif what == "crash":  # SIGKILL: what is committed is all there is
            self.restart(clean=False)
        elif what == "stop":
            self.restart(clean=True)
        self.check_closed_before_transitions(mark, before)

    def beacon(self, beacon: Beacon) -> None:
        accepted = self.drv.stats.accepted
        out = self.feed(beacon.to_bytes())
        if self.drv.stats.accepted > accepted and self.gate[beacon.tag]:
            self.recorded[beacon.tag].append(beacon.counter)
        self.commit(out)  # outside the period nothing of the beacon is written

    def restart(self, *, clean: bool) -> None:
        if clean:
            self.commit(self.drv.close_all(self.t_ns))
        self.t_ns += S
        for reading, keys in recovered_intervals([t.tag for t in self.tags], self.ledger.get,
                                                 reading_source(), self.t_ns):
            assert not clean, "a clean stop leaves no interval open"
            self.records.append((reading.kind, dict(reading.body)))
            for key in keys:
                self.ledger.pop(key, None)
        self.drv = self._driver()

    def check_closed_before_transitions(self, mark: int,
                                        before: dict[str, list[int]]) -> None:
        """Each transition record of this step comes after the interval that held every
        beacon recorded before the step."""
        for k in range(mark, len(self.records)):
            kind, body = self.records[k]
            if kind not in TRANSITIONS:
                continue
            tag = str(body["tag"])
            ranges = intervals_of(self.records[:k], tag)
            assert all(any(lo <= c <= hi for lo, hi, _ in ranges) for c in before[tag])


def reading_source() -> Source:
    return Source("gateway", "gw-test")


def intervals_of(records: list[tuple[str, dict[str, JSON]]],
                 tag: str) -> list[tuple[int, int, int]]:
    out = []
    for kind, body in records:
        if kind == "tag.interval" and body["tag"] == tag:
            first, last, beacons = body["first_counter"], body["last_counter"], body["beacons"]
            assert isinstance(first, int)
            assert isinstance(last, int)
            assert isinstance(beacons, int)
            out.append((first, last, beacons))
    return out


ACTIONS = st.tuples(
    st.sampled_from(["beacon"] * 8 + ["lost"] * 2 + ["wait"] * 3 + [
        "strap", "battery", "forge", "replay", "gate", "pairing", "crash", "stop"]),
    st.integers(0, 1), st.integers(0, 1000))


@settings(max_examples=300, deadline=None)
@given(st.lists(ACTIONS, max_size=80))
# found on 2 Dec: the test's own mark of a gated beacon came before the interval that
# beacon closed, so the hole after it looked unexplained; the product's explanation is the
# authorisation record at the period's start, between the two intervals
@example([("beacon", 0, 0), ("gate", 0, 0), ("beacon", 0, 0), ("gate", 0, 0),
          ("beacon", 0, 0)])
def test_intervals_cover_every_recorded_beacon_once_and_explain_every_hole(
        actions: list[tuple[str, int, int]]) -> None:
    home = Home([SimTag(0x1000 + i, bytes([i + 1]) * 16) for i in range(2)])
    for action in actions:
        home.step(action)
    home.restart(clean=True)
    for tag, counters in home.recorded.items():
        ranges = intervals_of(home.records, tag)
        for (_, hi, _), (lo2, _, _) in pairwise(ranges):
            assert hi < lo2  # disjoint, increasing
        for lo, hi, beacons in ranges:
            assert lo <= hi
            assert beacons == sum(lo <= c <= hi for c in counters) >= 1
        for c in counters:
            assert sum(lo <= c <= hi for lo, hi, _ in ranges) == 1
        # every hole between consecutive intervals has a record (or mark) between them
        positions = [i for i, (kind, body) in enumerate(home.records)
                     if kind == "tag.interval" and body["tag"] == tag]
        for (a, b), ((_, hi, _), (lo, _, _)) in zip(pairwise(positions), pairwise(ranges),
                                                     strict=True):
            if lo != hi + 1:
                assert any(kind in EXPLAINING and body.get("tag") == tag
                           for kind, body in home.records[a + 1:b]), (hi, lo)


def test_an_interval_closes_at_its_max_age_on_a_tick_and_on_a_beacon() -> None:
    home = Home([SimTag(0x1000, bytes(16))])
    tag = home.tags[0]
    for _ in range(3):
        home.step(("beacon", 0, 0))
        home.t_ns += 20 * S
    home.commit(home.drv.tick(home.t_ns))  # 60 s after the first beacon
    assert intervals_of(home.records, tag.tag) == [(1, 3, 3)]
    assert home.records[-1][1]["closed"] == "max_age"
    assert home.ledger[interval_key(tag.tag, "beacons")] == 0  # closed in the ledger
    for _ in range(4):
        home.step(("lost", 0, 0))  # heard again after four beacons lost on the radio
        home.step(("beacon", 0, 0))
        home.t_ns += 25 * S
    # the next interval starts after the last one (the lost beacons are its radio loss)
    # and closes at its age on the beacon that finds it too old, which opens the next
    # (beacons 5, 7, 9 at 60, 85, 110 s; 11 at 135 s finds it 75 s old)
    assert intervals_of(home.records, tag.tag) == [(1, 3, 3), (4, 9, 3)]
    assert home.records[-1][1]["closed"] == "max_age"
    assert home.ledger[interval_key(tag.tag, "first")] == 10
    assert home.ledger[interval_key(tag.tag, "last")] == 11


def test_an_open_interval_is_in_the_ledger_and_recovered_once() -> None:
    home = Home([SimTag(0x1000, bytes(16))])
    tag = home.tags[0]
    for rssi in (10, 20, 30):
        home.step(("beacon", 0, rssi))
        home.t_ns += S
    assert home.records == []  # nothing recorded: the ledger holds the interval
    assert home.ledger[counter_key(tag.tag)] == 3
    found = recovered_intervals([tag.tag], home.ledger.get, reading_source(), home.t_ns)
    assert len(found) == 1
    reading, keys = found[0]
    assert reading.kind == "tag.interval"
    assert set(keys) == set(interval_keys(tag.tag))
    body = dict(reading.body)
    assert body["closed"] == "recovered"
    assert (body["first_counter"], body["last_counter"], body["beacons"]) == (1, 3, 3)
    assert body["rssi_dbm"] == {"min": -70, "max": -50, "mean": -60}
    assert body["dev_events"] == [1, 3]
    assert (body["first_mono_ms"], body["last_mono_ms"]) == (0, 2000)
    home.restart(clean=False)
    assert [k for k, _ in home.records] == ["tag.interval"]
    assert recovered_intervals([tag.tag], home.ledger.get, reading_source(), 0) == []


def test_unpairing_and_the_end_of_an_authorisation_close_the_interval() -> None:
    home = Home([SimTag(0x1000, bytes(16)), SimTag(0x1001, bytes([2]) * 16)])
    home.step(("beacon", 0, 0))
    home.step(("beacon", 1, 0))
    home.step(("gate", 0, 0))  # tag 0's authorised period ends
    home.step(("pairing", 1, 0))  # tag 1 is unpaired
    home.step(("beacon", 0, 0))  # gated: closes tag 0's interval, records nothing else
    closed = {body["tag"]: body["closed"] for kind, body in home.records
              if kind == "tag.interval"}
    assert closed == {"T00001000": "authorisation", "T00001001": "unpaired"}
    assert home.ledger[counter_key("T00001000")] == 2  # the counter still moves
