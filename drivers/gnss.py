"""The GNSS receiver: fixes become records, GNSS time disciplines timestamps, and a unit
moved away from where it was installed raises an alarm.

:class:`GnssMonitor` is the sans-IO core (fed NMEA events and the monotonic time,
it returns readings); :class:`GnssProtocol` runs it on the port's thread.

- ``gnss.fix`` at most every ``fix_interval_s`` (the receiver talks every second;
  the unit does not move).
- ``gateway.moved`` (alarm) when fixes stay farther than ``move_radius_m`` from
  the installed position for ``move_after_s``; ``gateway.returned`` when they stay
  within it as long. Fixes with a poor geometry (HDOP above :data:`MAX_HDOP_C`)
  decide nothing.
- The moved state is kept in the store's ledger (:data:`MOVED_LEDGER_KEY`, in the
  transaction of the ``gateway.moved``/``gateway.returned`` record): after a restart
  a unit still away is not announced again, and its return is.
- GNSS time is offered to the clock from an RMC with status A, or a ZDA while fixes
  are fresh (a receiver without a fix may print its own unsynchronised clock); the
  clock decides whether to use it (core.clock: the floor, the steady-fix rule). Every
  step of the gateway's time (source change, or a jump) is a ``time.step`` record.
  ``gnss.fix`` records carry the clock's floor into the ledger, so it survives
  restarts even once every record has been forwarded and deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.clock import FLOOR_LEDGER_KEY, Clock
from core.record import JSON, Reading, Source
from drivers.nmea import Fix, GnssTime, NmeaReader
from firmware_bridge.framed import REASON_CHARS, Sink
from firmware_bridge.port import Transport

log = logging.getLogger(__name__)

#: Fixes with HDOP above this (x100) neither raise nor clear the moved alarm.
MAX_HDOP_C = 500
#: A ZDA disciplines time only if a fix came this recently, nanoseconds.
ZDA_NEEDS_FIX_WITHIN_NS = 10_000_000_000
EARTH_RADIUS_M = 6_371_008.8
#: The store ledger's key for the moved state (1 moved, 0 at its installed position).
MOVED_LEDGER_KEY = "gnss:moved"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS = timedelta(microseconds=1)

#: Reads a committed ledger entry (``StoreWriter.last_committed_event``).
LedgerLookup = Callable[[str], int | None]


@dataclass(frozen=True, slots=True)
class Installed:
    lat_e7: int
    lon_e7: int
    radius_m: int = 200
    after_s: float = 120.0


def distance_m(lat1_e7: int, lon1_e7: int, lat2_e7: int, lon2_e7: int) -> float:
    """Great-circle distance (haversine on a spherical Earth)."""
    p1, p2 = math.radians(lat1_e7 / 1e7), math.radians(lat2_e7 / 1e7)
    dp = p2 - p1
    dl = math.radians((lon2_e7 - lon1_e7) / 1e7)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


class GnssMonitor:
    def __init__(self, source: Source, *, fix_interval_s: float = 60.0,
                 installed: Installed | None = None, moved: bool = False) -> None:
        self.source = source
        self.fix_interval_ns = int(fix_interval_s * 1e9)
        self.installed = installed
        self.last_fix: Fix | None = None
        self.moved = moved  # as last committed (the ledger), before the first fix
        self._last_record_ns: int | None = None
        self._since: int | None = None  # first fix contradicting the current state

    def on_fix(self, fix: Fix) -> list[Reading]:
        self.last_fix = fix
        out: list[Reading] = []
        if self._last_record_ns is None or fix.mono_ns - self._last_record_ns >= \
                self.fix_interval_ns:
            self._last_record_ns = fix.mono_ns
            body: dict[str, JSON] = {
                "lat_e7": fix.lat_e7, "lon_e7": fix.lon_e7, "quality": fix.quality,
                "sats": fix.sats, "hdop_c": fix.hdop_c, "alt_dm": fix.alt_dm,
                "sentence": fix.sentence,
            }
            if fix.utc is not None:
                body["gnss_utc"] = fix.utc.isoformat().replace("+00:00", "Z")
            out.append(Reading("gnss.fix", self.source, body, fix.mono_ns))
        out.extend(self._check_place(fix))
        return out

    def trusts(self, t: GnssTime) -> bool:
        if t.source == "RMC":
            return True
        last = self.last_fix
        return last is not None and 0 <= t.mono_ns - last.mono_ns <= ZDA_NEEDS_FIX_WITHIN_NS

    def _check_place(self, fix: Fix) -> list[Reading]:
        """Debounced: the state flips only after *after_s* of fixes that contradict it."""
        home = self.installed
        if home is None or (fix.hdop_c is not None and fix.hdop_c > MAX_HDOP_C):
            return []
        dist = distance_m(home.lat_e7, home.lon_e7, fix.lat_e7, fix.lon_e7)
        away = dist > home.radius_m
        if away == self.moved:
            self._since = None
            return []
        self._since = self._since or fix.mono_ns
        held_ns = fix.mono_ns - self._since
        if held_ns < int(home.after_s * 1e9):
            return []
        self.moved, self._since = away, None
        if away:
            log.warning("gateway moved %d m from its installed position", round(dist))
        body: dict[str, JSON] = {
            "distance_m": round(dist), "radius_m": home.radius_m, "for_s": held_ns // 10**9,
            "lat_e7": fix.lat_e7, "lon_e7": fix.lon_e7, "hdop_c": fix.hdop_c,
        }
        kind = "gateway.moved" if away else "gateway.returned"
        return [Reading(kind, self.source, body, fix.mono_ns,
                        ledger=((MOVED_LEDGER_KEY, int(away)),))]


class GnssProtocol:
    """The GNSS port's protocol object (runs on the port's thread)."""

    def __init__(self, port_name: str, sink: Sink, clock: Clock, *,
                 fix_interval_s: float = 60.0, installed: Installed | None = None,
                 ledger: LedgerLookup | None = None) -> None:
        self.port_name = port_name
        self.sink = sink
        self.clock = clock
        self.reader = NmeaReader()
        self._source = Source("gnss", f"port:{port_name}")
        moved = ledger is not None and ledger(MOVED_LEDGER_KEY) == 1
        self.monitor = GnssMonitor(self._source, fix_interval_s=fix_interval_s,
                                   installed=installed, moved=moved)

    def connection_made(self, transport: Transport, now_ns: int) -> None:
        del transport, now_ns  # the GNSS receiver is only listened to

    def data_received(self, data: bytes, now_ns: int) -> None:
        readings: list[Reading] = []
        for event in self.reader.feed(data, now_ns):
            if isinstance(event, GnssTime):
                if self.monitor.trusts(event):
                    self.clock.gnss_time(utc_ns(event.utc), event.mono_ns)
                    readings.extend(time_steps(self.clock, self._source))
            else:
                readings.extend(self._with_floor(r) for r in self.monitor.on_fix(event))
        if readings:
            self.sink.submit_all(readings)

    def _with_floor(self, reading: Reading) -> Reading:
        """A ``gnss.fix`` carries the clock's floor into the ledger (module docstring)."""
        if reading.kind != "gnss.fix":
            return reading
        entry = (FLOOR_LEDGER_KEY, self.clock.floor_ms())
        return dataclasses.replace(reading, ledger=(*reading.ledger, entry))

    def tick(self, now_ns: int) -> None:
        del now_ns

    def connection_lost(self, reason: str, now_ns: int) -> None:
        self.sink.submit(Reading("device.lost", self._source,
                                 {"port": self.port_name, "reason": reason[:REASON_CHARS]},
                                 now_ns))

    def data_to_send(self) -> bytes:
        return b""


def utc_ns(when: datetime) -> int:
    """Nanoseconds since the epoch of a tz-aware datetime, exactly (no float)."""
    return (when - _EPOCH) // _NS * 1000


def time_steps(clock: Clock, source: Source) -> list[Reading]:
    """A ``time.step`` record when the gateway's time changed source or jumped (at most
    one a minute: ``since_last`` says what was refused, held or damped meanwhile)."""
    step = clock.observe()
    if step is None:
        return []
    since: dict[str, JSON] = dict(step.since_last)
    body: dict[str, JSON] = {
        "from": step.from_quality, "to": step.to_quality,
        "from_utc_ms": step.from_utc_ms, "to_utc_ms": step.to_utc_ms,
        "delta_ms": step.to_utc_ms - step.from_utc_ms, "since_last": since,
    }
    return [Reading("time.step", source, body, step.mono_ns)]
