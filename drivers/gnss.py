"""The GNSS receiver on its port: fixes become records, GNSS time disciplines the clock.

Runs on the port's thread; the NMEA parsing is the sans-IO :mod:`drivers.nmea`.
A ``gnss.fix`` record is written at most every ``fix_interval_s`` (the receiver
talks every second; the unit does not move).
"""

from __future__ import annotations

import logging
import time

from buffer.record import JSON, Reading, Source
from drivers.framed import Sink
from drivers.nmea import Fix, GnssTime, NmeaReader
from smartcorr.clock import Clock

log = logging.getLogger(__name__)


class GnssProtocol:
    def __init__(self, port_name: str, sink: Sink, clock: Clock, *,
                 fix_interval_s: float = 60.0) -> None:
        self.port_name = port_name
        self.sink = sink
        self.clock = clock
        self.fix_interval_s = fix_interval_s
        self.reader = NmeaReader()
        self.last_fix: Fix | None = None
        self._last_record_mono: float | None = None
        self._source = Source("gnss", f"port:{port_name}")

    def connection_made(self, now: float) -> None:
        del now

    def data_received(self, data: bytes, now: float) -> None:
        for event in self.reader.feed(data, time.monotonic_ns()):
            if isinstance(event, GnssTime):
                self.clock.gnss_time(int(event.utc.timestamp() * 1e9), event.mono_ns)
            else:
                self._on_fix(event, now)

    def _on_fix(self, fix: Fix, now: float) -> None:
        self.last_fix = fix
        if self._last_record_mono is not None and now - self._last_record_mono < \
                self.fix_interval_s:
            return
        self._last_record_mono = now
        body: dict[str, JSON] = {
            "lat_e7": fix.lat_e7, "lon_e7": fix.lon_e7, "quality": fix.quality,
            "sats": fix.sats, "hdop_c": fix.hdop_c, "alt_dm": fix.alt_dm,
            "sentence": fix.sentence,
        }
        if fix.utc is not None:
            body["gnss_utc"] = fix.utc.isoformat().replace("+00:00", "Z")
        self.sink.submit(Reading("gnss.fix", self._source, body, fix.mono_ns))

    def tick(self, now: float) -> None:
        del now

    def connection_lost(self, reason: str, now: float) -> None:
        del now
        self.sink.submit(Reading("device.lost", self._source,
                                 {"port": self.port_name, "reason": reason[:120]},
                                 time.monotonic_ns()))

    def data_to_send(self) -> bytes:
        return b""
