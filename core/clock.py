"""Best-available UTC with its provenance (DESIGN.md section 6), and time that cannot be
poisoned.

The kernel says whether NTP has synchronised the system clock (``adjtimex`` returns
``TIME_ERROR`` while it has not); then the system clock is used (``ntp``). Otherwise
a GNSS time the clock accepted disciplines timestamps (``gnss``: the offset between
GNSS UTC and the monotonic clock); otherwise the system clock is used, never below
the floor, and marked ``unsynced``.

The **floor** is the last known good time: the build date, raised by the newest
committed record's time at start (:meth:`Clock.set_floor`), then by every ``ntp`` or
``gnss`` timestamp issued, and carried forward on the monotonic clock (real time can
only have advanced since). GNSS time is refused below it, and a GNSS time more than
:data:`FAR_AHEAD_MS` after it is used only once it held steady over
:data:`STEADY_FAR_NS` of fixes (or agrees with NTP); a jump of a GNSS time already in
use must hold steady over :data:`STEADY_JUMP_NS`. Any disagreeing GNSS time restarts
the wait, so a flapping receiver is never used.

**Steps.** :meth:`Clock.observe` reports a change of source or a jump (a ``time.step``
record), at most one per :data:`STEP_MIN_INTERVAL_NS`; what was held back meanwhile
is summarised in the next step. The store writer asks :meth:`Clock.timestamp` for
every record in seq order; the time it returns never goes below the previous one,
except for the instant of a reported step (the ``time.step`` record itself, stamped
at the step's ``mono_ns``). A reading observed before the previous record's time
(another port's reading queued behind it, or a step not yet reported) carries that
previous time; its own instant stays in the record's ``mono`` and the clamp is
counted in :class:`ClockStats`. Nothing is stamped below the floor but NTP time: the
kernel's synchronised clock is the authority, and a floor above it (raised by a time
that was wrong) is lowered to it at the ``time.step`` record.

Thread-safe: drivers report GNSS time, the health thread observes, the store writer
asks for timestamps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Final

from core.record import Timestamp

log = logging.getLogger(__name__)

TIME_ERROR = 5
#: A GNSS time fix older than this no longer disciplines timestamps, seconds.
GNSS_TIME_MAX_AGE_S = 600.0
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

NS_PER_MS: Final = 1_000_000
NS_PER_S: Final = 1_000_000_000
#: The release date of this software: no true time precedes it (GNSS time before it is
#: a receiver default or a week-rollover bug, and is refused).
BUILD_DATE: Final = dt.date(2026, 11, 29)
BUILD_FLOOR_MS: Final = int(
    dt.datetime.combine(BUILD_DATE, dt.time(), dt.UTC).timestamp()) * 1000
#: GNSS time more than this after the floor is used only once it held steady, ms.
FAR_AHEAD_MS: Final = 86_400_000
#: How long a far-ahead GNSS time must hold steady (on the monotonic clock), ns.
STEADY_FAR_NS: Final = 600 * NS_PER_S
#: How long a new GNSS time replacing one in use must hold steady, ns.
STEADY_JUMP_NS: Final = 60 * NS_PER_S
#: GNSS times whose offsets differ by at most this agree, ms (fix-to-fix jitter).
AGREE_MS: Final = 1000
#: A GNSS time this little below the floor is jitter, not a poisoned time, ms.
FLOOR_SLACK_MS: Final = 1000
#: At most one ``time.step`` (and one adopted GNSS jump) in this long, ns.
STEP_MIN_INTERVAL_NS: Final = 60 * NS_PER_S
#: Reported steps whose record may still go back in time (a writer retrying a failed
#: commit re-stamps them); steps come at most once a minute, so this covers an hour.
MAX_ANNOUNCED_STEPS: Final = 64
#: The store ledger's key for the floor (ms), kept with the records that carry it.
FLOOR_LEDGER_KEY: Final = "clock:floor_ms"
TRUSTED_QUALITIES: Final = frozenset({"ntp", "gnss"})


def kernel_clock_synced() -> bool:
    """True when the kernel reports its clock synchronised (NTP, chrony, PTP)."""
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state: int = _libc.adjtimex(buf)
    return state not in (-1, TIME_ERROR)


#: How often the kernel is asked whether its clock is synchronised, nanoseconds.
SYNC_CHECK_NS = 1_000_000_000
#: A change of the UTC-minus-monotonic offset beyond this is a step, milliseconds.
STEP_THRESHOLD_MS = 1000


class GnssVerdict(enum.Enum):
    """What the clock did with a GNSS time."""

    USED = "used"  # disciplines timestamps (adopted, or confirms the one in use)
    BEFORE_FLOOR = "before_floor"  # earlier than the floor or the build date: refused
    HOLDING = "holding"  # new, not yet steady long enough (or a step too soon): waiting


@dataclass
class ClockStats:
    """Counters (plain integers, read from other threads as they stand)."""

    gnss_used: int = 0
    gnss_adopted: int = 0  # new GNSS times that began to discipline timestamps
    gnss_before_floor: int = 0
    gnss_holding: int = 0
    gnss_unsteady: int = 0  # a waiting GNSS time contradicted: the wait starts again
    steps: int = 0
    steps_damped: int = 0  # changes seen within a minute of the last step, held back
    clamped: int = 0  # records stamped at the previous record's time (see module doc)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The gateway's idea of "now" changed source or jumped (DESIGN.md section 6)."""

    from_quality: str
    to_quality: str
    from_utc_ms: int
    to_utc_ms: int
    mono_ns: int
    #: What happened since the previous step: GNSS times refused or held, changes damped.
    since_last: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Offset:
    offset_ms: int  # utc_ms - mono_ms
    mono_ns: int  # when it was (last) seen


