"""Check-in kiosk: check-ins and status flags become readings (sans-IO; docs/kiosk.md).

Messages travel in DATA frames from a kiosk (device class 2). All integers are
little-endian.

CHECKIN (``msg_type`` 0x12): ``counter u32 | check-in (below) | mac[8]``. ``counter`` is
the kiosk's check-in counter (+1 per check-in, never repeated under one pairing key);
``mac`` the first 8 bytes of AES-CMAC under the kiosk's 16-byte pairing key over
``counter | check-in``. The gateway checks both, like a tag's beacon: a check-in of an
unpaired kiosk, with a wrong MAC, or whose counter does not move forward (a replay,
whatever its event id) becomes a ``kiosk.spoof`` alarm, never a ``checkin``. The
last accepted counter is kept in the store's ledger (``kiosk.counter:<serial>``),
committed with the record. The unsigned check-in of kiosk messages version 1
(``msg_type`` 0x10, the check-in below alone) is a ``kiosk.spoof`` too (``unsigned``).

The check-in, 11 bytes + the person reference::

    offset size field           meaning
    0      1    method          u8: 1 fingerprint, 2 face, 3 id_card, 4 pin
    1      1    result          u8: 1 match, 2 no_match, 3 abandoned, 4 error
    2      2    score_permille  u16: 0..1000 (0.0..100.0 %)
    4      4    kiosk_time      u32: seconds since 1970 UTC by the kiosk's clock; 0 unknown
    8      2    tz_offset_min   i16: the kiosk's UTC offset, -720..+840 minutes
    10     1    person_len      u8: 0..32 (0: nobody identified; not allowed with match)
    11     n    person          ASCII 0x21..0x7E, an opaque reference

Golden example: person ``P-000123``, fingerprint, 97.3 %, match, kiosk time
2026-11-29T07:30:00Z, UTC+01:00::

    01 01 cd03 78d40b6b 3c00 08 502d303030313233

STATUS (``msg_type`` 0x13): ``counter u32 | status (below) | mac[8]``, 15 bytes, signed
like a check-in and under the **same counter**: one counter per kiosk, +1 for each
signed message, check-in or status, so one ledger key (``kiosk.counter:<serial>``)
orders and guards both. Its MAC is AES-CMAC over ``0x13 | counter | status``: the
msg_type byte, under the MAC but not sent, separates the domains, so no check-in's
MAC (over ``counter | check-in``, 15 bytes or more, no prefix) can pass as a status's.
A STATUS that is unpaired, forged or not newer is a ``kiosk.spoof`` like a check-in
and changes no state; so is the unsigned STATUS of version 2 (``msg_type`` 0x11,
``unsigned``).

The status, 3 bytes::

    offset size field        meaning
    0      2    flags        u16: bit 0 tamper, 1 mains power lost, 2 on battery,
                             3 paper fault, 4 camera fault, 5 fingerprint reader fault;
                             bits 6..15 reserved, sent as 0
    2      1    battery_pct  u8: 0..100, 0xFF unknown

Golden example: tamper and paper fault, on battery at 57 %: ``0d00 39``.

The driver keeps, per kiosk serial, the flags it last reported. For each STATUS it
emits one record per flag that changed (``kiosk.tamper`` / ``kiosk.tamper_cleared``
for the tamper switch, ``kiosk.fault`` / ``kiosk.fault_cleared`` naming ``power``,
``paper``, ``camera`` or ``fingerprint``), then always one ``kiosk.status`` with the
whole state, which carries the device event (and, in the store's ledger, the flags:
after a gateway restart the driver compares with what was last committed). The
first STATUS after a handshake (:meth:`KioskDriver.reset`, called from
:meth:`KioskDriver.on_device_up`) reports every flag that is set as a fault again
(``resync`` true), since the platform may have missed the change while the link
was down. ``on_battery`` is a state, not a fault: it appears in ``kiosk.status`` only.

An unknown ``msg_type`` or a malformed body becomes a ``device.error`` record with
the raw bytes: never dropped. A check-in is personal data: the person reference is
never logged (debug logs show only its length), left out of ``repr`` and of the text
of the errors raised here.
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
from datetime import UTC, datetime
from typing import Protocol, Self

from core.devices import PairedKiosk
from core.record import JSON, Reading, Source
from drivers.mac import MAC_BYTES, device_mac
from firmware_bridge.framed import device_error
from firmware_bridge.link import Message
from firmware_bridge.messages import Hello, PayloadError

log = logging.getLogger(__name__)

#: The unsigned check-in of kiosk messages version 1: refused (``kiosk.spoof``, unsigned).
MSG_UNSIGNED_CHECKIN = 0x10
#: The unsigned status of kiosk messages version 2: refused (``kiosk.spoof``, unsigned).
MSG_UNSIGNED_STATUS = 0x11
#: A signed check-in: counter, check-in, MAC.
MSG_CHECKIN = 0x12
#: A signed status: counter, status, MAC (over the domain byte first).
MSG_STATUS = 0x13
#: What a status's MAC covers before its signed part, and a check-in's does not: the
#: message type, so a MAC made for one kind of message never verifies as the other.
STATUS_MAC_DOMAIN = bytes([MSG_STATUS])

#: Bytes of a pairing key (AES-128).
KEY_BYTES = 16

#: Longest person reference, in ASCII characters.
PERSON_MAX = 32
#: Score of a perfect match, in thousandths (100.0 %).
SCORE_MAX_PERMILLE = 1000
#: Real-world UTC offsets: UTC-12:00 to UTC+14:00, in minutes.
TZ_OFFSET_MIN_MIN = -12 * 60
TZ_OFFSET_MIN_MAX = 14 * 60
#: ``kiosk_time`` value of a kiosk whose clock is not set.
KIOSK_TIME_UNKNOWN = 0
#: ``battery_pct`` value of a kiosk that cannot measure its battery.
BATTERY_UNKNOWN = 0xFF

FLAG_TAMPER = 0x0001
FLAG_MAINS_LOST = 0x0002
FLAG_ON_BATTERY = 0x0004
FLAG_PAPER_FAULT = 0x0008
FLAG_CAMERA_FAULT = 0x0010
FLAG_FINGERPRINT_FAULT = 0x0020
KNOWN_FLAGS = 0x003F

#: Flag -> name in the ``kiosk.status`` body (and keyword of ``KioskSim.set_status``).
FLAG_NAMES: dict[int, str] = {
    FLAG_TAMPER: "tamper",
    FLAG_MAINS_LOST: "mains_lost",
    FLAG_ON_BATTERY: "on_battery",
    FLAG_PAPER_FAULT: "paper_fault",
    FLAG_CAMERA_FAULT: "camera_fault",
    FLAG_FINGERPRINT_FAULT: "fingerprint_fault",
}
#: Flags raised as ``kiosk.fault`` / ``kiosk.fault_cleared``, in the order they are reported.
FAULTS: tuple[tuple[int, str], ...] = (
    (FLAG_MAINS_LOST, "power"),
    (FLAG_PAPER_FAULT, "paper"),
    (FLAG_CAMERA_FAULT, "camera"),
    (FLAG_FINGERPRINT_FAULT, "fingerprint"),
)

#: The kinds this driver makes (their delivery classes are in core.kinds, once).
KIOSK_KINDS = frozenset({"checkin", "kiosk.tamper", "kiosk.tamper_cleared", "kiosk.fault",
                         "kiosk.fault_cleared", "kiosk.status", "kiosk.spoof"})

_CHECKIN = struct.Struct("<BBHIhB")
_COUNTER = struct.Struct("<I")
_STATUS = struct.Struct("<HB")
#: Bytes of a signed STATUS body: counter, status, MAC.
SIGNED_STATUS_BYTES = _COUNTER.size + _STATUS.size + MAC_BYTES


class MessageError(ValueError):
    """A kiosk message could not be built (a local error: the caller passed bad values).

    The text never contains the person reference."""


class CheckinPayloadError(PayloadError):
    """A malformed CHECKIN body. Unlike :class:`PayloadError`, its text leaves out the
    bytes, which may hold a person reference; they stay in ``raw``."""

    def __init__(self, raw: bytes, why: str) -> None:
        super().__init__("CHECKIN", raw)
        self.args = (f"malformed CHECKIN payload ({len(raw)} bytes, withheld): {why}",)


class _Labelled(enum.IntEnum):
    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Self:
        try:
            return cls[label.upper()]
        except KeyError:
            names = ", ".join(m.label for m in cls)
            raise MessageError(f"{cls.__name__.lower()} {label!r} is none of: {names}") from None


class Method(_Labelled):
    FINGERPRINT = 1
    FACE = 2
    ID_CARD = 3
    PIN = 4


class Result(_Labelled):
    MATCH = 1
    NO_MATCH = 2
    ABANDONED = 3
    ERROR = 4


def _person_problem(person: str) -> str | None:
    if len(person) > PERSON_MAX:
        return f"person reference of {len(person)} characters (at most {PERSON_MAX})"
    if not all("\x21" <= c <= "\x7e" for c in person):
        return "person reference outside ASCII 0x21..0x7E"
    return None


@dataclass(frozen=True, slots=True)
class CheckIn:
    """One check-in attempt at the kiosk. ``person`` is kept out of ``repr``."""

    person: str = field(repr=False)
    method: Method
    score_permille: int
    result: Result
    kiosk_time: int  # seconds since 1970 UTC by the kiosk's clock; 0 unknown
    tz_offset_min: int

    def __post_init__(self) -> None:
        problem = _person_problem(self.person)
        if problem is None and not self.person and self.result is Result.MATCH:
            problem = "a match names the person"
        if problem is None and not 0 <= self.score_permille <= SCORE_MAX_PERMILLE:
            problem = f"score {self.score_permille} outside 0..{SCORE_MAX_PERMILLE}"
        if problem is None and not 0 <= self.kiosk_time <= 0xFFFFFFFF:
            problem = f"kiosk time {self.kiosk_time} outside u32"
        if problem is None and not TZ_OFFSET_MIN_MIN <= self.tz_offset_min <= TZ_OFFSET_MIN_MAX:
            problem = (f"UTC offset {self.tz_offset_min} min outside "
                       f"{TZ_OFFSET_MIN_MIN}..{TZ_OFFSET_MIN_MAX}")
        if problem is not None:
            raise MessageError(problem)

    def to_bytes(self) -> bytes:
        person = self.person.encode("ascii")
        return _CHECKIN.pack(self.method, self.result, self.score_permille, self.kiosk_time,
                             self.tz_offset_min, len(person)) + person

    @classmethod
    def from_bytes(cls, raw: bytes) -> CheckIn:
        if len(raw) < _CHECKIN.size:
            raise CheckinPayloadError(raw, "shorter than 11 bytes")
        method, result, score, kiosk_time, tz_offset, n = _CHECKIN.unpack_from(raw)
        person = raw[_CHECKIN.size :]
        if len(person) != n:
            raise CheckinPayloadError(raw, f"person_len {n}, {len(person)} bytes follow")
        try:
            return cls(person.decode("ascii"), Method(method), score, Result(result),
                       kiosk_time, tz_offset)
        except UnicodeDecodeError:
            raise CheckinPayloadError(raw, "person reference not ASCII") from None
        except MessageError as exc:
            raise CheckinPayloadError(raw, str(exc)) from None
        except ValueError:  # an enum value out of range
            raise CheckinPayloadError(raw, f"method {method} / result {result}") from None

    @property
    def kiosk_time_iso(self) -> str | None:
        if self.kiosk_time == KIOSK_TIME_UNKNOWN:
            return None
        return datetime.fromtimestamp(self.kiosk_time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


checkin_mac = device_mac


@dataclass(frozen=True, slots=True)
class SignedCheckIn:
    """A CHECKIN as the kiosk signs it: ``counter u32 | check-in | mac[8]``."""

    counter: int
    checkin: CheckIn
    mac: bytes = field(repr=False)

    @classmethod
    def sign(cls, key: bytes, counter: int, checkin: CheckIn) -> SignedCheckIn:
        _check_counter(counter)
        unsigned = cls(counter, checkin, b"")
        return cls(counter, checkin, checkin_mac(key, unsigned.signed_part()))

    def signed_part(self) -> bytes:
        return _COUNTER.pack(self.counter) + self.checkin.to_bytes()

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.mac

    def verifies(self, key: bytes) -> bool:
        return hmac.compare_digest(checkin_mac(key, self.signed_part()), self.mac)

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedCheckIn:
        if len(raw) < _COUNTER.size + _CHECKIN.size + MAC_BYTES:
            raise CheckinPayloadError(raw, "shorter than 23 bytes")
        (counter,) = _COUNTER.unpack_from(raw)
        checkin = CheckIn.from_bytes(raw[_COUNTER.size : -MAC_BYTES])
        return cls(counter, checkin, bytes(raw[-MAC_BYTES:]))


@dataclass(frozen=True, slots=True)
class KioskStatus:
    flags: int
    battery_pct: int | None  # None: unknown (0xFF on the wire)

    def __post_init__(self) -> None:
        if not 0 <= self.flags <= 0xFFFF:
            raise MessageError(f"flags {self.flags:#x} outside u16")
        if self.battery_pct is not None and not 0 <= self.battery_pct <= 100:
            raise MessageError(f"battery {self.battery_pct} % outside 0..100")

    def to_bytes(self) -> bytes:
        battery = BATTERY_UNKNOWN if self.battery_pct is None else self.battery_pct
        return _STATUS.pack(self.flags, battery)

    @classmethod
    def from_bytes(cls, raw: bytes) -> KioskStatus:
        if len(raw) != _STATUS.size:
            raise PayloadError("STATUS", raw)
        flags, battery = _STATUS.unpack(raw)
        if battery > 100 and battery != BATTERY_UNKNOWN:
            raise PayloadError("STATUS", raw)
        return cls(flags, None if battery == BATTERY_UNKNOWN else battery)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def status_mac(key: bytes, signed_part: bytes) -> bytes:
    """The MAC of a signed STATUS: over :data:`STATUS_MAC_DOMAIN`, then *signed_part*."""
    return device_mac(key, STATUS_MAC_DOMAIN + signed_part)


def _check_counter(counter: int) -> None:
    if not 0 <= counter <= 0xFFFFFFFF:
        raise MessageError(f"message counter {counter} outside u32")


@dataclass(frozen=True, slots=True)
class SignedStatus:
    """A STATUS as the kiosk signs it: ``counter u32 | flags u16 | battery u8 | mac[8]``;
    the counter is the one its check-ins use."""

    counter: int
    status: KioskStatus
    mac: bytes = field(repr=False)

    @classmethod
    def sign(cls, key: bytes, counter: int, status: KioskStatus) -> SignedStatus:
        _check_counter(counter)
        unsigned = cls(counter, status, b"")
        return cls(counter, status, status_mac(key, unsigned.signed_part()))

    def signed_part(self) -> bytes:
        return _COUNTER.pack(self.counter) + self.status.to_bytes()

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.mac

    def verifies(self, key: bytes) -> bool:
        return hmac.compare_digest(status_mac(key, self.signed_part()), self.mac)

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedStatus:
        if len(raw) != SIGNED_STATUS_BYTES:
            raise PayloadError("STATUS", raw)
        (counter,) = _COUNTER.unpack_from(raw)
        status = KioskStatus.from_bytes(raw[_COUNTER.size : -MAC_BYTES])
        return cls(counter, status, bytes(raw[-MAC_BYTES:]))


class _Signed(Protocol):
    """A signed kiosk message: its counter, and whether its MAC verifies under a key."""

    @property
    def counter(self) -> int: ...

    def verifies(self, key: bytes, /) -> bool: ...


def flags_key(serial: str) -> str:
    """The ledger key of the flags last committed for a kiosk."""
    return f"kiosk.flags:{serial}"


def counter_key(serial: str) -> str:
    """The ledger key of the counter last accepted from a kiosk (check-in or status)."""
    return f"kiosk.counter:{serial}"


class Spoof(enum.Enum):
    """Why a check-in or a status is not taken as one (the ``reason`` of ``kiosk.spoof``)."""

    UNPAIRED = "unpaired"
    UNSIGNED = "unsigned"
    BAD_MAC = "bad_mac"
    REPLAY = "replay"


def _nothing_known(_key: str) -> int | None:
    return None


@dataclass
class _KioskState:
    reported: int | None  # flags of the last committed kiosk.status; None: never seen
    resync: bool = True  # the next STATUS is the first after a handshake


@dataclass
class KioskStats:
    checkins: int = 0
    spoofs: int = 0
    statuses: int = 0
    transitions: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def reject(self, why: str) -> None:
        self.rejected[why] += 1


#: Kiosks whose reported faults are kept in memory (one port has one kiosk at a time;
#: a device that changes its serial at each handshake must not grow memory).
MAX_KIOSK_STATES = 16


class KioskDriver:
    """Turns a kiosk's messages into readings; the last reading of a message carries
    the device event, committed together with the others.

    *kiosks* are the paired kiosks by serial (their check-in keys). *ledger* looks a key
    up in the store's ledger (``StoreWriter.last_committed_event``), so a restarted
    gateway still knows which faults it had reported and which check-in counter it
    last accepted.
    """

    def __init__(self, kiosks: Mapping[str, PairedKiosk] | None = None,
                 ledger: Callable[[str], int | None] = _nothing_known) -> None:
        self._kiosks = dict(kiosks or {})
        self._last_flags_of = ledger
        # last accepted counter per paired kiosk (bounded by the pairings)
        self._counters: dict[str, int | None] = {}
        self._states: dict[str, _KioskState] = {}
        self._source = Source("kiosk", "unknown")
        #: Pairings changed while running (the platform's commands), taken on the port's
        #: thread before the next message: (serial, pairing or None to unpair).
        self._changes: queue.SimpleQueue[tuple[str, PairedKiosk | None]] = queue.SimpleQueue()
        self.stats = KioskStats()

    def set_pairing(self, serial: str, paired: PairedKiosk | None) -> None:
        """Pair kiosk *serial* (or give it a new key, or with None unpair it) from the next
        message on. Any thread (app/commands.py); the port's thread applies it."""
        self._changes.put((serial, paired))

    def _take_changes(self) -> None:
        while True:
            try:
                serial, paired = self._changes.get_nowait()
            except queue.Empty:
                return
            if paired is None:
                self._kiosks.pop(serial, None)
            else:  # its counter goes on
                self._kiosks[serial] = paired

    def reset(self, serial: str | None = None) -> None:
        """A handshake happened: the next STATUS of *serial* (of every kiosk if None)
        reports each fault that is set, even one already reported."""
        for key, state in self._states.items():
            if serial is None or key == serial:
                state.resync = True

    def on_device_up(self, hello: Hello) -> list[Reading]:
        self._source = Source("kiosk", hello.serial, hello.firmware_text)
        self.reset(hello.serial)
        return []

    def tick(self, mono_ns: int) -> list[Reading]:
        del mono_ns
        return []

    def on_message(self, msg: Message, hello: Hello, mono_ns: int) -> list[Reading]:
        self._take_changes()
        self._source = Source("kiosk", hello.serial, hello.firmware_text)
        event = (msg.serial, msg.event_id)
        if msg.msg_type == MSG_CHECKIN:
            return [self._signed_checkin(msg, mono_ns)]
        if msg.msg_type == MSG_STATUS:
            return self._signed_status(msg, mono_ns)
        if msg.msg_type in (MSG_UNSIGNED_CHECKIN, MSG_UNSIGNED_STATUS):
            return [self._spoof(Spoof.UNSIGNED, msg, None, mono_ns)]
        self.stats.reject("unknown_message")
        log.debug("%s: unknown message type %#04x (%d bytes) recorded raw",
                  msg.serial, msg.msg_type, len(msg.body))
        return [device_error(self._source, msg, "unknown_message", mono_ns, event)]

    # -- internals ---------------------------------------------------------------
    def _malformed(self, msg: Message, exc: PayloadError, mono_ns: int) -> Reading:
        self.stats.reject("malformed")
        log.debug("%s: event %d: %s; recorded raw", msg.serial, msg.event_id, exc)
        return device_error(self._source, msg, "malformed", mono_ns,
                            (msg.serial, msg.event_id))

    def _signed_checkin(self, msg: Message, mono_ns: int) -> Reading:
        try:
            signed = SignedCheckIn.from_bytes(msg.body)
        except PayloadError as exc:
            return self._malformed(msg, exc, mono_ns)
        why = self._check(msg.serial, signed)
        if why is not None:
            return self._spoof(why, msg, signed.counter, mono_ns)
        return self._checkin(signed, msg, mono_ns)

    def _signed_status(self, msg: Message, mono_ns: int) -> list[Reading]:
        try:
            signed = SignedStatus.from_bytes(msg.body)
        except PayloadError as exc:
            return [self._malformed(msg, exc, mono_ns)]
        why = self._check(msg.serial, signed)
        if why is not None:
            return [self._spoof(why, msg, signed.counter, mono_ns)]
        return self._status(signed, msg, mono_ns)

    def _check(self, serial: str, signed: _Signed) -> Spoof | None:
        paired = self._kiosks.get(serial)
        if paired is None:
            return Spoof.UNPAIRED
        if not signed.verifies(paired.key):
            return Spoof.BAD_MAC
        if serial not in self._counters:
            self._counters[serial] = self._last_flags_of(counter_key(serial))
        last = self._counters[serial]
        if last is not None and signed.counter <= last:
            return Spoof.REPLAY
        return None

    def _spoof(self, why: Spoof, msg: Message, counter: int | None, mono_ns: int) -> Reading:
        """Not a check-in or a status: an alarm, which keeps the raw body as evidence (it
        may hold a person reference: a record, never a log line). No state changes."""
        self.stats.spoofs += 1
        self.stats.reject(why.value)
        last = self._counters.get(msg.serial)
        log.warning("%s: event %d: message %#04x refused (%s), counter %s, last accepted %s",
                    msg.serial, msg.event_id, msg.msg_type, why.value, counter, last)
        body: dict[str, JSON] = {
            "reason": why.value, "counter": counter, "last_counter": last,
            "msg_type": msg.msg_type, "raw": msg.body.hex(), "dev_event": msg.event_id,
        }
        return Reading("kiosk.spoof", self._source, body, mono_ns, (msg.serial, msg.event_id))

    def _checkin(self, signed: SignedCheckIn, msg: Message, mono_ns: int) -> Reading:
        checkin = signed.checkin
        self._counters[msg.serial] = signed.counter
        self.stats.checkins += 1
        log.debug("%s: event %d: check-in %s %s, score %d, person <withheld, %d chars>",
                  msg.serial, msg.event_id, checkin.method.label, checkin.result.label,
                  checkin.score_permille, len(checkin.person))
        body: dict[str, JSON] = {
            "person": checkin.person or None,
            "method": checkin.method.label,
            "score_permille": checkin.score_permille,
            "result": checkin.result.label,
            "kiosk_time": checkin.kiosk_time_iso,
            "tz_offset_min": checkin.tz_offset_min,
            "counter": signed.counter,
            "dev_event": msg.event_id,
        }
        return Reading("checkin", self._source, body, mono_ns, (msg.serial, msg.event_id),
                       ledger=((counter_key(msg.serial), signed.counter),))

    def _status(self, signed: SignedStatus, msg: Message, mono_ns: int) -> list[Reading]:
        status = signed.status
        self._counters[msg.serial] = signed.counter
        self.stats.statuses += 1
        state = self._states.get(msg.serial)
        if state is None:
            if len(self._states) >= MAX_KIOSK_STATES:
                # a device chooses its serial: the oldest state goes (the ledger keeps
                # what was reported, so it is rebuilt if that kiosk comes back)
                del self._states[next(iter(self._states))]
            state = self._states[msg.serial] = _KioskState(
                self._last_flags_of(flags_key(msg.serial)))
        before = state.reported or 0
        now = status.flags
        resync = state.resync
        out: list[Reading] = []

        def transition(flag: int, raised: str, cleared: str, extra: dict[str, JSON]) -> None:
            was, is_ = bool(before & flag), bool(now & flag)
            if is_ and (resync or not was):
                kind = raised
            elif was and not is_:
                kind = cleared
            else:
                return
            self.stats.transitions += 1
            log.info("%s: %s %s%s", msg.serial, kind, extra.get("fault", ""),
                     " (after handshake)" if resync else "")
            out.append(Reading(kind, self._source,
                               {**extra, "resync": resync, "dev_event": msg.event_id}, mono_ns))

        transition(FLAG_TAMPER, "kiosk.tamper", "kiosk.tamper_cleared", {})
        for flag, name in FAULTS:
            transition(flag, "kiosk.fault", "kiosk.fault_cleared", {"fault": name})
        body: dict[str, JSON] = {name: status.has(flag) for flag, name in FLAG_NAMES.items()}
        body.update(battery_pct=status.battery_pct, unknown_flags=now & ~KNOWN_FLAGS,
                    counter=signed.counter, dev_event=msg.event_id)
        ledger = ((flags_key(msg.serial), now), (counter_key(msg.serial), signed.counter))
        out.append(Reading("kiosk.status", self._source, body, mono_ns,
                           (msg.serial, msg.event_id), ledger=ledger))
        state.reported = now
        state.resync = False
        return out


__all__ = [
    "FAULTS",
    "FLAG_NAMES",
    "KEY_BYTES",
    "KIOSK_KINDS",
    "MAC_BYTES",
    "MSG_CHECKIN",
    "MSG_STATUS",
    "MSG_UNSIGNED_CHECKIN",
    "MSG_UNSIGNED_STATUS",
    "STATUS_MAC_DOMAIN",
    "CheckIn",
    "CheckinPayloadError",
    "KioskDriver",
    "KioskStatus",
    "MessageError",
    "Method",
    "Result",
    "SignedCheckIn",
    "SignedStatus",
    "Spoof",
    "checkin_mac",
    "counter_key",
    "flags_key",
    "status_mac",
]
