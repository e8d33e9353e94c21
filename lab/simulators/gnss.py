"""A GNSS receiver on a pty: RMC and GGA sentences (NMEA 0183) with valid checksums."""

from __future__ import annotations

import datetime as dt
import functools
import operator
import os
from pathlib import Path

from lab.simulators.pty import PtySim
from lab.wire import Damage


def nmea_sentence(body: str) -> bytes:
    """``$body*hh\\r\\n``, hh being the XOR of the bytes of *body*."""
    checksum = functools.reduce(operator.xor, body.encode("ascii"), 0)
    return f"${body}*{checksum:02X}\r\n".encode("ascii")


def _dm(value: float, lat: bool) -> tuple[str, str]:
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    value = abs(value)
    deg = int(value)
    minutes = (value - deg) * 60
    width = 2 if lat else 3
    return f"{deg:0{width}d}{minutes:07.4f}", hemi


def fix_sentences(when: dt.datetime, lat: float, lon: float, *, talker: str = "GN",
                  sats: int = 9, hdop: float = 0.9, alt_m: float = 45.0) -> bytes:
    t = when.strftime("%H%M%S.") + f"{when.microsecond // 10000:02d}"
    d = when.strftime("%d%m%y")
    la, ns = _dm(lat, True)
    lo, ew = _dm(lon, False)
    rmc = f"{talker}RMC,{t},A,{la},{ns},{lo},{ew},0.02,,{d},,,A"
    gga = f"{talker}GGA,{t},{la},{ns},{lo},{ew},1,{sats:02d},{hdop:.1f},{alt_m:.1f},M,20.1,M,,"
    return nmea_sentence(rmc) + nmea_sentence(gga)


class GnssSim(PtySim):
    def __init__(self, lat: float = 46.81, lon: float = -71.21, *, period_s: float = 1.0,
                 link: Path | None = None, faults: Damage | None = None) -> None:
        self.lat, self.lon = lat, lon
        self.period_s = period_s
        self.faults = faults or Damage()
        self.sentences = 0
        super().__init__("gnss", link)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            data = fix_sentences(dt.datetime.now(dt.UTC), self.lat, self.lon)
            try:
                os.write(self.pty.master, self.faults.apply(data))
                self.sentences += 2
            except OSError:
                pass  # nobody reading: the receiver keeps talking regardless
