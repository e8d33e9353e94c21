"""A GNSS receiver on a pty: RMC and GGA sentences (NMEA 0183) with valid checksums, or a
real receiver's capture replayed (:class:`GnssReplaySim`, e.g. one of ``../shared/data/nmea``)."""

from __future__ import annotations

import datetime as dt
import functools
import operator
import os
from pathlib import Path

from app.nmea_replay import is_comment_line
from lab.simulators.pty import PtySim, SerialEnd
from lab.wire import Damage

#: Largest capture a replay reads (the captures we keep are tens of kilobytes).
MAX_CAPTURE_BYTES = 8 * 1024 * 1024
#: Lines of one epoch when the capture's sentences carry no time of day.
LINES_PER_EPOCH_UNTIMED = 10
#: The field holding the time of day, by sentence type (GLL has it after the position).
_TIME_FIELD = {b"GGA": 1, b"RMC": 1, b"GNS": 1, b"ZDA": 1, b"GLL": 5}


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
                 link: Path | None = None, faults: Damage | None = None,
                 end: SerialEnd | None = None) -> None:
        self.lat, self.lon = lat, lon
        self.period_s = period_s
        self.faults = faults or Damage()
        self.sentences = 0
        super().__init__("gnss", link, end=end)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            data = fix_sentences(dt.datetime.now(dt.UTC), self.lat, self.lon)
            try:
                os.write(self.pty.master, self.faults.apply(data))
                self.sentences += 2
            except OSError:
                pass  # nobody reading: the receiver keeps talking regardless


class CaptureError(ValueError):
    """A capture cannot be replayed (unreadable, too large, no NMEA sentence in it)."""


def capture_epochs(path: Path) -> list[bytes]:
    """The capture's receiver output (gpsd comment lines left out) cut into epochs: the
    lines up to the next sentence with another time of day, as the receiver sent them once
    a second. Bytes between sentences (binary protocols) stay with their epoch."""
    try:
        if path.stat().st_size > MAX_CAPTURE_BYTES:
            raise CaptureError(f"{path}: larger than {MAX_CAPTURE_BYTES} bytes: give a capture "
                               "of a few minutes")
        data = path.read_bytes()
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    lines = [line for line in data.splitlines(keepends=True)
             if not is_comment_line(line.rstrip(b"\r\n"))]
    if not any(b"$" in line for line in lines):
        raise CaptureError(f"{path}: no NMEA sentence in it (lines starting with $)")
    epochs: list[bytes] = []
    current = bytearray()
    current_time: bytes | None = None
    untimed = 0
    for line in lines:
        when = _time_of_day(line)
        if when is not None and current_time is not None and when != current_time and current:
            epochs.append(bytes(current))
            current.clear()
            untimed = 0
        if when is not None:
            current_time = when
        elif current_time is None:
            untimed += 1
            if untimed > LINES_PER_EPOCH_UNTIMED and current:
                epochs.append(bytes(current))
                current.clear()
                untimed = 1
        current += line
    if current:
        epochs.append(bytes(current))
    return epochs


def _time_of_day(line: bytes) -> bytes | None:
    start = line.find(b"$")
    if start < 0:
        return None
    fields = line[start + 1 :].split(b"*", 1)[0].split(b",")
    index = _TIME_FIELD.get(fields[0][-3:])
    if index is None or len(fields) <= index or not fields[index]:
        return None
    return fields[index]


class GnssReplaySim(PtySim):
    """A receiver replaying *epochs* (:func:`capture_epochs`), one every *period_s*; with
    *loop* it starts again at the end, else it falls silent (as an unplugged antenna)."""

    def __init__(self, epochs: list[bytes], *, period_s: float = 1.0, loop: bool = False,
                 link: Path | None = None, faults: Damage | None = None,
                 end: SerialEnd | None = None) -> None:
        if not epochs:
            raise CaptureError("nothing to replay")
        self.epochs = epochs
        self.period_s = period_s
        self.loop = loop
        self.faults = faults or Damage()
        self.sent_epochs = 0
        self.bytes_sent = 0
        self.finished = False
        super().__init__("gnss", link, end=end)

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(self.period_s):
            if index == len(self.epochs):
                if not self.loop:
                    self.finished = True
                    continue
                index = 0
            data = self.faults.apply(self.epochs[index])
            index += 1
            try:
                os.write(self.pty.master, data)
                self.bytes_sent += len(data)
            except OSError:
                pass  # nobody reading: the receiver keeps talking regardless
            self.sent_epochs += 1


if __name__ == "__main__":  # the same as: python -m lab.simulators gnss
    import sys

    from lab.simulators.cli import main

    sys.exit(main(["gnss", *sys.argv[1:]]))
