"""The check-in kiosk: codecs, the fault/restore pairing, and the whole path over a pty."""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC
from hypothesis import given
from hypothesis import strategies as st

from core.clock import Clock
from core.devices import PairedKiosk
from core.kinds import KIND_PRIORITY, Priority
from core.record import Reading
from core.topics import PLATFORM_CN
from drivers.kiosk import (
    FLAG_CAMERA_FAULT,
    FLAG_FINGERPRINT_FAULT,
    FLAG_MAINS_LOST,
    FLAG_ON_BATTERY,
    FLAG_PAPER_FAULT,
    FLAG_TAMPER,
    KIOSK_KINDS,
    MSG_CHECKIN,
    MSG_STATUS,
    MSG_UNSIGNED_CHECKIN,
    MSG_UNSIGNED_STATUS,
    PERSON_MAX,
    CheckIn,
    CheckinPayloadError,
    KioskDriver,
    KioskStatus,
    MessageError,
    Method,
    Result,
    SignedCheckIn,
    SignedStatus,
    checkin_mac,
    counter_key,
    flags_key,
    status_mac,
)
from firmware_bridge.framing import Frame, FrameDecoder, FrameType
from firmware_bridge.link import Message
from firmware_bridge.messages import PROTOCOL_VERSION, Data, DeviceClass, Hello, PayloadError
from lab.acked import AckedCounter
from lab.chains import Chain
from lab.mosquitto import Mosquitto, Pki, client_config
from lab.site import Platform, Site
from lab.wire import Damage
from provisioning.identity import Identity
from provisioning.kiosks import open_kiosks
from tests.helpers import wait_for

SERIAL = "KI-0001"
S = 1_000_000_000
KINDS_MADE = KIOSK_KINDS | {"device.error"}
DOCS = Path(__file__).resolve().parents[1] / "docs"
SCHEMA = json.loads((DOCS / "record.schema.json").read_text())
# 2026-11-29T07:30:00Z
T_KIOSK = 1795937400
GOLDEN = CheckIn("P-000123", Method.FINGERPRINT, 973, Result.MATCH, T_KIOSK, 60)
GOLDEN_BYTES = bytes.fromhex("01  01  cd 03  78 d4 0b 6b  3c 00  08  50 2d 30 30 30 31 32 33")
#: The pairing key of the kiosk of docs/kiosk.md, and its signed golden check-in (counter 5).
KEY = bytes(range(16))
SIGNED_BYTES = bytes.fromhex(
    "05 00 00 00  01 01 cd 03 78 d4 0b 6b 3c 00 08 50 2d 30 30 30 31 32 33"
    "  1d 7f e1 1b fe 03 ea 20")
#: Its signed golden status (counter 6: the check-ins' counter): tamper, paper, battery 57 %.
SIGNED_STATUS_BYTES = bytes.fromhex("06 00 00 00  0d 00 39  b9 79 22 58 db 4a 56 61")


def paired(*serials: str) -> dict[str, PairedKiosk]:
    return {serial: PairedKiosk(serial, KEY, 0) for serial in serials}


class Feed:
    """Messages of one kiosk, numbered as its link would number them."""

    def __init__(self, drv: KioskDriver | None = None, serial: str = SERIAL) -> None:
        self.drv = drv or KioskDriver(paired(SERIAL))
        self.serial = serial
        self.hello = Hello(2, DeviceClass.KIOSK, (2, 1, 0), 3, serial)
        self.event = 0
        self.counter = 0
        self.drv.on_device_up(self.hello)

    def raw(self, msg_type: int, body: bytes) -> list[Reading]:
        self.event += 1
        msg = Message(self.serial, self.event, msg_type, body)
        return self.drv.on_message(msg, self.hello, self.event * S)

    def checkin(self, inner: bytes, key: bytes = KEY, counter: int | None = None) -> list[Reading]:
        """A CHECKIN signed as the kiosk signs it (next counter unless *counter*)."""
        if counter is None:
            self.counter += 1
            counter = self.counter
        return self.raw(MSG_CHECKIN, signed_body(inner, key, counter))

    def status(self, flags: int, battery: int | None = 80, key: bytes = KEY,
               counter: int | None = None) -> list[Reading]:
        """A STATUS signed as the kiosk signs it (next counter, the check-ins' one)."""
        if counter is None:
            self.counter += 1
            counter = self.counter
        status = KioskStatus(flags, battery)
        return self.raw(MSG_STATUS, SignedStatus.sign(key, counter, status).to_bytes())

    def up(self) -> None:
        self.drv.on_device_up(self.hello)


def signed_body(inner: bytes, key: bytes, counter: int) -> bytes:
    """counter | check-in | mac, whatever the check-in bytes (valid or not)."""
    signed_part = counter.to_bytes(4, "little") + inner
    return signed_part + checkin_mac(key, signed_part)


def kinds(readings: list[Reading]) -> list[str]:
    return [r.kind for r in readings]


def transitions(readings: list[Reading]) -> list[tuple[str, str | None, bool]]:
    """(kind, fault name, resync) of each fault/restore record, in order."""
    return [(r.kind, r.body.get("fault"), r.body["resync"]) for r in readings
            if r.kind != "kiosk.status"]


# -- codecs ----------------------------------------------------------------------


def test_golden_checkin_bytes() -> None:
    assert GOLDEN.to_bytes() == GOLDEN_BYTES
    assert CheckIn.from_bytes(GOLDEN_BYTES) == GOLDEN
    assert GOLDEN.kiosk_time_iso == "2026-11-29T07:30:00Z"


def test_golden_signed_checkin_bytes() -> None:
    signed = SignedCheckIn.sign(KEY, 5, GOLDEN)
    assert signed.to_bytes() == SIGNED_BYTES
    assert SignedCheckIn.from_bytes(SIGNED_BYTES) == signed
    assert signed.verifies(KEY)
    assert not signed.verifies(bytes(16))
    cmac = CMAC(AES(KEY))
    cmac.update(SIGNED_BYTES[:-8])  # counter | check-in
    assert cmac.finalize()[:8] == SIGNED_BYTES[-8:]


