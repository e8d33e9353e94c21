"""Ankle-tag receiver: beacons become readings, and faults and their restores (sans-IO).

Message BEACON (msg_type 0x01) body, little-endian (docs/serial-protocol.md):
``tag_id u32 | counter u32 | battery_pct u8 | flags u8 | rssi i8 | mac[8]``.
Flags: bit 0 strap closed, bit 1 body contact. ``mac`` is AES-CMAC under the
tag's pairing key over ``tag_id | counter | battery | flags``, first 8 bytes. The
receiver adds ``rssi`` (the tag does not sign it).

Per beacon of a paired tag the driver checks the MAC and that the rolling
counter moved forward (the last counter is kept in the store's ledger, in the
same transaction as the record, so replay protection survives restarts). A
forged or replayed beacon is rejected and raises a ``tag.spoof`` alarm; a beacon
of an unknown tag is counted and not recorded (a neighbour's tag).

Every fault has its restore, so the current state follows from the stream:
``tag.tamper`` / ``tag.tamper_restored`` (strap opened or body contact lost),
``tag.battery_low`` / ``tag.battery_ok`` (with hysteresis), ``tag.absent`` /
``tag.present`` (not heard for the tag's ``absent_after_s``; present again only
after :data:`PRESENT_AFTER_BEACONS` valid beacons, so a weak signal does not flap).
"""

from __future__ import annotations

import enum
import hmac
import logging
import queue
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from core.devices import PairedTag, tag_ref
from core.record import JSON, Reading, Source
from drivers.mac import MAC_BYTES, device_mac
from firmware_bridge.framed import device_error
from firmware_bridge.link import Message
from firmware_bridge.messages import Hello, PayloadError

log = logging.getLogger(__name__)

MSG_BEACON = 0x01
FLAG_STRAP_CLOSED = 0x01
FLAG_BODY_CONTACT = 0x02
BATTERY_LOW_PCT = 20
BATTERY_OK_PCT = 30
PRESENT_AFTER_BEACONS = 3
#: The records that say where a tag is (not written outside its authorised period).
PRESENCE_KINDS = frozenset({"tag.presence", "tag.present", "tag.absent"})
#: Unpaired tags logged (once each) per window, at most; beyond, they are only counted,
#: so beacons of random ids cost neither memory nor log lines.
MAX_UNKNOWN_LOGGED = 64
UNKNOWN_LOG_WINDOW_S = 3600.0
_BEACON = struct.Struct("<IIBBb")
_SIGNED = struct.Struct("<IIBB")


beacon_mac = device_mac


def counter_key(tag: str) -> str:
    """The ledger key of a tag's last accepted rolling counter."""
    return f"tag:{tag}"


class Rejection(enum.Enum):
    MALFORMED = "malformed"
    UNKNOWN_MESSAGE = "unknown_message"
    UNKNOWN_TAG = "unknown_tag"
    BAD_MAC = "bad_mac"
    REPLAY = "replay"


