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

from buffer.record import Timestamp

TIME_ERROR = 5
#: A GNSS time fix older than this no longer disciplines timestamps, seconds.
GNSS_TIME_MAX_AGE_S = 600.0
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def kernel_clock_synced() -> bool:
    """True when the kernel reports its clock synchronised (NTP, chrony, PTP)."""
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state: int = _libc.adjtimex(buf)
    return state not in (-1, TIME_ERROR)


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

    def gnss_time(self, utc_ns: int, mono_ns: int) -> None:
        with self._lock:
            self._gnss = (utc_ns - mono_ns, mono_ns)

    def timestamp(self, mono_ns: int) -> Timestamp:
        """The UTC of an instant given on the monotonic clock, and its quality."""
        now_mono = self._mono_ns()
        mono_ms = mono_ns // 1_000_000
        if self._synced():
            utc_ns = self._wall_ns() - (now_mono - mono_ns)
            return Timestamp(utc_ns // 1_000_000, "ntp", mono_ms)
        with self._lock:
            gnss = self._gnss
        if gnss is not None and (now_mono - gnss[1]) / 1e9 <= GNSS_TIME_MAX_AGE_S:
            return Timestamp((mono_ns + gnss[0]) // 1_000_000, "gnss", mono_ms)
        utc_ns = self._wall_ns() - (now_mono - mono_ns)
        return Timestamp(utc_ns // 1_000_000, "unsynced", mono_ms)