# -- authentication: a check-in is a check-in once, from the paired kiosk only ----------


def test_a_replayed_checkin_is_a_spoof_alarm_never_a_second_checkin() -> None:
    """The finding: one check-in became three records, sent again under a new event id
    and under an older one. The counter, under the MAC, tells the copies apart."""
    feed = Feed()
    body = signed_body(GOLDEN_BYTES, KEY, 7)
    assert kinds(feed.raw(MSG_CHECKIN, body)) == ["checkin"]
    again = feed.raw(MSG_CHECKIN, body)  # the same bytes, a new event id
    feed.event = 0  # and under event ids going backwards
    backwards = feed.raw(MSG_CHECKIN, body)
    older = feed.checkin(GOLDEN_BYTES, counter=6)  # signed, but an older counter
    for out in (again, backwards, older):
        assert kinds(out) == ["kiosk.spoof"]
        assert out[0].body["reason"] == "replay"
        assert out[0].body["last_counter"] == 7
        assert out[0].device_event is not None  # acknowledged once recorded: not resent
        assert out[0].ledger == ()  # the accepted counter stays 7
    assert again[0].body["counter"] == 7
    assert KIND_PRIORITY["kiosk.spoof"] is Priority.ALARM
    assert feed.drv.stats.checkins == 1
    assert feed.drv.stats.rejected == {"replay": 3}
    assert kinds(feed.checkin(GOLDEN_BYTES, counter=8)) == ["checkin"]


def test_replay_protection_survives_a_gateway_restart() -> None:
    ledger = {counter_key(SERIAL): 7}  # what the store committed before the restart
    feed = Feed(KioskDriver(paired(SERIAL), ledger.get))
    out = feed.checkin(GOLDEN_BYTES, counter=7)
    assert kinds(out) == ["kiosk.spoof"]
    assert (out[0].body["reason"], out[0].body["last_counter"]) == ("replay", 7)


@pytest.mark.parametrize(("name", "key", "drv_kiosks", "reason"), [
    ("wrong key", bytes(16), paired(SERIAL), "bad_mac"),
    ("unpaired kiosk", KEY, {}, "unpaired"),
    ("another kiosk's key", KEY, {SERIAL: PairedKiosk(SERIAL, b"\x01" * 16, 0)}, "bad_mac"),
])
def test_a_forged_checkin_is_a_spoof_alarm(
    name: str, key: bytes, drv_kiosks: dict[str, PairedKiosk], reason: str,
) -> None:
    feed = Feed(KioskDriver(drv_kiosks))
    out = feed.checkin(GOLDEN_BYTES, key=key)
    assert kinds(out) == ["kiosk.spoof"], name
    body = out[0].body
    assert body["reason"] == reason
    assert body["raw"] == signed_body(GOLDEN_BYTES, key, 1).hex()  # the evidence, kept
    assert out[0].device_event == (SERIAL, 1)
    # a forgery does not advance the counter: the genuine check-in 1 is still taken
    if reason == "bad_mac":
        genuine = drv_kiosks[SERIAL].key
        assert kinds(feed.checkin(GOLDEN_BYTES, key=genuine, counter=1)) == ["checkin"]