_SUMMARY_FIELDS: Final = ("gnss_before_floor", "gnss_holding", "gnss_unsteady",
                          "steps_damped")


class Clock:
    def __init__(
        self,
        *,
        synced: Callable[[], bool] = kernel_clock_synced,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        floor_ms: int | None = None,
    ) -> None:
        self._synced = synced
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self._lock = threading.Lock()
        self._gnss: _Offset | None = None  # the GNSS time in use
        self._candidate: _Offset | None = None  # a new GNSS time waiting to be steady
        self._adopted_ns: int | None = None  # mono_ns of the last adopted GNSS time
        self._observed: tuple[str, int] | None = None  # (quality, utc_ms - mono_ms)
        self._sync_cache: tuple[int | None, bool] = (None, False)
        self._floor = (BUILD_FLOOR_MS, self._mono_ns())  # (utc_ms, at mono_ns)
        self._last_ms: int | None = None  # the time of the last record stamped
        self._last_step_ns: int | None = None
        self._announced: deque[int] = deque(maxlen=MAX_ANNOUNCED_STEPS)
        self._summary_base = ClockStats()
        self.stats = ClockStats()
        if floor_ms is not None:
            self.set_floor(floor_ms)

    def now_ns(self) -> int:
        """The monotonic time, nanoseconds: the instant every reading is stamped with."""
        return self._mono_ns()

    # -- the floor ---------------------------------------------------------------------
    def set_floor(self, utc_ms: int) -> None:
        """Raise the floor to *utc_ms*, a time known to have passed (the newest committed
        record's time at start). No record is stamped below it from now on."""
        now = self._mono_ns()
        with self._lock:
            self._raise_floor(utc_ms, now)
            if self._last_ms is None or self._last_ms < utc_ms:
                self._last_ms = utc_ms

    def floor_ms(self) -> int:
        """The floor now: the last known good time carried forward to this instant, or
        the time now if it comes from NTP or a GNSS time in use."""
        now = self._mono_ns()
        quality, utc_ms = self._best(now)
        with self._lock:
            if quality in TRUSTED_QUALITIES:
                self._raise_floor(utc_ms, now)
            return self._floor_at(now)

    def _floor_at(self, mono_ns: int) -> int:
        floor_ms, at_ns = self._floor
        return floor_ms + (mono_ns - at_ns) // NS_PER_MS

    def _raise_floor(self, utc_ms: int, mono_ns: int) -> None:
        if utc_ms > self._floor_at(mono_ns):
            self._floor = (utc_ms, mono_ns)

    # -- GNSS time ---------------------------------------------------------------------
    def gnss_time(self, utc_ns: int, mono_ns: int) -> GnssVerdict:
        """A GNSS receiver says it is *utc_ns* at *mono_ns*: use it, refuse it, or wait
        until it has held steady (module docstring)."""
        utc_ms = utc_ns // NS_PER_MS
        offset = _Offset(utc_ms - mono_ns // NS_PER_MS, mono_ns)
        agrees_ntp = self._agrees_with_ntp(utc_ms, mono_ns)
        with self._lock:
            stats = self.stats
            if utc_ms < self._floor_at(mono_ns) - FLOOR_SLACK_MS:
                stats.gnss_before_floor += 1
                self._contradict()
                return GnssVerdict.BEFORE_FLOOR
            cur = self._gnss
            if cur is not None and mono_ns - cur.mono_ns > GNSS_TIME_MAX_AGE_S * NS_PER_S:
                cur = None  # expired: no longer in use
            if cur is not None and abs(offset.offset_ms - cur.offset_ms) <= AGREE_MS:
                self._contradict()  # a new time waiting is interrupted: not steady
                self._gnss = offset
                stats.gnss_used += 1
                return GnssVerdict.USED
            cand = self._candidate
            if cand is None or abs(offset.offset_ms - cand.offset_ms) > AGREE_MS:
                self._contradict()
                cand = self._candidate = offset
            if not agrees_ntp and not self._steady(utc_ms, mono_ns, cand, cur):
                stats.gnss_holding += 1
                return GnssVerdict.HOLDING
            self._gnss, self._candidate, self._adopted_ns = offset, None, mono_ns
            stats.gnss_used += 1
            stats.gnss_adopted += 1
        log.info("clock: GNSS time adopted (%s)", "agrees with NTP" if agrees_ntp else "steady")
        return GnssVerdict.USED

    def _contradict(self) -> None:
        """A GNSS time disagreeing with the one waiting: the wait starts again."""
        if self._candidate is not None:
            self.stats.gnss_unsteady += 1
            self._candidate = None

    def _steady(self, utc_ms: int, mono_ns: int, cand: _Offset, cur: _Offset | None) -> bool:
        """Whether the waiting GNSS time *cand*, seen again at *mono_ns*, may be used."""
        held = mono_ns - cand.mono_ns
        if utc_ms > self._floor_at(mono_ns) + FAR_AHEAD_MS and held < STEADY_FAR_NS:
            return False
        if cur is None:
            return True
        adopted = self._adopted_ns
        return held >= STEADY_JUMP_NS and (
            adopted is None or mono_ns - adopted >= STEP_MIN_INTERVAL_NS)

    def _agrees_with_ntp(self, utc_ms: int, mono_ns: int) -> bool:
        now_mono = self._mono_ns()
        if not self._is_synced(now_mono):
            return False
        wall_ms = (self._wall_ns() - (now_mono - mono_ns)) // NS_PER_MS
        return abs(utc_ms - wall_ms) <= AGREE_MS

    def _is_synced(self, now_mono: int) -> bool:
        """The kernel's sync state, asked at most every :data:`SYNC_CHECK_NS` (the store
        writer stamps thousands of records a second: one syscall each would show)."""
        checked_at, synced = self._sync_cache
        if checked_at is None or now_mono - checked_at >= SYNC_CHECK_NS:
            synced = self._synced()
            self._sync_cache = (now_mono, synced)
        return synced

    # -- timestamps --------------------------------------------------------------------
    def utc_now(self) -> tuple[int, bool]:
        """UTC now (ms) from the best source, and whether that source is trusted (NTP, or a
        GNSS time in use). Nothing is stamped or recorded (the uplink's certificate check)."""
        quality, utc_ms = self._best(self._mono_ns())
        return utc_ms, quality in TRUSTED_QUALITIES

    def source_now(self) -> tuple[str, int]:
        """The best source now (``ntp``, ``gnss``, ``unsynced``) and its UTC, ms; nothing is
        stamped or recorded (``gateway.py status``)."""
        return self._best(self._mono_ns())

    def _best(self, mono_ns: int) -> tuple[str, int]:
        """(quality, utc_ms) of an instant on the monotonic clock, from the best source."""
        with self._lock:
            return self._best_locked(mono_ns)

    def _best_locked(self, mono_ns: int) -> tuple[str, int]:
        """:meth:`_best`, the lock held (:meth:`timestamp` takes it once a record)."""
        now_mono = self._mono_ns()
        wall_ms = (self._wall_ns() - (now_mono - mono_ns)) // NS_PER_MS
        if self._is_synced(now_mono):
            return "ntp", wall_ms
        gnss = self._gnss
        if gnss is not None and now_mono - gnss.mono_ns <= GNSS_TIME_MAX_AGE_S * NS_PER_S:
            return "gnss", mono_ns // NS_PER_MS + gnss.offset_ms
        return "unsynced", max(wall_ms, self._floor_at(mono_ns))

    def timestamp(self, mono_ns: int) -> Timestamp:
        """The UTC of an instant given on the monotonic clock, and its quality. Called in
        seq order by the store writer: never below the previous one but at a step."""
        with self._lock:
            quality, utc_ms = self._best_locked(mono_ns)
            at_step = mono_ns in self._announced
            lowest = self._floor_at(mono_ns)
            if quality == "ntp" and utc_ms < lowest and at_step:
                self._floor = (utc_ms, mono_ns)  # NTP is the authority: the floor was wrong
            if quality in TRUSTED_QUALITIES:
                self._raise_floor(utc_ms, mono_ns)
            if quality == "ntp":
                lowest = utc_ms  # only the order of records holds NTP time back
            last = self._last_ms
            if last is not None and last > lowest and not at_step:
                lowest = last
            if utc_ms < lowest:
                self.stats.clamped += 1
                utc_ms = lowest
            self._last_ms = utc_ms
        return Timestamp(utc_ms, quality, mono_ns // NS_PER_MS)

    # -- steps -------------------------------------------------------------------------
    def observe(self) -> ClockStep | None:
        """Compare the time now with the last observation; a step when it changed source
        or jumped by more than :data:`STEP_THRESHOLD_MS`, at most one per
        :data:`STEP_MIN_INTERVAL_NS` (changes meanwhile are held back and counted). The
        first call only observes."""
        mono_ns = self._mono_ns()
        quality, utc_ms = self._best(mono_ns)
        mono_ms = mono_ns // NS_PER_MS
        offset = utc_ms - mono_ms
        with self._lock:
            before = self._observed
            if before is None:
                self._observed = (quality, offset)
                return None
            old_quality, old_offset = before
            if old_quality == quality and abs(offset - old_offset) <= STEP_THRESHOLD_MS:
                self._observed = (quality, offset)
                return None
            last = self._last_step_ns
            if last is not None and mono_ns - last < STEP_MIN_INTERVAL_NS:
                self.stats.steps_damped += 1
                return None
            self._observed, self._last_step_ns = (quality, offset), mono_ns
            self._announced.append(mono_ns)
            self.stats.steps += 1
            since = self._since_last_step()
        return ClockStep(old_quality, quality, old_offset + mono_ms, utc_ms, mono_ns, since)

    def _since_last_step(self) -> dict[str, int]:
        now, base = self.stats.as_dict(), self._summary_base.as_dict()
        self._summary_base = ClockStats(**now)
        return {k: now[k] - base[k] for k in _SUMMARY_FIELDS}
