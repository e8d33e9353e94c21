"""NMEA 0183 reader for the gateway's GNSS receiver (sans-IO: no port, no thread, no clock).

Two layers, each with one job:

* :class:`SentenceFramer` delimits sentences in a raw byte stream. It scans for ``$``,
  takes the run of printable ASCII that follows (``$`` and ``*`` excluded) and expects
  ``*hh`` right after it. Whatever precedes a ``$`` (binary UBX frames, ANSI escapes, the
  tail of a cut line) is skipped, so a sentence is recovered wherever it sits: after
  noise on the same line, run together with the previous sentence, split across reads.
  A run cut by a non-printable byte or a line end is a rejected fragment; a run longer
  than ``max_line`` is rejected without being buffered. The framer keeps at most one
  unfinished candidate (never more than ``max_line`` bytes) between calls, and its
  decisions never depend on how the stream was split into reads.
* :class:`NmeaReader` verifies the checksum in one place (the framer), sorts sentences
  by address, hands the decoded types (GGA, RMC, GSA, GSV, VTG, GLL, ZDA) to pynmea2
  for field splitting, and turns GGA/RMC/ZDA into :class:`Fix` and :class:`GnssTime`.
  Proprietary (``$P...``) and other sentence types are counted and skipped.

pynmea2 is used only to split fields by name. Values are read as raw strings and
converted here, because its accessors are unsafe on receiver output: an empty position
reads 0.0/0.0, a field that fails conversion comes back as the raw string, ``datetime``
and ``is_valid`` raise on empty fields, and ``RMC.is_valid`` is False for every NMEA 4.1
u-blox RMC (nav status ``V`` = "not provided"). Coordinates become integers (degrees
x 1e7) with exact rational arithmetic; records carry no floats.

Nothing here raises on input: every byte fed ends up in a sentence, a checksum error,
a counted rejection or ``bytes_skipped`` (line ends aside), or waits in the bounded buffer.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from functools import reduce
from operator import xor
from typing import Any, Final

import pynmea2

log = logging.getLogger(__name__)

# -- framing ------------------------------------------------------------------------
MAX_LINE: Final = 164
"""Longest sentence accepted, bytes from ``$`` to the last checksum digit. NMEA 0183 says
82 with CR LF; high-precision receivers exceed it (91 in the Trimble RTK capture)."""
MIN_MAX_LINE: Final = 16
"""Smallest ``max_line`` a reader accepts: room for a short sentence such as ``$GPHDT,,T*1B``."""
SENTENCE_START: Final = b"$"
CHECKSUM_DELIMITER: Final = 0x2A  # '*'
CHECKSUM_DIGITS: Final = 2
LINE_END_BYTES: Final = b"\r\n"
_BODY_RUN = re.compile(rb"[\x20-\x23\x25-\x29\x2b-\x7e]*")
"""Bytes allowed between ``$`` and ``*``: printable ASCII except ``$`` and ``*``."""
_HEX_DIGITS: Final = frozenset(b"0123456789ABCDEFabcdef")
FRAGMENT_HEAD: Final = 12
"""Bytes of a too-long run kept for the log (less than the shortest ``max_line`` allows)."""

# -- sentences ----------------------------------------------------------------------
KNOWN_TALKERS: Final = frozenset({"GP", "GN", "GL", "GA", "BD", "GB"})
"""GPS, multi-GNSS, GLONASS, Galileo, BeiDou (two spellings). Others are counted and
still decoded when pynmea2 can."""
DECODED_TYPES: Final = frozenset({"GGA", "RMC", "GSA", "GSV", "VTG", "GLL", "ZDA"})
PROPRIETARY_TALKER: Final = "P"
_TALKER_ADDRESS = re.compile(r"[A-Z][A-Z0-9][A-Z][A-Z0-9]{2}")
_PROPRIETARY_ADDRESS = re.compile(r"P[A-Z][A-Z0-9]*")
#: Distinct sentence types (and talkers) counted by name; the wire chooses them, so more
#: are counted together under :data:`OTHER_KEY`.
MAX_COUNTED_KEYS = 64
OTHER_KEY = "other"


def _bounded_key(counter: Counter[str], key: str) -> str:
    return key if key in counter or len(counter) < MAX_COUNTED_KEYS else OTHER_KEY

FIX_QUALITIES: Final = frozenset({1, 2, 3, 4, 5, 6})
"""GGA quality giving a fix: GPS, DGPS, PPS, RTK fixed, RTK float, dead reckoning.
7 (manual input) and 8 (simulator) are positions the receiver did not measure."""
RMC_VALID_STATUS: Final = "A"
RMC_FIX_QUALITY: Final = 1
RMC_NO_FIX_MODES: Final = frozenset({"N", "M", "S"})
"""NMEA 2.3+ RMC mode indicator: not valid, manual input, simulator."""
ALTITUDE_UNIT: Final = "M"
E7: Final = 10_000_000
MAX_LAT_E7: Final = 90 * E7
MAX_LON_E7: Final = 180 * E7
MINUTES_PER_DEGREE: Final = 60
CENTURY_PIVOT_YY: Final = 80
"""RMC two-digit years: 80-99 are 1980-1999 (GPS began 1980), 00-79 are 2000-2079."""
MIN_PLAUSIBLE_YEAR: Final = 2000
"""Dates before this are receiver defaults (no time yet) or week-rollover bugs: never trusted."""
MAX_PLAUSIBLE_YEAR: Final = 2099
"""Dates after this are corrupt (ZDA year 9999). Whether a date in range is true is the
clock's call (core.clock: the floor and the steady-fix rule), not the reader's."""
MIN_ALT_DM: Final = -10_000
"""Lowest altitude accepted, decimetres (-1000 m: below any place a gateway is installed)."""
MAX_ALT_DM: Final = 100_000
"""Highest altitude accepted, decimetres (10 km)."""
MAX_HDOP_C: Final = 9_999
"""Highest HDOP x 100 accepted (99.99, the field's usual "unknown")."""
MAX_SATS: Final = 99
"""Most satellites in use accepted (the field has two digits)."""

_COORD = re.compile(r"(\d{1,3})(\d\d(?:\.\d*)?)")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_TIME_OF_DAY = re.compile(r"(\d\d)(\d\d)(\d\d)(?:\.(\d*))?")
_DDMMYY = re.compile(r"(\d\d)(\d\d)(\d\d)")
_UNSIGNED = re.compile(r"\d{1,9}")
_MICRO_DIGITS = 6
LAST_HOUR: Final = 23
LAST_MINUTE: Final = 59
LAST_SECOND: Final = 59  # a leap second (60) has no datetime; such a time is dropped

_PYNMEA2_ERRORS = (ValueError, IndexError, KeyError, TypeError)
"""What ``pynmea2.parse`` raises on malformed input: ``ParseError`` (a ValueError) for a bad
address, IndexError/KeyError from proprietary subclasses on very short sentences."""

# -- fields out of range (counted in ``NmeaStats.out_of_range``) ---------------------
FIELD_DATE: Final = "date"
FIELD_ALT: Final = "alt"
FIELD_HDOP: Final = "hdop"
FIELD_SATS: Final = "sats"

# -- rejection reasons ----------------------------------------------------------------
NO_CHECKSUM: Final = "no_checksum"
"""A ``$`` run cut by a line end, a non-printable byte or the next ``$``."""
TOO_LONG: Final = "too_long"
BAD_CHECKSUM_FIELD: Final = "bad_checksum_field"
BAD_ADDRESS: Final = "bad_address"
UNPARSABLE: Final = "unparsable"


# -- frames (framer output) -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sentence:
    """A sentence whose checksum matched; ``body`` is the text between ``$`` and ``*``."""

    body: str


@dataclass(frozen=True, slots=True)
class ChecksumMismatch:
    body: str
    stated: int
    computed: int


@dataclass(frozen=True, slots=True)
class Fragment:
    """Bytes that began with ``$`` but are not a checksummed sentence."""

    reason: str
    head: bytes  # the first bytes of the fragment, for logs


Frame = Sentence | ChecksumMismatch | Fragment


# -- reader output ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Fix:
    """A position fix; never invented."""

    lat_e7: int  # degrees * 1e7, WGS84, integer (records carry no floats)
    lon_e7: int
    quality: int  # GGA fix quality (1 gps, 2 dgps, 4 rtk fixed, ...); for RMC status A use 1
    sats: int | None
    hdop_c: int | None  # HDOP * 100
    alt_dm: int | None  # altitude above MSL in decimetres
    utc: datetime | None  # tz-aware UTC when the sentence and a known date give it
    sentence: str  # e.g. "GNGGA"
    mono_ns: int


@dataclass(frozen=True, slots=True)
class GnssTime:
    """Trusted UTC: from RMC status A (date + time) or ZDA."""

    utc: datetime
    mono_ns: int
    source: str  # sentence type, e.g. "RMC"


Event = Fix | GnssTime


@dataclass(slots=True)
class NmeaStats:
    sentences_ok: int = 0
    """Checksummed sentences accepted: decoded, or counted and skipped (other types,
    proprietary). Equals ``sum(by_type.values())`` and ``sum(by_talker.values())``."""
    checksum_errors: int = 0
    rejected: int = 0
    """Fragments without a usable checksum, and checksummed sentences that could not be
    parsed; split by reason in ``rejected_by_reason``."""
    fixes: int = 0
    times: int = 0
    skipped_types: int = 0
    """Part of ``sentences_ok``: proprietary and undecoded types, counted and skipped."""
    invalid_fixes: int = 0
    """GGA/RMC claiming a fix without a usable position (empty, malformed, out of range)."""
    by_type: Counter[str] = field(default_factory=Counter)
    by_talker: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    bytes_skipped: int = 0
    """Bytes outside any ``$`` run, line ends excepted (binary frames, noise)."""
    out_of_range: Counter[str] = field(default_factory=Counter)
    """Numeric fields present but out of range, by field (``date``, ``alt``, ``hdop``,
    ``sats``): a date gives no time, another field is left out of the fix (None)."""


def _run_end(buf: bytes, pos: int) -> int:
    """End of the run of sentence-body bytes starting at ``pos``."""
    match = _BODY_RUN.match(buf, pos)
    return match.end() if match else pos


def nmea_checksum(body: bytes) -> int:
    """XOR of the bytes between ``$`` and ``*``."""
    return reduce(xor, body, 0)


class SentenceFramer:
    """Delimits ``$...*hh`` sentences in a byte stream; see the module docstring."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < MIN_MAX_LINE:
            raise ValueError(f"max_line must be at least {MIN_MAX_LINE}, got {max_line}")
        self.max_line = max_line
        self._max_run = max_line - 1 - CHECKSUM_DIGITS  # '$' + body, without '*hh'
        self._pending = b""  # an unfinished candidate, starting with '$'
        self._discarding = False  # inside a too-long run already rejected
        self.bytes_skipped = 0

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        buf = self._pending + bytes(data) if self._pending else bytes(data)
        self._pending = b""
        end = len(buf)
        pos = 0
        if self._discarding:
            pos = _run_end(buf, 0)
            if pos == end:
                return frames
            self._discarding = False
        while pos < end:
            start = buf.find(SENTENCE_START, pos)
            if start < 0:
                self._skip(buf, pos, end)
                break
            self._skip(buf, pos, start)
            run_end = _run_end(buf, start + 1)
            if run_end - start > self._max_run:
                frames.append(Fragment(TOO_LONG, buf[start : start + FRAGMENT_HEAD]))
                if run_end == end:
                    self._discarding = True
                    break
                pos = run_end
                continue
            if run_end == end:
                self._pending = buf[start:]
                break
            if buf[run_end] != CHECKSUM_DELIMITER:
                if run_end == start + 1:  # a lone '$' inside binary data: noise
                    self.bytes_skipped += 1
                else:
                    frames.append(Fragment(NO_CHECKSUM, buf[start:run_end]))
                pos = run_end
                continue
            digits_end = run_end + 1 + CHECKSUM_DIGITS
            if digits_end > end:
                self._pending = buf[start:]
                break
            digits = buf[run_end + 1 : digits_end]
            if not (digits[0] in _HEX_DIGITS and digits[1] in _HEX_DIGITS):
                frames.append(Fragment(BAD_CHECKSUM_FIELD, buf[start : run_end + 1]))
                pos = run_end + 1
                continue
            body = buf[start + 1 : run_end]
            stated = int(digits, 16)
            computed = nmea_checksum(body)
            text = body.decode("ascii")
            if stated == computed:
                frames.append(Sentence(text))
            else:
                frames.append(ChecksumMismatch(text, stated, computed))
            pos = digits_end
        return frames

    def _skip(self, buf: bytes, start: int, stop: int) -> None:
        if stop > start:
            noise = buf[start:stop]
            self.bytes_skipped += len(noise) - sum(noise.count(b) for b in LINE_END_BYTES)


class NmeaReader:
    """Bytes in, :class:`Fix` and :class:`GnssTime` out; counts everything in ``stats``."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._framer = SentenceFramer(max_line)
        self.stats = NmeaStats()
        self._trusted: tuple[datetime, int] | None = None  # last trusted UTC, its mono_ns

    @property
    def max_line(self) -> int:
        return self._framer.max_line

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished sentence; never more than ``max_line``."""
        return self._framer.buffered

    def feed(self, data: bytes, mono_ns: int) -> list[Fix | GnssTime]:
        events: list[Event] = []
        stats = self.stats
        for frame in self._framer.feed(data):
            if isinstance(frame, Sentence):
                self._on_sentence(frame.body, mono_ns, events)
            elif isinstance(frame, ChecksumMismatch):
                stats.checksum_errors += 1
                log.debug("nmea: checksum %02X != %02X in %r", frame.stated, frame.computed,
                          frame.body[:40])
            else:
                self._reject(frame.reason, frame.head)
        stats.bytes_skipped = self._framer.bytes_skipped
        return events

    # -- sentences -----------------------------------------------------------------------
    def _reject(self, reason: str, head: bytes | str) -> None:
        stats = self.stats
        stats.rejected += 1
        stats.rejected_by_reason[reason] += 1
        log.debug("nmea: rejected (%s): %r", reason, head[:40])

    def _count(self, talker: str, kind: str) -> None:
        stats = self.stats
        stats.sentences_ok += 1
        stats.by_type[_bounded_key(stats.by_type, kind)] += 1
        stats.by_talker[_bounded_key(stats.by_talker, talker)] += 1

    def _on_sentence(self, body: str, mono_ns: int, events: list[Event]) -> None:
        address = body.partition(",")[0]
        if _PROPRIETARY_ADDRESS.fullmatch(address):
            self._count(PROPRIETARY_TALKER, address)
            self.stats.skipped_types += 1
            return
        if not _TALKER_ADDRESS.fullmatch(address):
            self._reject(BAD_ADDRESS, body)
            return
        talker, kind = address[:2], address[2:]
        if kind not in DECODED_TYPES:
            self._count(talker, kind)
            self.stats.skipped_types += 1
            return
        try:
            msg = pynmea2.parse(body)
        except _PYNMEA2_ERRORS:
            self._reject(UNPARSABLE, body)
            return
        self._count(talker, kind)
        if kind == "GGA":
            self._on_gga(msg, address, mono_ns, events)
        elif kind == "RMC":
            self._on_rmc(msg, address, mono_ns, events)
        elif kind == "ZDA":
            self._on_zda(msg, address, mono_ns, events)

    def _on_gga(self, msg: Any, address: str, mono_ns: int, events: list[Event]) -> None:
        quality = _parse_unsigned(_raw(msg, "gps_qual"))
        if quality is None or quality not in FIX_QUALITIES:
            return
        position = _parse_position(
            _raw(msg, "lat"), _raw(msg, "lat_dir"), _raw(msg, "lon"), _raw(msg, "lon_dir")
        )
        if position is None:
            self.stats.invalid_fixes += 1
            return
        alt_dm = None
        if _raw(msg, "altitude_units") == ALTITUDE_UNIT:
            alt_dm = self._in_range(FIELD_ALT, _parse_scaled(_raw(msg, "altitude"), 1),
                                    MIN_ALT_DM, MAX_ALT_DM)
        tod = _parse_time_of_day(_raw(msg, "timestamp"))
        fix = Fix(
            lat_e7=position[0],
            lon_e7=position[1],
            quality=quality,
            sats=self._in_range(FIELD_SATS, _parse_unsigned(_raw(msg, "num_sats")), 0,
                                MAX_SATS),
            hdop_c=self._in_range(FIELD_HDOP, _parse_scaled(_raw(msg, "horizontal_dil"), 2),
                                  0, MAX_HDOP_C),
            alt_dm=alt_dm,
            utc=self._utc_on_known_date(tod, mono_ns),
            sentence=address,
            mono_ns=mono_ns,
        )
        self._emit_fix(fix, events)

    def _on_rmc(self, msg: Any, address: str, mono_ns: int, events: list[Event]) -> None:
        status, mode = _raw(msg, "status"), _raw(msg, "mode_indicator")
        if status != RMC_VALID_STATUS or mode in RMC_NO_FIX_MODES:
            return
        tod = _parse_time_of_day(_raw(msg, "timestamp"))
        day = self._date(_parse_ddmmyy(_raw(msg, "datestamp")))
        utc: datetime | None
        if tod is not None and day is not None:
            utc = datetime.combine(day, tod)
            self._emit_time(GnssTime(utc, mono_ns, "RMC"), events)
        else:
            utc = self._utc_on_known_date(tod, mono_ns)
        position = _parse_position(
            _raw(msg, "lat"), _raw(msg, "lat_dir"), _raw(msg, "lon"), _raw(msg, "lon_dir")
        )
        if position is None:
            self.stats.invalid_fixes += 1
            return
        fix = Fix(position[0], position[1], RMC_FIX_QUALITY, None, None, None, utc, address,
                  mono_ns)
        self._emit_fix(fix, events)

    def _on_zda(self, msg: Any, address: str, mono_ns: int, events: list[Event]) -> None:
        del address
        tod = _parse_time_of_day(_raw(msg, "timestamp"))
        year = _parse_unsigned(_raw(msg, "year"))
        month = _parse_unsigned(_raw(msg, "month"))
        day = _parse_unsigned(_raw(msg, "day"))
        if tod is None or year is None or month is None or day is None:
            return
        when = self._date((year, month, day))
        if when is not None:
            self._emit_time(GnssTime(datetime.combine(when, tod), mono_ns, "ZDA"), events)

    # -- range checks --------------------------------------------------------------------
    def _in_range(self, name: str, value: int | None, lowest: int, highest: int) -> int | None:
        """*value* if within [lowest, highest]; None (counted) if out of range."""
        if value is None or lowest <= value <= highest:
            return value
        self.stats.out_of_range[name] += 1
        log.debug("nmea: %s out of range", name)  # the value may be a position's part
        return None

    def _date(self, ymd: tuple[int, int, int] | None) -> date | None:
        """The date of (year, month, day), None (counted) when it is no plausible date."""
        if ymd is None:
            return None
        when = _make_date(*ymd)
        if when is None:
            self.stats.out_of_range[FIELD_DATE] += 1
            log.debug("nmea: date %04d-%02d-%02d out of range", *ymd)
        return when

    # -- output --------------------------------------------------------------------------
    def _emit_fix(self, fix: Fix, events: list[Event]) -> None:
        self.stats.fixes += 1
        events.append(fix)

    def _emit_time(self, t: GnssTime, events: list[Event]) -> None:
        self.stats.times += 1
        self._trusted = (t.utc, t.mono_ns)
        events.append(t)

    def _utc_on_known_date(self, tod: time | None, mono_ns: int) -> datetime | None:
        """UTC for a time of day, on the date of the last trusted time.

        The day is the one (of yesterday, today, tomorrow) that puts the result nearest
        to where the last trusted time has moved by ``mono_ns``, so a GGA at 00:00:01
        after an RMC at 23:59:59 lands on the next day.
        """
        if tod is None or self._trusted is None:
            return None
        trusted_utc, trusted_mono = self._trusted
        expected = trusted_utc + timedelta(microseconds=(mono_ns - trusted_mono) // 1000)
        candidates = [
            datetime.combine(expected.date() + timedelta(days=d), tod) for d in (-1, 0, 1)
        ]
        return min(candidates, key=lambda c: abs(c - expected))


# -- field conversion (raw strings in, None when empty or malformed) --------------------------
def _raw(msg: Any, name: str) -> str:
    """The raw text of a named field, '' when the sentence is too short to have it."""
    index = type(msg).name_to_idx.get(name)
    data = msg.data
    if index is None or index >= len(data):
        return ""
    value = data[index]
    return value if isinstance(value, str) else ""


def _parse_unsigned(text: str) -> int | None:
    return int(text) if _UNSIGNED.fullmatch(text) else None


def _parse_scaled(text: str, decimals: int) -> int | None:
    """``"1127.7"`` with 1 decimal -> 11277 (rounded half to even)."""
    if not _DECIMAL.fullmatch(text):
        return None
    scale: int = 10**decimals
    return round(Fraction(text) * scale)


def _parse_coordinate(text: str, max_degrees: int) -> Fraction | None:
    match = _COORD.fullmatch(text)
    if match is None:
        return None
    degrees = int(match[1])
    minutes = Fraction(match[2])
    if degrees > max_degrees or minutes >= MINUTES_PER_DEGREE:
        return None
    return degrees + minutes / MINUTES_PER_DEGREE


def _parse_position(lat: str, lat_dir: str, lon: str, lon_dir: str) -> tuple[int, int] | None:
    """Integer (lat_e7, lon_e7), or None unless all four fields are present and in range.

    0/0 exactly is refused: receivers print it for "no position", never as a measurement
    of a gateway installed in a home.
    """
    if lat_dir not in ("N", "S") or lon_dir not in ("E", "W"):
        return None
    lat_deg = _parse_coordinate(lat, 90)
    lon_deg = _parse_coordinate(lon, 180)
    if lat_deg is None or lon_deg is None:
        return None
    lat_e7 = round(lat_deg * E7) * (-1 if lat_dir == "S" else 1)
    lon_e7 = round(lon_deg * E7) * (-1 if lon_dir == "W" else 1)
    if abs(lat_e7) > MAX_LAT_E7 or abs(lon_e7) > MAX_LON_E7 or (lat_e7 == 0 and lon_e7 == 0):
        return None
    return lat_e7, lon_e7


def _parse_time_of_day(text: str) -> time | None:
    """``hhmmss[.s...]`` -> a UTC time; None for empty or out-of-range (leap second 60)."""
    match = _TIME_OF_DAY.fullmatch(text)
    if match is None:
        return None
    hour, minute, second = int(match[1]), int(match[2]), int(match[3])
    fraction = (match[4] or "")[:_MICRO_DIGITS].ljust(_MICRO_DIGITS, "0")
    if hour > LAST_HOUR or minute > LAST_MINUTE or second > LAST_SECOND:
        return None
    return time(hour, minute, second, int(fraction), tzinfo=UTC)


def _parse_ddmmyy(text: str) -> tuple[int, int, int] | None:
    """``ddmmyy`` -> (year, month, day), not yet checked; None when not six digits."""
    match = _DDMMYY.fullmatch(text)
    if match is None:
        return None
    yy = int(match[3])
    year = (1900 if yy >= CENTURY_PIVOT_YY else 2000) + yy
    return year, int(match[2]), int(match[1])


def _make_date(year: int, month: int, day: int) -> date | None:
    if not MIN_PLAUSIBLE_YEAR <= year <= MAX_PLAUSIBLE_YEAR:
        return None
    try:
        return date(year, month, day)
    except ValueError:  # month 13, 31 April, year 10000, ...
        return None