def test_a_flipped_bit_anywhere_in_a_signed_checkin_is_not_a_checkin() -> None:
    for bit in range(len(SIGNED_BYTES) * 8):
        damaged = bytearray(SIGNED_BYTES)
        damaged[bit // 8] ^= 1 << (bit % 8)
        out = Feed().raw(MSG_CHECKIN, bytes(damaged))
        assert kinds(out) in (["kiosk.spoof"], ["device.error"]), bit


def test_an_unsigned_checkin_of_version_1_is_a_spoof_alarm() -> None:
    out = Feed().raw(MSG_UNSIGNED_CHECKIN, GOLDEN_BYTES)
    assert kinds(out) == ["kiosk.spoof"]
    assert out[0].body == {"reason": "unsigned", "counter": None, "last_counter": None,
                           "msg_type": MSG_UNSIGNED_CHECKIN, "raw": GOLDEN_BYTES.hex(),
                           "dev_event": 1}


def test_golden_status_bytes() -> None:
    status = KioskStatus(FLAG_TAMPER | FLAG_ON_BATTERY | FLAG_PAPER_FAULT, 57)
    assert status.to_bytes() == bytes.fromhex("0d 00  39")
    assert KioskStatus.from_bytes(bytes.fromhex("0d 00  39")) == status
    assert KioskStatus.from_bytes(bytes.fromhex("00 00  ff")) == KioskStatus(0, None)


def test_an_anonymous_abandoned_checkin_round_trips() -> None:
    abandoned = CheckIn("", Method.FACE, 0, Result.ABANDONED, 0, -300)
    raw = abandoned.to_bytes()
    assert raw == bytes.fromhex("02  03  00 00  00 00 00 00  d4 fe  00")
    assert CheckIn.from_bytes(raw) == abandoned
    assert abandoned.kiosk_time_iso is None


# the DATA frames of docs/kiosk.md: (event id, msg_type, body, raw frame, wire bytes)
GOLDEN_FRAMES = [
    (7, MSG_CHECKIN, SIGNED_BYTES,
     "10  03  07 00 00 00  12  05 00 00 00  01 01 cd 03 78 d4 0b 6b 3c 00 08 50 2d 30 30 30 31"
     " 32 33  1d 7f e1 1b fe 03 ea 20  9c 1d a3 d2",
     "04 10 03 07  01  01  03 12 05  01  01  0a 01 01 cd 03 78 d4 0b 6b 3c"
     "  16 08 50 2d 30 30 30 31 32 33 1d 7f e1 1b fe 03 ea 20 9c 1d a3 d2  00"),
    (8, MSG_STATUS, SIGNED_STATUS_BYTES,
     "10  03  08 00 00 00  13  06 00 00 00  0d 00 39  b9 79 22 58 db 4a 56 61  31 2f 4a eb",
     "04 10 03 08  01  01  03 13 06  01  01  02 0d  0e 39 b9 79 22 58 db 4a 56 61 31 2f 4a eb"
     "  00"),
]


@pytest.mark.parametrize(("event_id", "msg_type", "body", "raw", "wire"), GOLDEN_FRAMES,
                         ids=["checkin", "status"])
def test_golden_data_frames_of_the_kiosk_document(
    event_id: int, msg_type: int, body: bytes, raw: str, wire: str
) -> None:
    frame = Frame(FrameType.DATA, 3, Data(event_id, msg_type, body).to_bytes())
    assert frame.to_bytes() == bytes.fromhex(wire)
    assert FrameDecoder().feed(bytes.fromhex(wire)) == [frame]
    assert bytes.fromhex(raw)[2:-4] == frame.payload
    text = (DOCS / "kiosk.md").read_text()
    assert f'raw  = bytes.fromhex("{raw}")' in text
    assert f'wire = bytes.fromhex("{wire}")' in text


def spaced(checkin: bytes) -> str:
    """A CHECKIN body in hex, spaced by field as docs/kiosk.md shows it."""
    cuts = [0, 1, 2, 4, 8, 10, 11, len(checkin)]
    return "  ".join(checkin[a:b].hex(" ") for a, b in itertools.pairwise(cuts) if b > a)


def test_the_kiosk_document_shows_the_bytes_and_records_the_code_makes() -> None:
    text = (DOCS / "kiosk.md").read_text()
    abandoned = CheckIn("", Method.FACE, 0, Result.ABANDONED, 0, -300)
    for checkin in (GOLDEN, abandoned):
        assert f'body = bytes.fromhex("{spaced(checkin.to_bytes())}")' in text
    body = dict(Feed().checkin(GOLDEN_BYTES, counter=5)[0].body, dev_event=7)
    assert json.dumps(body, sort_keys=True) in text
    feed = Feed()
    feed.event, feed.counter = 7, 5
    readings = feed.status(FLAG_TAMPER | FLAG_ON_BATTERY | FLAG_PAPER_FAULT, 57)
    readings += feed.status(FLAG_ON_BATTERY, 55)
    for rec in readings:
        assert f"| `{rec.kind}` | `{json.dumps(rec.body, sort_keys=True)}` |" in text
    for kind in sorted(KIOSK_KINDS):
        assert f"| `{kind}` | {KIND_PRIORITY[kind].label} |" in text


MALFORMED_CHECKINS = {
    "empty": b"",
    "short": GOLDEN_BYTES[:10],
    "person cut short": GOLDEN_BYTES[:-1],
    "trailing byte": GOLDEN_BYTES + b"\x00",
    "method 0": b"\x00" + GOLDEN_BYTES[1:],
    "method 5": b"\x05" + GOLDEN_BYTES[1:],
    "result 9": GOLDEN_BYTES[:1] + b"\x09" + GOLDEN_BYTES[2:],
    "score 1001": GOLDEN_BYTES[:2] + (1001).to_bytes(2, "little") + GOLDEN_BYTES[4:],
    "utc offset +15:00": GOLDEN_BYTES[:8] + (900).to_bytes(2, "little") + GOLDEN_BYTES[10:],
    "person not ascii": GOLDEN_BYTES[:-1] + b"\xe9",
    "space in person": GOLDEN_BYTES[:-1] + b" ",
    "control in person": GOLDEN_BYTES[:-1] + b"\n",
    "person too long": GOLDEN_BYTES[:10] + bytes([33]) + b"P" * 33,
    "match without person": GOLDEN_BYTES[:10] + b"\x00",
}


@pytest.mark.parametrize("raw", MALFORMED_CHECKINS.values(), ids=MALFORMED_CHECKINS.keys())
def test_a_malformed_checkin_is_a_device_error_with_its_raw_bytes(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        CheckIn.from_bytes(raw)
    drv = KioskDriver(paired(SERIAL))
    out = Feed(drv).checkin(raw)
    assert kinds(out) == ["device.error"]
    assert out[0].body == {"error": "malformed", "msg_type": MSG_CHECKIN,
                           "raw": signed_body(raw, KEY, 1).hex(), "dev_event": 1}
    assert out[0].device_event == (SERIAL, 1)  # acknowledged once committed, never dropped
    assert drv.stats.rejected == {"malformed": 1}


@pytest.mark.parametrize("raw", ["", "00 00", "00 00 00 00", "00 00 65", "00 00 fe"])
def test_a_malformed_status_is_a_device_error(raw: str) -> None:
    status = bytes.fromhex(raw)
    with pytest.raises(PayloadError):
        KioskStatus.from_bytes(status)
    signed_part = (1).to_bytes(4, "little") + status
    body = signed_part + status_mac(KEY, signed_part)
    with pytest.raises(PayloadError):
        SignedStatus.from_bytes(body)
    out = Feed().raw(MSG_STATUS, body)
    assert kinds(out) == ["device.error"]
    assert out[0].body["raw"] == body.hex()


def test_an_unknown_message_is_a_device_error() -> None:
    out = Feed().raw(0x42, b"\x01\x02")
    assert kinds(out) == ["device.error"]
    assert out[0].body == {"error": "unknown_message", "msg_type": 0x42, "raw": "0102",
                           "dev_event": 1}
    assert out[0].device_event == (SERIAL, 1)


@pytest.mark.parametrize(("fields", "problem"), [
    ({"person": "P" * (PERSON_MAX + 1)}, "33 characters"),
    ({"person": "Zoë"}, "ASCII"),
    ({"score_permille": -1}, "score"),
    ({"kiosk_time": 1 << 32}, "u32"),
    ({"tz_offset_min": -721}, "UTC offset"),
    ({"person": "", "result": Result.MATCH}, "names the person"),
])
def test_a_checkin_with_bad_values_is_refused_when_built(
    fields: dict[str, object], problem: str
) -> None:
    values: dict[str, object] = {"person": "P-1", "method": Method.PIN, "score_permille": 1000,
                                 "result": Result.MATCH, "kiosk_time": 0, "tz_offset_min": 0}
    values.update(fields)
    with pytest.raises(MessageError, match=problem):
        CheckIn(**values)  # type: ignore[arg-type]


def test_the_person_reference_stays_out_of_reprs_errors_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    person = "SECRET-4711"
    checkin = CheckIn(person, Method.ID_CARD, 990, Result.MATCH, T_KIOSK, 0)
    assert person not in repr(checkin)
    bad = checkin.to_bytes()[:-1] + b"\x01"  # a control character in the reference
    with pytest.raises(CheckinPayloadError) as info:
        CheckIn.from_bytes(bad)
    assert person[:-1] not in str(info.value)
    assert bad.hex(" ")[:20] not in str(info.value)
    assert info.value.raw == bad  # the bytes themselves are kept for the record
    with caplog.at_level(logging.DEBUG, logger="drivers.kiosk"):
        feed = Feed()
        assert kinds(feed.checkin(checkin.to_bytes())) == ["checkin"]
        assert kinds(feed.checkin(bad)) == ["device.error"]
        assert kinds(feed.checkin(checkin.to_bytes(), counter=1)) == ["kiosk.spoof"]
    assert caplog.records  # it did log, at debug
    text = caplog.text
    for secret in (person, person[:-1], person.encode().hex(), person.encode().hex(" ")):
        assert secret not in text


def test_a_checkin_becomes_one_checkin_record() -> None:
    out = Feed().checkin(GOLDEN_BYTES)
    assert kinds(out) == ["checkin"]
    (rec,) = out
    assert rec.body == {
        "person": "P-000123", "method": "fingerprint", "score_permille": 973,
        "result": "match", "kiosk_time": "2026-11-29T07:30:00Z", "tz_offset_min": 60,
        "counter": 1, "dev_event": 1,
    }
    assert rec.device_event == (SERIAL, 1)
    assert rec.ledger == ((counter_key(SERIAL), 1),)  # committed with the record
    assert rec.source.to_json() == {"class": "kiosk", "id": SERIAL, "fw": "2.1.0"}
    anonymous = CheckIn("", Method.FACE, 120, Result.NO_MATCH, 0, 0).to_bytes()
    body = Feed().checkin(anonymous)[0].body
    assert body["person"] is None
    assert body["kiosk_time"] is None


# -- faults and their restores ------------------------------------------------------


def test_the_first_status_reports_every_fault_that_is_set() -> None:
    feed = Feed()
    out = feed.status(FLAG_TAMPER | FLAG_PAPER_FAULT | FLAG_ON_BATTERY, 57)
    assert kinds(out) == ["kiosk.tamper", "kiosk.fault", "kiosk.status"]
    assert transitions(out) == [("kiosk.tamper", None, True), ("kiosk.fault", "paper", True)]
    status = out[-1]
    assert status.body == {
        "tamper": True, "mains_lost": False, "on_battery": True, "paper_fault": True,
        "camera_fault": False, "fingerprint_fault": False, "battery_pct": 57,
        "unknown_flags": 0, "counter": 1, "dev_event": 1,
    }
    assert status.device_event == (SERIAL, 1)
    assert status.ledger == ((flags_key(SERIAL), 0x0D), (counter_key(SERIAL), 1))
    assert all(r.device_event is None for r in out[:-1])


def test_a_clean_first_status_is_only_a_status() -> None:
    assert kinds(Feed().status(0)) == ["kiosk.status"]


def test_each_change_has_its_record_and_each_fault_its_restore() -> None:
    feed = Feed()
    feed.status(0)
    out = feed.status(FLAG_MAINS_LOST | FLAG_ON_BATTERY | FLAG_CAMERA_FAULT)
    assert transitions(out) == [("kiosk.fault", "power", False),
                                ("kiosk.fault", "camera", False)]
    assert kinds(feed.status(FLAG_MAINS_LOST | FLAG_ON_BATTERY | FLAG_CAMERA_FAULT)) == [
        "kiosk.status"]  # no change, no transition
    out = feed.status(FLAG_CAMERA_FAULT | FLAG_FINGERPRINT_FAULT | FLAG_TAMPER)
    assert transitions(out) == [("kiosk.tamper", None, False),
                                ("kiosk.fault_cleared", "power", False),
                                ("kiosk.fault", "fingerprint", False)]
    out = feed.status(0)
    assert transitions(out) == [("kiosk.tamper_cleared", None, False),
                                ("kiosk.fault_cleared", "camera", False),
                                ("kiosk.fault_cleared", "fingerprint", False)]
    assert kinds(out)[-1] == "kiosk.status"


def test_on_battery_alone_is_state_not_a_fault() -> None:
    feed = Feed()
    feed.status(0)
    out = feed.status(FLAG_ON_BATTERY, 40)
    assert kinds(out) == ["kiosk.status"]
    assert out[0].body["on_battery"] is True


def test_after_a_handshake_set_faults_are_reported_again_and_cleared_ones_restored() -> None:
    feed = Feed()
    feed.status(FLAG_PAPER_FAULT | FLAG_CAMERA_FAULT)
    feed.up()  # the link went down and came back: the platform may have missed changes
    out = feed.status(FLAG_PAPER_FAULT)
    assert transitions(out) == [("kiosk.fault", "paper", True),
                                ("kiosk.fault_cleared", "camera", True)]
    assert transitions(feed.status(FLAG_PAPER_FAULT)) == []  # only the first one resyncs


def test_a_restarted_gateway_restores_what_cleared_while_it_was_down() -> None:
    ledger = {flags_key(SERIAL): FLAG_TAMPER | FLAG_PAPER_FAULT}
    feed = Feed(KioskDriver(paired(SERIAL), ledger.get))
    out = feed.status(FLAG_PAPER_FAULT)
    assert transitions(out) == [("kiosk.tamper_cleared", None, True),
                                ("kiosk.fault", "paper", True)]


def test_kiosks_swapped_on_one_port_keep_their_own_state() -> None:
    drv = KioskDriver(paired("KI-A", "KI-B"))
    first, second = Feed(drv, "KI-A"), Feed(drv, "KI-B")
    first.status(FLAG_PAPER_FAULT)
    out = second.status(0)
    assert transitions(out) == []
    assert transitions(first.status(0)) == [("kiosk.fault_cleared", "paper", False)]


def test_unknown_flags_are_kept_in_the_status_and_change_nothing_else() -> None:
    feed = Feed()
    feed.status(0)
    out = feed.status(0x8000 | FLAG_TAMPER, None)
    assert kinds(out) == ["kiosk.tamper", "kiosk.status"]
    assert out[-1].body["unknown_flags"] == 0x8000
    assert out[-1].body["battery_pct"] is None


def test_the_kiosk_kinds_have_their_delivery_classes() -> None:
    assert KIND_PRIORITY["checkin"] is Priority.CHECKIN
    assert KIND_PRIORITY["kiosk.tamper"] is Priority.ALARM
    assert KIND_PRIORITY["kiosk.spoof"] is Priority.ALARM
    others = KIOSK_KINDS - {"checkin", "kiosk.tamper", "kiosk.spoof"}
    assert {KIND_PRIORITY[k] for k in others} == {Priority.STATUS}


def test_kiosk_records_validate_against_the_record_schema() -> None:
    feed = Feed()
    readings = feed.status(FLAG_TAMPER | FLAG_MAINS_LOST) + feed.status(0)
    readings += feed.checkin(GOLDEN_BYTES) + feed.raw(MSG_CHECKIN, b"\x07")
    readings += feed.checkin(GOLDEN_BYTES, counter=1) + feed.checkin(GOLDEN_BYTES, bytes(16))
    assert kinds(readings)[-2:] == ["kiosk.spoof", "kiosk.spoof"]
    chain = Chain()  # records are signed by the session key its key.session certifies
    clock = Clock()
    jsonschema.validate(json.loads(chain.start_session(
        clock.timestamp(time.monotonic_ns())).data), SCHEMA)
    for reading in readings:
        rec = chain.sealer.seal(reading, clock.timestamp(time.monotonic_ns()))
        jsonschema.validate(json.loads(rec.data), SCHEMA)


# -- properties ------------------------------------------------------------------------

persons = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=PERSON_MAX)
checkins = st.tuples(
    persons,
    st.sampled_from(Method),
    st.integers(0, 1000),
    st.sampled_from(Result),
    st.integers(0, 0xFFFFFFFF),
    st.integers(-720, 840),
).filter(lambda t: bool(t[0]) or t[3] is not Result.MATCH).map(lambda t: CheckIn(*t))


@given(checkins)
def test_any_valid_checkin_round_trips_and_becomes_a_checkin_record(checkin: CheckIn) -> None:
    raw = checkin.to_bytes()
    assert CheckIn.from_bytes(raw) == checkin
    out = Feed().checkin(raw)
    assert kinds(out) == ["checkin"]
    assert out[0].body["person"] == (checkin.person or None)
    assert out[0].body["score_permille"] == checkin.score_permille


# garbage, and near misses: the golden check-in and a status with one byte replaced
near_misses = st.builds(
    lambda good, i, b: good[: i % len(good)] + bytes([b]) + good[i % len(good) + 1 :],
    st.sampled_from([GOLDEN_BYTES, SIGNED_STATUS_BYTES]), st.integers(0, 63),
    st.integers(0, 255))


@given(st.sampled_from([MSG_CHECKIN, MSG_UNSIGNED_CHECKIN, MSG_STATUS, MSG_UNSIGNED_STATUS,
                        0x00, 0x01, 0xFF]),
       st.lists(st.binary(max_size=60) | near_misses, min_size=1, max_size=8))
def test_garbage_bodies_never_raise_and_every_message_ends_with_its_event(
    msg_type: int, bodies: list[bytes]
) -> None:
    feed = Feed()
    for body in bodies:
        out = feed.raw(msg_type, body)
        assert out
        assert out[-1].device_event == (SERIAL, feed.event)
        assert all(r.device_event is None for r in out[:-1])
        assert set(kinds(out)) <= KINDS_MADE


@given(st.lists(st.tuples(st.integers(0, 0x3F), st.booleans()), min_size=1, max_size=30))
def test_fault_records_always_pair_up_with_the_state(steps: list[tuple[int, bool]]) -> None:
    """Whatever the sequence of statuses and handshakes, replaying the fault/restore
    records gives the state of the last status, and no restore precedes its fault."""
    feed = Feed()
    active: set[str] = set()
    for flags, handshake in steps:
        if handshake:
            feed.up()
        for rec in feed.status(flags):
            name = rec.body.get("fault", "tamper")
            if rec.kind in ("kiosk.fault", "kiosk.tamper"):
                active.add(name)
            elif rec.kind in ("kiosk.fault_cleared", "kiosk.tamper_cleared"):
                assert name in active
                active.discard(name)
        expected = {name for flag, name in [(FLAG_TAMPER, "tamper"), (FLAG_MAINS_LOST, "power"),
                                            (FLAG_PAPER_FAULT, "paper"),
                                            (FLAG_CAMERA_FAULT, "camera"),
                                            (FLAG_FINGERPRINT_FAULT, "fingerprint")]
                    if flags & flag}
        assert active == expected


# -- the whole path --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("wire", [
    pytest.param(None, id="clean"),
    # damaged and lost bytes both ways: NAKs, retransmissions, lost ACKs, duplicates
    pytest.param(0.004, id="lossy"),
])
def test_every_checkin_arrives_verified_in_order_exactly_once(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, identity: Identity, wire: float | None
) -> None:
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    arrived = platform.arrived

    def faults(seed: int) -> Damage | None:
        return None if wire is None else Damage(bit_error_rate=wire, drop_rate=wire, seed=seed)

    acked = AckedCounter()
    site = Site(tmp_path, identity, client_config(mosquitto, pki, identity.gateway_id),
                on_acked=acked)
    sim = site.kiosk("KI-E2E-0001", to_host=faults(1), from_host=faults(2))
    methods = list(Method)
    n = 40
    try:
        gateway = site.start()
        sent = []
        for i in range(n):
            sent.append(sim.checkin(f"P-{i:06d}", methods[i % 4], 900 + i,
                                    Result.MATCH if i % 5 else Result.NO_MATCH))
            if i == n // 2:
                sim.set_status(tamper=True, paper_fault=True, battery_pct=70)
        sim.set_status(tamper=False)
        sim.replay(0)  # the first check-in again, byte for byte, under a new event id
        forged = sim.forge("P-999999")  # a fresh counter, the wrong key
        tampered = sim.replay_status(0)  # the tamper status again: it must raise nothing
        sim.send_unsigned_status(KioskStatus(FLAG_TAMPER, 70))  # nor this one
        total = n + 6

        def acked_only_after_commit() -> bool:
            acked = sim.acked()
            # the ledger entry is written in the commit, before the ACK leaves
            if acked:
                committed = gateway.writer.last_committed_event("KI-E2E-0001")
                assert committed is not None
                assert committed >= max(acked)
            return len(acked) == total

        wait_for(acked_only_after_commit, 30, "the gateway to ack every kiosk event")
        assert sim.queued() == 0
    finally:
        drained = site.close(drain_s=15)
    assert drained
    published = acked.count
    wait_for(lambda: platform.summary()["received"] >= published, 15, "the verifier")
    platform.stop()

    summary = platform.summary()
    if wire is not None:
        assert sim.to_host.counts  # the wire did damage bytes
        assert sim.from_host.counts
    assert summary["bad_signature"] == summary["chain_gaps"] == 0
    assert summary["received"] == summary["verified"] == published
    got = [r for r in arrived if r.kind == "checkin"]
    assert [r.record["body"]["person"] for r in got] == [c.person for c in sent]
    # one counter for check-ins and statuses: together they count 1, 2, 3... in order
    signed = sorted((r for r in arrived if r.kind in ("checkin", "kiosk.status")),
                    key=lambda r: r.seq)
    assert [r.record["body"]["counter"] for r in signed] == list(range(1, n + 3))
    spoofs = sorted((r for r in arrived if r.kind == "kiosk.spoof"), key=lambda r: r.seq)
    assert [(r.record["body"]["reason"], r.record["body"]["counter"]) for r in spoofs] == [
        ("replay", 1), ("bad_mac", forged.counter), ("replay", tampered.counter),
        ("unsigned", None)]
    assert {r.record["prio"] for r in spoofs} == {"alarm"}
    assert [r.seq for r in got] == sorted(r.seq for r in got)
    assert len({r.record["body"]["dev_event"] for r in got}) == n  # exactly once
    assert {r.record["prio"] for r in got} == {"checkin"}
    assert got[0].record["src"] == {"class": "kiosk", "id": "KI-E2E-0001", "fw": "1.0.0"}
    assert got[0].record["body"]["method"] == "fingerprint"
    kiosk = [r for r in sorted(arrived, key=lambda r: r.seq)
             if r.kind.startswith("kiosk.") and r.kind != "kiosk.spoof"]
    if sim.device.stats.handshakes == 1:  # a second one would re-report the paper fault
        assert [r.kind for r in kiosk] == ["kiosk.tamper", "kiosk.fault", "kiosk.status",
                                           "kiosk.tamper_cleared", "kiosk.status"]
    last = kiosk[-1].record["body"]
    assert (last["tamper"], last["paper_fault"], last["battery_pct"]) == (False, True, 70)