@dataclass(frozen=True, slots=True)
class Beacon:
    tag_id: int
    counter: int
    battery_pct: int
    flags: int
    rssi_dbm: int
    mac: bytes = b"\x00" * MAC_BYTES

    def signed_part(self) -> bytes:
        return _SIGNED.pack(self.tag_id, self.counter, self.battery_pct, self.flags)

    def to_bytes(self) -> bytes:
        return (
            _BEACON.pack(self.tag_id, self.counter, self.battery_pct, self.flags, self.rssi_dbm)
            + self.mac
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Beacon:
        if len(raw) != _BEACON.size + MAC_BYTES:
            raise PayloadError("BEACON", raw)
        tag_id, counter, battery, flags, rssi = _BEACON.unpack_from(raw)
        if battery > 100:
            raise PayloadError("BEACON", raw)
        return cls(tag_id, counter, battery, flags, rssi, bytes(raw[_BEACON.size :]))

    @property
    def tag(self) -> str:
        return tag_ref(self.tag_id)

    @property
    def strap_closed(self) -> bool:
        return bool(self.flags & FLAG_STRAP_CLOSED)

    @property
    def body_contact(self) -> bool:
        return bool(self.flags & FLAG_BODY_CONTACT)


@dataclass
class _TagState:
    paired: PairedTag
    last_counter: int | None = None
    last_heard_ns: int | None = None
    absent: bool = False
    present_streak: int = 0
    tamper: bool | None = None
    battery_low: bool | None = None
    # what ``gateway.py status`` shows (the last accepted beacon)
    beacon_ns: int | None = None
    rssi_dbm: int | None = None
    beacons: int = 0


@dataclass(frozen=True, slots=True)
class TagView:
    """A paired tag as the driver knows it now (``gateway.py status``)."""

    tag: str
    present: bool | None  # None: no beacon since start, not reported absent either
    beacon_ns: int | None  # monotonic time of the last accepted beacon
    rssi_dbm: int | None
    beacons: int  # accepted since start
    counter: int | None


@dataclass
class TagStats:
    beacons: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    spoof_alarms: int = 0

    def reject(self, why: Rejection) -> None:
        self.rejected[why.value] += 1


#: Told each presence decision: (tag, ``seen`` | ``present`` | ``absent`` | ``beacon`` (heard,
#: still held absent), monotonic ns,
#: RSSI or None); returns whether the tag's presence records may be written (the
#: supervision rules: not outside its authorised period). Never blocks (a port thread).
PresenceHook = Callable[[str, str, int, "int | None"], bool]


class TagReceiverDriver:
    """Turns the receiver's messages into readings; the last reading of a message carries
    the device event, committed together with the others."""

    def __init__(
        self,
        tags: Mapping[str, PairedTag],
        last_counter: Callable[[str], int | None],
        *,
        started_ns: int = 0,
        presence: PresenceHook | None = None,
    ) -> None:
        self._last_counter_of = last_counter
        self._presence = presence
        self._tags = {t.tag: _TagState(t, last_heard_ns=started_ns) for t in tags.values()}
        self._source = Source("tag_receiver", "unknown")
        self._unknown_logged: set[str] = set()  # at most MAX_UNKNOWN_LOGGED per window
        self._unknown_since_ns: int | None = None
        self._unknown_capped = False  # the window's cap was reached (and said so)
        #: Pairings changed while running (the platform's commands), taken on the port's
        #: thread before the next message or tick: (tag, pairing or None to unpair).
        self._changes: queue.SimpleQueue[tuple[str, PairedTag | None]] = queue.SimpleQueue()
        self.stats = TagStats()

    def set_pairing(self, tag: str, paired: PairedTag | None) -> None:
        """Pair *tag* (or give it a new key or absence time, or with None unpair it) from
        the next message on. Any thread (app/commands.py); the port's thread applies it."""
        self._changes.put((tag, paired))

    def _take_changes(self, mono_ns: int) -> None:
        while True:
            try:
                tag, paired = self._changes.get_nowait()
            except queue.Empty:
                return
            if paired is None:
                self._tags.pop(tag, None)
                continue
            state = self._tags.get(tag)
            if state is None:  # absent after its absence time unless heard, as at a start
                self._tags[tag] = _TagState(paired, last_heard_ns=mono_ns)
            else:  # its counter and states go on
                state.paired = paired

    def on_device_up(self, hello: Hello) -> list[Reading]:
        self._source = Source("tag_receiver", hello.serial, hello.firmware_text)
        return []

    def on_message(self, msg: Message, hello: Hello, mono_ns: int) -> list[Reading]:
        self._take_changes(mono_ns)
        self._source = Source("tag_receiver", hello.serial, hello.firmware_text)
        event = (msg.serial, msg.event_id)
        if msg.msg_type != MSG_BEACON:
            self.stats.reject(Rejection.UNKNOWN_MESSAGE)
            return [device_error(self._source, msg, "unknown_message", mono_ns, event)]
        try:
            beacon = Beacon.from_bytes(msg.body)
        except PayloadError:
            self.stats.reject(Rejection.MALFORMED)
            return [device_error(self._source, msg, "malformed", mono_ns, event)]
        self.stats.beacons += 1
        state = self._tags.get(beacon.tag)
        if state is None:
            self.stats.reject(Rejection.UNKNOWN_TAG)
            if self._first_sight(beacon.tag, mono_ns):
                log.info("beacons of an unpaired tag are ignored (counted; its id is personal "
                         "data: --trace-serial shows the raw frames)")
            return []
        why = self._check(state, beacon)
        if why is not None:
            self.stats.reject(why)
            self.stats.spoof_alarms += 1
            body: dict[str, JSON] = {
                "tag": beacon.tag, "reason": why.value, "counter": beacon.counter,
                "last_counter": state.last_counter, "rssi_dbm": beacon.rssi_dbm,
                "dev_event": msg.event_id,
            }
            return [Reading("tag.spoof", self._source, body, mono_ns, event)]
        self.stats.accepted += 1
        state.last_counter = beacon.counter
        state.last_heard_ns = state.beacon_ns = mono_ns
        state.rssi_dbm = beacon.rssi_dbm
        state.beacons += 1
        out = self._transitions(state, beacon, mono_ns)
        presence: dict[str, JSON] = {
            "tag": beacon.tag, "counter": beacon.counter, "battery_pct": beacon.battery_pct,
            "strap_closed": beacon.strap_closed, "body_contact": beacon.body_contact,
            "rssi_dbm": beacon.rssi_dbm, "dev_event": msg.event_id,
        }
        out.append(Reading("tag.presence", self._source, presence, mono_ns, event,
                           ledger=((counter_key(beacon.tag), beacon.counter),)))
        if self._presence is not None:
            came = any(r.kind == "tag.present" for r in out)
            # a beacon while the receiver still holds the tag absent is not "seen" yet
            seen = "present" if came else "beacon" if state.absent else "seen"
            if not self._presence(beacon.tag, seen, mono_ns, beacon.rssi_dbm):
                # outside the tag's authorised period: nothing of its presence is written
                # (the counter and the device's event ride on what is left, if anything)
                out = [r for r in out if r.kind not in PRESENCE_KINDS]
                if out:
                    last = out[-1]
                    out[-1] = Reading(last.kind, last.source, last.body, last.mono_ns, event,
                                      ((counter_key(beacon.tag), beacon.counter),))
        return out

    def tick(self, mono_ns: int) -> list[Reading]:
        self._take_changes(mono_ns)
        out: list[Reading] = []
        for state in self._tags.values():
            heard = state.last_heard_ns
            if state.absent or heard is None:
                continue
            silent_s = (mono_ns - heard) / 1e9
            if silent_s >= state.paired.absent_after_s:
                state.absent = True
                state.present_streak = 0
                if self._presence is not None and not self._presence(
                        state.paired.tag, "absent", mono_ns, None):
                    continue  # outside its authorised period: not written
                out.append(Reading("tag.absent", self._source, {
                    "tag": state.paired.tag, "silent_s": int(silent_s),
                    "last_counter": state.last_counter,
                }, mono_ns))
        return out

    def view(self) -> list[TagView]:
        """The paired tags now (read from another thread: each value as it stands)."""
        out = []
        for state in list(self._tags.values()):
            heard = state.beacon_ns
            present = False if state.absent else (None if heard is None else True)
            out.append(TagView(state.paired.tag, present, heard, state.rssi_dbm,
                               state.beacons, state.last_counter))
        return out

    # -- internals ---------------------------------------------------------------
    def _first_sight(self, tag: str, mono_ns: int) -> bool:
        """Whether this unpaired tag deserves a log line: each once per window, and no
        more than :data:`MAX_UNKNOWN_LOGGED` of them (then one line says so)."""
        since = self._unknown_since_ns
        if since is None or mono_ns - since >= UNKNOWN_LOG_WINDOW_S * 1e9:
            self._unknown_since_ns = mono_ns
            self._unknown_logged.clear()
            self._unknown_capped = False
        if tag in self._unknown_logged or self._unknown_capped:
            return False
        if len(self._unknown_logged) >= MAX_UNKNOWN_LOGGED:
            self._unknown_capped = True
            log.warning("beacons of more than %d unpaired tags within %.0f s: the next "
                        "ones are counted, not logged", MAX_UNKNOWN_LOGGED,
                        UNKNOWN_LOG_WINDOW_S)
            return False
        self._unknown_logged.add(tag)
        return True

    def _check(self, state: _TagState, beacon: Beacon) -> Rejection | None:
        expected = beacon_mac(state.paired.key, beacon.signed_part())
        if not hmac.compare_digest(expected, beacon.mac):
            return Rejection.BAD_MAC
        if state.last_counter is None:
            state.last_counter = self._last_counter_of(counter_key(beacon.tag))
        if state.last_counter is not None and beacon.counter <= state.last_counter:
            return Rejection.REPLAY
        return None

    def _transitions(self, state: _TagState, beacon: Beacon, mono_ns: int) -> list[Reading]:
        out: list[Reading] = []
        tag = beacon.tag
        tamper = not (beacon.strap_closed and beacon.body_contact)
        if tamper != state.tamper and (tamper or state.tamper is not None):
            kind = "tag.tamper" if tamper else "tag.tamper_restored"
            out.append(Reading(kind, self._source, {
                "tag": tag, "strap_closed": beacon.strap_closed,
                "body_contact": beacon.body_contact, "counter": beacon.counter,
            }, mono_ns))
        state.tamper = tamper
        low = state.battery_low
        if beacon.battery_pct <= BATTERY_LOW_PCT and not low:
            out.append(Reading("tag.battery_low", self._source,
                               {"tag": tag, "battery_pct": beacon.battery_pct}, mono_ns))
            state.battery_low = True
        elif beacon.battery_pct >= BATTERY_OK_PCT and low:
            out.append(Reading("tag.battery_ok", self._source,
                               {"tag": tag, "battery_pct": beacon.battery_pct}, mono_ns))
            state.battery_low = False
        elif low is None:
            state.battery_low = beacon.battery_pct <= BATTERY_LOW_PCT
        if state.absent:
            state.present_streak += 1
            if state.present_streak >= PRESENT_AFTER_BEACONS:
                state.absent = False
                out.append(Reading("tag.present", self._source,
                                   {"tag": tag, "counter": beacon.counter}, mono_ns))
        return out
