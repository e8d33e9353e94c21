"""Best-available UTC with its provenance (DESIGN.md section 6).

The kernel says whether NTP has synchronised the system clock (``adjtimex``
returns ``TIME_ERROR`` while it has not). Without NTP, a recent GNSS time fix
disciplines timestamps: we keep the offset between GNSS UTC and the monotonic
clock. Otherwise the system clock is used and marked ``unsynced``.

Thread-safe: drivers report GNSS time, the store writer asks for timestamps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.record import Timestamp

TIME_ERROR = 5
#: A GNSS time fix older than this no longer disciplines timestamps, seconds.
GNSS_TIME_MAX_AGE_S = 600.0
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def kernel_clock_synced() -> bool:
    """True when the kernel reports its clock synchronised (NTP, chrony, PTP)."""
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state: int = _libc.adjtimex(buf)
    return state not in (-1, TIME_ERROR)


#: How often the kernel is asked whether its clock is synchronised, nanoseconds.
SYNC_CHECK_NS = 1_000_000_000
#: A change of the UTC-minus-monotonic offset beyond this is a step, milliseconds.
STEP_THRESHOLD_MS = 1000


@dataclass(frozen=True, slots=True)
class ClockStep:
    """The gateway's idea of "now" changed source or jumped (DESIGN.md section 6)."""

    from_quality: str
    to_quality: str
    from_utc_ms: int
    to_utc_ms: int
    mono_ns: int


class Clock:
    def __init__(
        self,
        *,
        synced: Callable[[], bool] = kernel_clock_synced,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._synced = synced
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self._lock = threading.Lock()
        self._gnss: tuple[int, int] | None = None  # (utc_ns - mono_ns, mono_ns of fix)
        self._observed: tuple[str, int] | None = None  # (quality, utc_ms - mono_ms)
        self._sync_cache: tuple[int | None, bool] = (None, False)

    def now_ns(self) -> int:
        """The monotonic time, nanoseconds: the instant every reading is stamped with."""
        return self._mono_ns()

    def observe(self) -> ClockStep | None:
        """Compare the time now with the last observation; a step when it changed source
        or jumped by more than :data:`STEP_THRESHOLD_MS`. The first call only observes."""
        mono_ns = self._mono_ns()
        ts = self.timestamp(mono_ns)
        offset = ts.utc_ms - ts.mono_ms
        with self._lock:
            before, self._observed = self._observed, (ts.quality, offset)
        if before is None:
            return None
        quality, old_offset = before
        if quality == ts.quality and abs(offset - old_offset) <= STEP_THRESHOLD_MS:
            return None
        return ClockStep(quality, ts.quality, old_offset + ts.mono_ms, ts.utc_ms, mono_ns)

    def gnss_time(self, utc_ns: int, mono_ns: int) -> None:
        with self._lock:
            self._gnss = (utc_ns - mono_ns, mono_ns)

    def _is_synced(self, now_mono: int) -> bool:
        """The kernel's sync state, asked at most every :data:`SYNC_CHECK_NS` (the store
        writer stamps thousands of records a second: one syscall each would show)."""
        checked_at, synced = self._sync_cache
        if checked_at is None or now_mono - checked_at >= SYNC_CHECK_NS:
            synced = self._synced()
            self._sync_cache = (now_mono, synced)
        return synced

    def timestamp(self, mono_ns: int) -> Timestamp:
        """The UTC of an instant given on the monotonic clock, and its quality."""
        now_mono = self._mono_ns()
        mono_ms = mono_ns // 1_000_000
        if self._is_synced(now_mono):
            utc_ns = self._wall_ns() - (now_mono - mono_ns)
            return Timestamp(utc_ns // 1_000_000, "ntp", mono_ms)
        with self._lock:
            gnss = self._gnss
        if gnss is not None and (now_mono - gnss[1]) / 1e9 <= GNSS_TIME_MAX_AGE_S:
            return Timestamp((mono_ns + gnss[0]) // 1_000_000, "gnss", mono_ms)
        utc_ns = self._wall_ns() - (now_mono - mono_ns)
        return Timestamp(utc_ns // 1_000_000, "unsynced", mono_ms)