# -- the kiosk's side in C (docs/kiosk.md) -----------------------------------------------

KIOSK_C_HARNESS = r"""
#include <stdio.h>
#include <openssl/evp.h>
#include <openssl/params.h>
void aes_cmac(const uint8_t key[16], const uint8_t *msg, size_t n, uint8_t mac[16])
{
    EVP_MAC *cmac = EVP_MAC_fetch(NULL, "CMAC", NULL);
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(cmac);
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string("cipher", (char *)"AES-128-CBC", 0),
        OSSL_PARAM_construct_end(),
    };
    size_t len = 0;
    EVP_MAC_init(ctx, key, 16, params);
    EVP_MAC_update(ctx, msg, n);
    EVP_MAC_final(ctx, mac, &len, 16);
    EVP_MAC_CTX_free(ctx);
    EVP_MAC_free(cmac);
}
int main(void)
{
    uint8_t key[16], out[64];
    for (int i = 0; i < 16; i++) key[i] = (uint8_t)i;
    size_t n = kiosk_checkin_body(key, 5, 1, 1, 973, 1795937400u, 60, "P-000123", 8, out);
    for (size_t i = 0; i < n; i++) printf("%02x", out[i]);
    printf("\n%zu\n", kiosk_checkin_body(key, 1, 1, 1, 0, 0, 0, "x", 33, out));
    return 0;
}
"""


