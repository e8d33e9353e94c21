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

Presence goes out as intervals, not a record per beacon (docs/records.md
``tag.interval``): per paired tag one interval is open from the first accepted
beacon; a beacon that only extends it makes no record, its effect (the interval's
state and the tag's counter) is returned as ledger entries (:class:`LedgerOnly`) that
the store commits without a record. The interval is closed, and returned as a
``tag.interval`` reading, before every transition record of its tag (absent,
present again, tamper, battery, spoof), once older than ``interval_max_s``, when
its tag is unpaired, when the supervision gate stops recording its presence, and at
a clean stop (:meth:`TagReceiverDriver.close_all`). An interval left open by an
unclean stop is sealed at the next start (:func:`recovered_intervals`).

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from core.devices import PairedTag, tag_ref
from core.record import JSON, Reading, Source
from drivers.mac import MAC_BYTES, device_mac
from firmware_bridge.framed import Ledger, LedgerOnly, device_error
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
PRESENCE_KINDS = frozenset({"tag.interval", "tag.presence", "tag.present", "tag.absent"})
#: An open interval is closed once its first beacon is this old (``[tags] interval_max_s``).
DEFAULT_INTERVAL_MAX_S = 300.0
#: Why an interval was closed (its record's ``closed``).
CLOSED_STATE_CHANGE = "state_change"
CLOSED_MAX_AGE = "max_age"
CLOSED_STOP = "stop"
CLOSED_UNPAIRED = "unpaired"
CLOSED_AUTHORISATION = "authorisation"
CLOSED_RECOVERED = "recovered"
#: The open interval's fields, each an integer ledger entry ``tag:<id>:ival:<field>``;
#: ``beacons`` 0 (or no entry) means no interval is open.
IVAL_FIELDS = ("first", "last", "beacons", "rssi_min", "rssi_max", "rssi_sum", "first_ms",
               "last_ms", "battery", "flags", "first_event", "last_event")
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


def interval_key(tag: str, name: str) -> str:
    """The ledger key of one field of *tag*'s open interval (:data:`IVAL_FIELDS`)."""
    return f"{counter_key(tag)}:ival:{name}"


def interval_keys(tag: str) -> tuple[str, ...]:
    return tuple(interval_key(tag, name) for name in IVAL_FIELDS)


@dataclass
class Interval:
    """A tag's open presence interval (every value an integer: it lives in the ledger)."""

    first: int  # rolling counters, inclusive
    last: int
    beacons: int
    rssi_min: int
    rssi_max: int
    rssi_sum: int
    first_ms: int  # gateway monotonic ms of the first and the last beacon
    last_ms: int
    battery: int  # at the last beacon
    flags: int  # FLAG_STRAP_CLOSED | FLAG_BODY_CONTACT at the last beacon
    first_event: int  # the receiver's event ids of the first and the last beacon
    last_event: int

    @classmethod
    def open(cls, first: int, beacon: Beacon, mono_ns: int, event_id: int) -> Interval:
        """An interval from counter *first* (the counter after the previous interval's:
        beacons lost on the radio in between are the new one's) to *beacon*'s."""
        ms = mono_ns // 1_000_000
        return cls(first, beacon.counter, 1, beacon.rssi_dbm, beacon.rssi_dbm,
                   beacon.rssi_dbm, ms, ms, beacon.battery_pct, beacon.flags, event_id,
                   event_id)

    def extend(self, beacon: Beacon, mono_ns: int, event_id: int) -> None:
        self.last = beacon.counter
        self.beacons += 1
        self.rssi_min = min(self.rssi_min, beacon.rssi_dbm)
        self.rssi_max = max(self.rssi_max, beacon.rssi_dbm)
        self.rssi_sum += beacon.rssi_dbm
        self.last_ms = mono_ns // 1_000_000
        self.battery, self.flags = beacon.battery_pct, beacon.flags
        self.last_event = event_id

    def ledger(self, tag: str) -> Ledger:
        return tuple((interval_key(tag, name), getattr(self, name)) for name in IVAL_FIELDS)

    @classmethod
    def from_ledger(cls, tag: str, value: Callable[[str], int | None]) -> Interval | None:
        """The interval the ledger holds open for *tag* (None: none, or entries missing)."""
        values = [value(interval_key(tag, name)) for name in IVAL_FIELDS]
        if any(v is None for v in values):
            return None
        ival = cls(*(int(v) for v in values if v is not None))
        return ival if ival.beacons > 0 else None

    def body(self, tag: str, closed: str) -> dict[str, JSON]:
        return {
            "tag": tag, "first_counter": self.first, "last_counter": self.last,
            "beacons": self.beacons, "first_mono_ms": self.first_ms,
            "last_mono_ms": self.last_ms,
            "rssi_dbm": {"min": self.rssi_min, "max": self.rssi_max,
                         "mean": round(self.rssi_sum / self.beacons)},
            "battery_pct": self.battery, "strap_closed": bool(self.flags & FLAG_STRAP_CLOSED),
            "body_contact": bool(self.flags & FLAG_BODY_CONTACT),
            "dev_events": [self.first_event, self.last_event], "closed": closed,
        }


#: The ledger entry that marks a tag's interval closed (committed with its record).
def _closed_mark(tag: str) -> Ledger:
    return ((interval_key(tag, "beacons"), 0),)


def interval_reading(source: Source, tag: str, ival: Interval, closed: str,
                     mono_ns: int) -> Reading:
    """The ``tag.interval`` record of *ival*; its transaction marks the interval closed."""
    return Reading("tag.interval", source, ival.body(tag, closed), mono_ns,
                   ledger=_closed_mark(tag))


def recovered_intervals(tags: Iterable[str], value: Callable[[str], int | None],
                        source: Source, mono_ns: int) -> list[tuple[Reading, tuple[str, ...]]]:
    """The intervals an unclean stop left open (ledger entries present), as ``tag.interval``
    readings closed ``recovered``, each with the ledger keys to remove in its transaction.
    Their ``*_mono_ms`` are of the boot before."""
    out = []
    for tag in tags:
        ival = Interval.from_ledger(tag, value)
        if ival is not None:
            body = ival.body(tag, CLOSED_RECOVERED)
            out.append((Reading("tag.interval", source, body, mono_ns), interval_keys(tag)))
    return out


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
    interval: Interval | None = None  # the open presence interval
    #: The next interval starts at its first beacon's counter, not after the last one
    #: accepted (a hole the record before it explains: tag.absent).
    fresh: bool = False


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
    intervals: Counter[str] = field(default_factory=Counter)  # closed, by why

    def reject(self, why: Rejection) -> None:
        self.rejected[why.value] += 1


#: Told each presence decision: (tag, ``seen`` | ``present`` | ``absent`` | ``beacon`` (heard,
#: still held absent), monotonic ns,
#: RSSI or None); returns whether the tag's presence records may be written (the
#: supervision rules: not outside its authorised period). Never blocks (a port thread).
PresenceHook = Callable[[str, str, int, "int | None"], bool]


class TagReceiverDriver:
    """Turns the receiver's messages into readings (the last reading of a message carries
    the device event, committed together with the others), or into ledger entries alone
    (:class:`LedgerOnly`: a beacon that only extends its tag's open interval)."""

    def __init__(
        self,
        tags: Mapping[str, PairedTag],
        last_counter: Callable[[str], int | None],
        *,
        started_ns: int = 0,
        presence: PresenceHook | None = None,
        interval_max_s: float = DEFAULT_INTERVAL_MAX_S,
    ) -> None:
        self._last_counter_of = last_counter
        self._presence = presence
        self._interval_max_ns = int(interval_max_s * 1e9)
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

    def _take_changes(self, mono_ns: int) -> list[Reading]:
        """Apply the pairings changed; the intervals of unpaired tags, closed."""
        out: list[Reading] = []
        while True:
            try:
                tag, paired = self._changes.get_nowait()
            except queue.Empty:
                return out
            if paired is None:
                gone = self._tags.pop(tag, None)
                if gone is not None:
                    out += self._close(gone, CLOSED_UNPAIRED, mono_ns)
                continue
            state = self._tags.get(tag)
            if state is None:  # absent after its absence time unless heard, as at a start
                self._tags[tag] = _TagState(paired, last_heard_ns=mono_ns)
            else:  # its counter and states go on
                state.paired = paired

    def on_device_up(self, hello: Hello) -> list[Reading]:
        self._source = Source("tag_receiver", hello.serial, hello.firmware_text)
        return []

    def on_message(self, msg: Message, hello: Hello, mono_ns: int) -> list[Reading] | LedgerOnly:
        changed = self._take_changes(mono_ns)
        self._source = Source("tag_receiver", hello.serial, hello.firmware_text)
        out = self._message(msg, mono_ns)
        if not changed:
            return out
        if isinstance(out, LedgerOnly) or not out:
            # nothing of its own: the unpairings' records carry its event and entries
            last = changed[-1]
            more = out.updates if isinstance(out, LedgerOnly) else ()
            return [*changed[:-1], replace(last, device_event=(msg.serial, msg.event_id),
                                           ledger=last.ledger + more)]
        return changed + out

    def _message(self, msg: Message, mono_ns: int) -> list[Reading] | LedgerOnly:
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
            closed = self._close(state, CLOSED_STATE_CHANGE, mono_ns)
            return [*closed, Reading("tag.spoof", self._source, body, mono_ns, event)]
        self.stats.accepted += 1
        after = state.last_counter  # the counter before (from the ledger after a start)
        state.last_counter = beacon.counter
        state.last_heard_ns = state.beacon_ns = mono_ns
        state.rssi_dbm = beacon.rssi_dbm
        state.beacons += 1
        transitions = self._transitions(state, beacon, mono_ns)
        recorded = True
        if self._presence is not None:
            came = any(r.kind == "tag.present" for r in transitions)
            # a beacon while the receiver still holds the tag absent is not "seen" yet
            seen = "present" if came else "beacon" if state.absent else "seen"
            recorded = self._presence(beacon.tag, seen, mono_ns, beacon.rssi_dbm)
        ledger: Ledger = ((counter_key(beacon.tag), beacon.counter),)
        if recorded:
            ival = state.interval
            if ival is not None and transitions:
                out = self._close(state, CLOSED_STATE_CHANGE, mono_ns)
            elif ival is not None and mono_ns - ival.first_ms * 1_000_000 \
                    >= self._interval_max_ns:
                out = self._close(state, CLOSED_MAX_AGE, mono_ns)
            else:
                out = []
            out += transitions
            if state.interval is None:
                first = beacon.counter if state.fresh or after is None else after + 1
                state.interval = Interval.open(first, beacon, mono_ns, msg.event_id)
                state.fresh = False
            else:
                state.interval.extend(beacon, mono_ns, msg.event_id)
            ledger = state.interval.ledger(beacon.tag) + ledger
        else:
            # outside the tag's authorised period: nothing of its presence is written
            # (the counter and the device's event ride on what is left, if anything)
            out = self._close(state, CLOSED_AUTHORISATION, mono_ns)
            out += [r for r in transitions if r.kind not in PRESENCE_KINDS]
        if not out:
            return LedgerOnly(ledger)
        last = out[-1]
        out[-1] = replace(last, device_event=event, ledger=last.ledger + ledger)
        return out

    def tick(self, mono_ns: int) -> list[Reading]:
        out = self._take_changes(mono_ns)
        for state in self._tags.values():
            heard = state.last_heard_ns
            silent_s = 0.0 if heard is None else (mono_ns - heard) / 1e9
            if state.absent or heard is None or silent_s < state.paired.absent_after_s:
                ival = state.interval
                if ival is not None and \
                        mono_ns - ival.first_ms * 1_000_000 >= self._interval_max_ns:
                    out += self._close(state, CLOSED_MAX_AGE, mono_ns)
            else:
                state.absent = True
                state.present_streak = 0
                state.fresh = True
                if self._presence is not None and not self._presence(
                        state.paired.tag, "absent", mono_ns, None):
                    # outside its authorised period: not written
                    out += self._close(state, CLOSED_AUTHORISATION, mono_ns)
                    continue
                out += self._close(state, CLOSED_STATE_CHANGE, mono_ns)
                out.append(Reading("tag.absent", self._source, {
                    "tag": state.paired.tag, "silent_s": int(silent_s),
                    "last_counter": state.last_counter,
                }, mono_ns))
        return out

    def close_all(self, mono_ns: int) -> list[Reading]:
        """A clean stop: every open interval, closed (``stop``). The daemon submits them
        before its last flush; pairings changed meanwhile are applied first."""
        out = self._take_changes(mono_ns)
        for state in self._tags.values():
            out += self._close(state, CLOSED_STOP, mono_ns)
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
    def _close(self, state: _TagState, why: str, mono_ns: int) -> list[Reading]:
        """The ``tag.interval`` reading of *state*'s open interval, now closed (or none)."""
        ival, state.interval = state.interval, None
        if ival is None:
            return []
        self.stats.intervals[why] += 1
        return [interval_reading(self._source, state.paired.tag, ival, why, mono_ns)]

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
