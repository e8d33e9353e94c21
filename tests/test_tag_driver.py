"""The tag receiver driver, sans-IO: MACs, rolling counters, faults and their restores,
presence as intervals."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from core.devices import PairedTag
from core.record import Reading
from drivers.tag_receiver import (
    BATTERY_LOW_PCT,
    MSG_BEACON,
    PRESENT_AFTER_BEACONS,
    Beacon,
    TagReceiverDriver,
    counter_key,
    interval_key,
)
from firmware_bridge.framed import LedgerOnly
from firmware_bridge.link import Message
from firmware_bridge.messages import DeviceClass, Hello
from lab.simulators.tag import SimTag

HELLO = Hello(1, DeviceClass.TAG_RECEIVER, (1, 2, 3), 1, "TR-0001")
KEY = bytes(range(16))
S = 1_000_000_000  # one second in ns


def driver(ledger: dict[str, int] | None = None, absent_after_s: int = 60) -> TagReceiverDriver:
    tags = {"T00001000": PairedTag("T00001000", KEY, absent_after_s, 0)}
    return TagReceiverDriver(tags, (ledger or {}).get, started_ns=0)


class Feed:
    def __init__(self, drv: TagReceiverDriver) -> None:
        self.drv = drv
        self.event = 0

    def __call__(self, beacon: Beacon, t_s: float = 1.0) -> list[Reading] | LedgerOnly:
        self.event += 1
        msg = Message("TR-0001", self.event, MSG_BEACON, beacon.to_bytes())
        return self.drv.on_message(msg, HELLO, int(t_s * S))


def kinds(readings: list[Reading] | LedgerOnly) -> list[str]:
    """The records a message makes (none when it is ledger entries alone)."""
    return [] if isinstance(readings, LedgerOnly) else [r.kind for r in readings]


def test_golden_beacon_bytes() -> None:
    b = Beacon(0x1000, 7, 90, 0x03, -60, bytes.fromhex("0102030405060708"))
    assert b.to_bytes() == bytes.fromhex("00100000 07000000 5a 03 c4 0102030405060708")
    assert Beacon.from_bytes(b.to_bytes()) == b


def test_a_genuine_beacon_opens_an_interval_and_moves_the_counter() -> None:
    feed = Feed(driver())
    out = feed(SimTag(0x1000, KEY).beacon())
    assert isinstance(out, LedgerOnly)  # no record: ledger entries alone
    entries = dict(out.updates)
    assert entries[counter_key("T00001000")] == 1
    assert entries[interval_key("T00001000", "first")] == 1
    assert entries[interval_key("T00001000", "beacons")] == 1


def test_a_forged_beacon_raises_a_spoof_alarm() -> None:
    drv = driver()
    out = Feed(drv)(SimTag(0x1000, KEY).forged())
    assert kinds(out) == ["tag.spoof"]
    assert out[0].body["reason"] == "bad_mac"
    assert out[0].priority.label == "alarm"
    assert out[0].device_event == ("TR-0001", 1)  # the receiver is still acknowledged
    assert drv.stats.rejected == {"bad_mac": 1}


def test_a_replayed_beacon_raises_a_spoof_alarm_even_after_a_restart() -> None:
    tag = SimTag(0x1000, KEY)
    first, second = tag.beacon(), tag.beacon()
    feed = Feed(driver())
    assert kinds(feed(first)) == []
    assert kinds(feed(second)) == []
    out = feed(first)
    assert kinds(out) == ["tag.interval", "tag.spoof"]  # the interval closes before
    assert out[1].body["reason"] == "replay"
    assert out[0].body["first_counter"] == 1
    assert out[0].body["last_counter"] == 2
    # a restarted gateway knows the last counter from the store's ledger
    restarted = Feed(driver({counter_key("T00001000"): 2}))
    assert kinds(restarted(second)) == ["tag.spoof"]
    assert kinds(restarted(tag.beacon())) == []


def test_an_unknown_tag_is_counted_not_recorded() -> None:
    drv = driver()
    assert Feed(drv)(SimTag(0x9999, KEY).beacon()) == []
    assert drv.stats.rejected == {"unknown_tag": 1}


def test_tamper_and_its_restore() -> None:
    tag = SimTag(0x1000, KEY)
    feed = Feed(driver())
    assert kinds(feed(tag.beacon())) == []  # closed at start: nothing to restore
    tag.strap_closed = False
    assert kinds(feed(tag.beacon())) == ["tag.interval", "tag.tamper"]
    assert kinds(feed(tag.beacon())) == []  # still open: no repeat
    tag.strap_closed = True
    tag.body_contact = False
    assert kinds(feed(tag.beacon())) == []  # still tampered, other cause
    tag.body_contact = True
    out = feed(tag.beacon())
    assert kinds(out) == ["tag.interval", "tag.tamper_restored"]
    assert isinstance(out, list)
    ival = out[0].body
    assert (ival["first_counter"], ival["last_counter"], ival["beacons"]) == (2, 4, 3)
    assert ival["closed"] == "state_change"
    assert (ival["strap_closed"], ival["body_contact"]) == (True, False)  # the last beacon


def test_a_tag_open_at_start_is_reported() -> None:
    tag = SimTag(0x1000, KEY, strap_closed=False)
    assert kinds(Feed(driver())(tag.beacon())) == ["tag.tamper"]


def test_battery_low_with_hysteresis() -> None:
    tag = SimTag(0x1000, KEY, battery_pct=25)
    feed = Feed(driver())
    assert kinds(feed(tag.beacon())) == []
    tag.battery_pct = BATTERY_LOW_PCT
    assert kinds(feed(tag.beacon())) == ["tag.interval", "tag.battery_low"]
    tag.battery_pct = 25
    assert kinds(feed(tag.beacon())) == []  # inside the hysteresis band
    tag.battery_pct = 31
    assert kinds(feed(tag.beacon())) == ["tag.interval", "tag.battery_ok"]


def test_absent_then_present_after_several_beacons() -> None:
    drv = driver(absent_after_s=60)
    tag = SimTag(0x1000, KEY)
    feed = Feed(drv)
    feed(tag.beacon(), t_s=1)
    assert drv.tick(60 * S) == []
    absent = drv.tick(62 * S)
    assert kinds(absent) == ["tag.interval", "tag.absent"]
    assert drv.tick(500 * S) == []  # reported once
    for i in range(PRESENT_AFTER_BEACONS - 1):
        assert kinds(feed(tag.beacon(), t_s=600 + i)) == []
    out = feed(tag.beacon(), t_s=610)
    # the beacons heard while still held absent are an interval of their own
    assert kinds(out) == ["tag.interval", "tag.present"]
    assert isinstance(out, list)
    assert out[0].body["beacons"] == PRESENT_AFTER_BEACONS - 1


def test_a_tag_never_heard_after_start_is_absent() -> None:
    drv = driver(absent_after_s=60)
    assert kinds(drv.tick(61 * S)) == ["tag.absent"]


def test_malformed_and_unknown_messages_are_kept_raw() -> None:
    drv = driver()
    out = drv.on_message(Message("TR-0001", 5, MSG_BEACON, b"\x01\x02"), HELLO, S)
    assert kinds(out) == ["device.error"]
    assert isinstance(out, list)
    assert out[0].body["raw"] == "0102"
    out = drv.on_message(Message("TR-0001", 6, 0x7F, b"\xff"), HELLO, S)
    assert isinstance(out, list)
    assert out[0].body["error"] == "unknown_message"


@given(st.integers(0, 255), st.binary(max_size=64))
def test_arbitrary_bodies_never_raise(msg_type: int, body: bytes) -> None:
    out = driver().on_message(Message("TR-0001", 1, msg_type, body), HELLO, S)
    assert isinstance(out, list)
    assert len(out) <= 1
    assert all(r.device_event == ("TR-0001", 1) for r in out)