def run_kiosk_c(tmp_path: Path, harness: str) -> list[str]:
    """Compile docs/kiosk.md's C reference with *harness* (its main) against OpenSSL, run
    it, and return what it printed, split on white space."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not Path("/usr/include/openssl/evp.h").exists():
        pytest.skip("no C compiler or OpenSSL headers on this machine")
    text = (DOCS / "kiosk.md").read_text(encoding="utf-8")
    source = "\n".join(re.findall(r"```c\n(.*?)```", text, re.S)) + harness
    src, exe = tmp_path / "kiosk.c", tmp_path / "kiosk"
    src.write_text(source)
    subprocess.run([compiler, "-std=c99", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    str(src), "-lcrypto"], check=True, capture_output=True, timeout=60)
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True,
                          timeout=30).stdout.split()


def test_the_c_reference_signs_the_golden_checkin(tmp_path: Path) -> None:
    assert run_kiosk_c(tmp_path, KIOSK_C_HARNESS) == [SIGNED_BYTES.hex(), "0"]


# -- pairing, from the installer's command line -------------------------------------------


def test_pair_kiosk_takes_its_key_from_a_file_or_generates_it_never_from_argv(
    tmp_path: Path, identity: Identity, capsys: pytest.CaptureFixture[str],
) -> None:
    import gateway

    key_file = tmp_path / "kiosk.key"
    key_file.write_text(KEY.hex() + "\n")
    ident = str(identity.directory)
    argv = ["provision", "pair-kiosk", "--operator", "Ann Installer",
            "--identity-dir", ident, "--serial", SERIAL,
            "--key-file", str(key_file), "--json"]
    assert gateway.main(argv) == 0
    assert "key" not in json.loads(capsys.readouterr().out)  # the installer has it already
    assert gateway.main(["provision", "pair-kiosk", "--operator", "Ann Installer",
                         "--identity-dir", ident,
                         "--serial", "KI-0002", "--json"]) == 0
    generated = bytes.fromhex(json.loads(capsys.readouterr().out)["key"])  # shown once
    assert gateway.main(["provision", "list-kiosks", "--identity-dir", ident, "--json"]) == 0
    listed = capsys.readouterr().out
    assert {k["serial"] for k in json.loads(listed)["kiosks"]} == {SERIAL, "KI-0002"}
    assert KEY.hex() not in listed
    assert generated.hex() not in listed
    registry = open_kiosks(identity)
    try:
        assert {k.serial: k.key for k in registry} == {SERIAL: KEY, "KI-0002": generated}
    finally:
        registry.close()
    raw = (identity.directory / "kiosks.json").read_text()
    assert KEY.hex() not in raw
    assert generated.hex() not in raw
    with pytest.raises(SystemExit):  # there is no option that takes a key in argv
        gateway.main(["provision", "pair-kiosk", "--operator", "Ann Installer",
                      "--identity-dir", ident, "--serial", "K",
                      "--key", KEY.hex()])
    capsys.readouterr()
    assert gateway.main(["provision", "unpair-kiosk", "--operator", "Ann Installer",
                         "--identity-dir", ident,
                         "--serial", "KI-0002"]) == 0
    assert gateway.main(["provision", "unpair-kiosk", "--operator", "Ann Installer",
                         "--identity-dir", ident,
                         "--serial", "KI-0002"]) == 2  # a clear error, not a traceback


def test_a_kiosk_changing_its_serial_at_every_handshake_does_not_grow_memory() -> None:
    from drivers.kiosk import MAX_KIOSK_STATES

    serials = [f"KI-{n:06d}" for n in range(10 * MAX_KIOSK_STATES)]
    drv = KioskDriver(paired(*serials))
    body = SignedStatus.sign(KEY, 1, KioskStatus(FLAG_TAMPER, 50)).to_bytes()
    for n, serial in enumerate(serials):
        hello = Hello(PROTOCOL_VERSION, DeviceClass.KIOSK, (1, 0, 0), 1, serial)
        out = drv.on_message(Message(serial, n + 1, MSG_STATUS, body), hello, n)
        assert kinds(out)[-1] == "kiosk.status"
    assert len(drv._states) == MAX_KIOSK_STATES


# -- signed statuses: one counter with the check-ins, a status is a status once -------------


def test_golden_signed_status_bytes() -> None:
    status = KioskStatus(FLAG_TAMPER | FLAG_ON_BATTERY | FLAG_PAPER_FAULT, 57)
    signed = SignedStatus.sign(KEY, 6, status)
    assert signed.to_bytes() == SIGNED_STATUS_BYTES
    assert SignedStatus.from_bytes(SIGNED_STATUS_BYTES) == signed
    assert signed.verifies(KEY)
    cmac = CMAC(AES(KEY))
    cmac.update(bytes([MSG_STATUS]) + SIGNED_STATUS_BYTES[:-8])  # domain | counter | status
    assert cmac.finalize()[:8] == SIGNED_STATUS_BYTES[-8:]
    # the MAC a check-in would carry over the same bytes is not a status's
    assert checkin_mac(KEY, SIGNED_STATUS_BYTES[:-8]) != SIGNED_STATUS_BYTES[-8:]
    text = (DOCS / "kiosk.md").read_text()
    assert 'body = bytes.fromhex("06 00 00 00  0d 00 39  b9 79 22 58 db 4a 56 61")' in text


def test_a_replayed_status_clears_nothing_and_is_a_spoof_alarm() -> None:
    feed = Feed()
    feed.status(0)  # counter 1: all clear
    all_clear = SignedStatus.sign(KEY, 1, KioskStatus(0, 80)).to_bytes()
    assert kinds(feed.status(FLAG_TAMPER)) == ["kiosk.tamper", "kiosk.status"]  # counter 2
    for _ in range(2):  # the all-clear again, byte for byte, under new event ids
        out = feed.raw(MSG_STATUS, all_clear)
        assert kinds(out) == ["kiosk.spoof"]
        body = out[0].body
        assert (body["reason"], body["counter"], body["last_counter"]) == ("replay", 1, 2)
        assert (body["msg_type"], body["raw"]) == (MSG_STATUS, all_clear.hex())
        assert out[0].device_event == (SERIAL, feed.event)  # acknowledged once committed
        assert out[0].ledger == ()  # neither the flags nor the counter move
    assert kinds(feed.status(FLAG_TAMPER, counter=2)) == ["kiosk.spoof"]  # nor raises
    # the tamper alarm is still active: the next genuine status changes nothing
    assert kinds(feed.status(FLAG_TAMPER)) == ["kiosk.status"]
    assert kinds(feed.status(0)) == ["kiosk.tamper_cleared", "kiosk.status"]
    assert feed.drv.stats.rejected == {"replay": 3}


@pytest.mark.parametrize(("key", "drv_kiosks", "reason"), [
    (bytes(16), paired(SERIAL), "bad_mac"),
    (KEY, {SERIAL: PairedKiosk(SERIAL, b"\x01" * 16, 0)}, "bad_mac"),  # another kiosk's key
    (KEY, {}, "unpaired"),
], ids=["wrong key", "another kiosk's key", "unpaired kiosk"])
def test_a_forged_status_clears_and_raises_nothing(
    key: bytes, drv_kiosks: dict[str, PairedKiosk], reason: str,
) -> None:
    drv = KioskDriver(drv_kiosks, {flags_key(SERIAL): FLAG_TAMPER}.get)
    feed = Feed(drv)
    for flags in (0, FLAG_PAPER_FAULT):  # clear the tamper alarm, raise a fault
        out = feed.status(flags, key=key)
        assert kinds(out) == ["kiosk.spoof"]
        assert out[0].body["reason"] == reason
        signed = SignedStatus.sign(key, feed.counter, KioskStatus(flags, 80))
        assert out[0].body["raw"] == signed.to_bytes().hex()  # the evidence, kept
        assert out[0].device_event == (SERIAL, feed.event)
        assert out[0].ledger == ()
    assert drv.stats.statuses == 0


def test_a_checkin_mac_never_passes_as_a_status_mac() -> None:
    """Domain separation: the same key, the same bytes, signed as a check-in is signed."""
    signed_part = (1).to_bytes(4, "little") + KioskStatus(0, 80).to_bytes()
    feed = Feed(KioskDriver(paired(SERIAL), {flags_key(SERIAL): FLAG_TAMPER}.get))
    out = feed.raw(MSG_STATUS, signed_part + checkin_mac(KEY, signed_part))
    assert kinds(out) == ["kiosk.spoof"]
    assert out[0].body["reason"] == "bad_mac"


def test_an_unsigned_status_cannot_clear_a_tamper_alarm() -> None:
    feed = Feed()
    assert kinds(feed.status(FLAG_TAMPER)) == ["kiosk.tamper", "kiosk.status"]
    clear = KioskStatus(0, 80).to_bytes()
    out = feed.raw(MSG_UNSIGNED_STATUS, clear)
    assert kinds(out) == ["kiosk.spoof"]
    assert out[0].body == {"reason": "unsigned", "counter": None, "last_counter": 1,
                           "msg_type": MSG_UNSIGNED_STATUS, "raw": clear.hex(),
                           "dev_event": 2}
    assert out[0].device_event == (SERIAL, 2)  # acknowledged, never left unacked
    assert out[0].ledger == ()
    assert kinds(feed.status(FLAG_TAMPER)) == ["kiosk.status"]  # still tampered
    # and a malformed unsigned status is refused just the same, not read
    assert kinds(feed.raw(MSG_UNSIGNED_STATUS, b"\x00")) == ["kiosk.spoof"]


def test_status_replay_protection_survives_a_gateway_restart() -> None:
    ledger = {counter_key(SERIAL): 7, flags_key(SERIAL): FLAG_TAMPER}  # committed before
    feed = Feed(KioskDriver(paired(SERIAL), ledger.get))
    out = feed.status(0, counter=7)
    assert kinds(out) == ["kiosk.spoof"]
    assert (out[0].body["reason"], out[0].body["last_counter"]) == ("replay", 7)
    assert transitions(feed.status(0, counter=8)) == [("kiosk.tamper_cleared", None, True)]


def test_checkins_and_statuses_share_one_counter() -> None:
    feed = Feed()
    assert kinds(feed.checkin(GOLDEN_BYTES)) == ["checkin"]  # 1
    out = feed.status(FLAG_PAPER_FAULT)  # 2
    assert kinds(out) == ["kiosk.fault", "kiosk.status"]
    assert out[-1].ledger == ((flags_key(SERIAL), FLAG_PAPER_FAULT), (counter_key(SERIAL), 2))
    assert kinds(feed.checkin(GOLDEN_BYTES)) == ["checkin"]  # 3
    assert kinds(feed.status(0)) == ["kiosk.fault_cleared", "kiosk.status"]  # 4
    # a counter taken by one kind of message cannot be used by the other
    assert kinds(feed.checkin(GOLDEN_BYTES, counter=4)) == ["kiosk.spoof"]
    assert kinds(feed.status(FLAG_TAMPER, counter=3)) == ["kiosk.spoof"]
    assert kinds(feed.checkin(GOLDEN_BYTES, counter=5)) == ["checkin"]
    assert kinds(feed.status(FLAG_TAMPER, counter=6)) == ["kiosk.tamper", "kiosk.status"]
    assert (feed.drv.stats.checkins, feed.drv.stats.statuses) == (3, 3)


KIOSK_C_STATUS_MAIN = r"""
int main(void)
{
    uint8_t key[16], out[16];
    for (int i = 0; i < 16; i++) key[i] = (uint8_t)i;
    size_t n = kiosk_status_body(key, 6, 0x000d, 57, out);
    for (size_t i = 0; i < n; i++) printf("%02x", out[i]);
    printf("\n");
    return 0;
}
"""


def test_the_c_reference_signs_the_golden_status(tmp_path: Path) -> None:
    harness = KIOSK_C_HARNESS[: KIOSK_C_HARNESS.index("int main")] + KIOSK_C_STATUS_MAIN
    assert run_kiosk_c(tmp_path, harness) == [SIGNED_STATUS_BYTES.hex()]
