"""``gateway.py diag nmea-replay FILE [--json]``: replay a GNSS capture through the reader.

A technician's check of a receiver or a cable: the capture (a raw dump of the serial
port, or a gpsd-style ``.log``) goes through the very :class:`~drivers.nmea.NmeaReader`
the daemon runs, in fixed-size reads, and the counts come out per sentence type and
talker, with checksum errors, rejected fragments and fixes. Comment lines of gpsd logs
(``#`` lines of printable ASCII only; a binary record may also begin with ``#``) are not
receiver output and are left out unless ``--raw`` is given.

The capture's content never makes the command fail: exit 0 whatever the bytes, exit 2
with a message naming the file when it cannot be read. Progress goes to stderr when a
replay takes more than a second. Captures carry no timing, so every byte is fed at
``mono_ns`` 0.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Final, TextIO

from drivers.nmea import KNOWN_TALKERS, PROPRIETARY_TALKER, Fix, NmeaReader

READ_SIZE: Final = 64 * 1024
"""Bytes per read of the capture, and the longest line the comment filter looks at whole."""
PROGRESS_AFTER_S: Final = 1.0
"""Progress appears on stderr once a replay has run this long..."""
PROGRESS_EVERY_S: Final = 1.0
"""...and is refreshed this often."""
EXIT_OK: Final = 0
EXIT_UNREADABLE: Final = 2
_COMMENT_START: Final = ord("#")
_TEXT_BYTES: Final = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\r\n")
_FEED_MONO_NS: Final = 0
_USUAL_TALKERS: Final = KNOWN_TALKERS | {PROPRIETARY_TALKER}


def is_comment_line(line: bytes) -> bool:
    """A gpsd capture comment: starts with ``#`` and holds printable ASCII only."""
    return bool(line) and line[0] == _COMMENT_START and _TEXT_BYTES.issuperset(line)


def capture_chunks(stream: BinaryIO, *, keep_comments: bool = False) -> Iterator[bytes]:
    """The capture's bytes in reads of at most ``READ_SIZE``, comment lines left out.

    Lines are read with a length limit, so a capture without line ends (binary) is
    streamed in bounded pieces; a piece that does not start a line is never a comment.
    """
    at_line_start = True
    in_comment = False
    batch = bytearray()
    while piece := stream.readline(READ_SIZE):
        if not keep_comments:
            if at_line_start:
                in_comment = is_comment_line(piece)
            elif in_comment:
                in_comment = _TEXT_BYTES.issuperset(piece)
            at_line_start = piece.endswith(b"\n")
            if in_comment:
                continue
        batch += piece
        if len(batch) >= READ_SIZE:
            yield bytes(batch)
            batch.clear()
    if batch:
        yield bytes(batch)


class Progress:
    """Writes ``done/total`` to stderr once the replay has run for ``PROGRESS_AFTER_S``."""

    def __init__(self, total: int, out: TextIO, clock: Callable[[], float]) -> None:
        self._total = total
        self._out = out
        self._clock = clock
        self._started = clock()
        self._next = self._started + PROGRESS_AFTER_S
        self.shown = False

    def update(self, done: int) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + PROGRESS_EVERY_S
        self.shown = True
        if self._total > 0:
            share = min(100, 100 * done // self._total)
            self._out.write(f"\rnmea-replay: {share:3d}% ({done:,} of {self._total:,} bytes)")
        else:
            self._out.write(f"\rnmea-replay: {done:,} bytes")
        self._out.flush()

    def finish(self) -> None:
        if self.shown:
            self._out.write("\n")
            self._out.flush()


def replay(
    chunks: Iterable[bytes],
    reader: NmeaReader,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> Fix | None:
    """Feed every chunk to ``reader``; return the last fix."""
    last_fix: Fix | None = None
    done = 0
    for chunk in chunks:
        for event in reader.feed(chunk, _FEED_MONO_NS):
            if isinstance(event, Fix):
                last_fix = event
        done += len(chunk)
        if on_progress is not None:
            on_progress(done)
    return last_fix


def summary(reader: NmeaReader, last_fix: Fix | None) -> dict[str, object]:
    """The ``--json`` object: the reader's counters and the last fix."""
    stats = reader.stats
    fix_json: dict[str, object] | None = None
    if last_fix is not None:
        fix_json = {
            "lat": last_fix.lat_e7 / 1e7,
            "lon": last_fix.lon_e7 / 1e7,
            "utc": last_fix.utc.isoformat() if last_fix.utc else None,
            "quality": last_fix.quality,
            "sentence": last_fix.sentence,
        }
    return {
        "sentences_ok": stats.sentences_ok,
        "checksum_errors": stats.checksum_errors,
        "rejected": stats.rejected,
        "rejected_by_reason": dict(sorted(stats.rejected_by_reason.items())),
        "fixes": stats.fixes,
        "invalid_fixes": stats.invalid_fixes,
        "out_of_range": dict(sorted(stats.out_of_range.items())),
        "times": stats.times,
        "skipped_types": stats.skipped_types,
        "bytes_skipped": stats.bytes_skipped,
        "unfinished_bytes": reader.buffered,
        "last_fix": fix_json,
        "by_type": _by_count(stats.by_type),
        "by_talker": _by_count(stats.by_talker),
    }


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _counts_line(counts: dict[str, int], *, usual: frozenset[str] | None = None) -> str:
    """``GSV 732  GSA 244 ...``; keys outside ``usual`` are marked ``(other)``."""
    parts = []
    for key, value in _by_count(counts).items():
        mark = " (other)" if usual is not None and key not in usual else ""
        parts.append(f"{key}{mark} {value:,}")
    return "  ".join(parts) or "-"


def render_text(path: Path, size: int, reader: NmeaReader, last_fix: Fix | None) -> str:
    stats = reader.stats
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.rejected_by_reason.items()))
    if last_fix is None:
        fix_text = "none"
    else:
        when = last_fix.utc.isoformat() if last_fix.utc else "date unknown"
        fix_text = (f"{last_fix.lat_e7 / 1e7:.7f}, {last_fix.lon_e7 / 1e7:.7f}  "
                    f"quality {last_fix.quality}  {when}  ({last_fix.sentence})")
    lines = [
        f"NMEA replay of {path} ({size:,} bytes)",
        f"  sentences ok      {stats.sentences_ok:,}"
        f"  (of which counted and skipped: {stats.skipped_types:,})",
        f"  checksum errors   {stats.checksum_errors:,}",
        f"  rejected          {stats.rejected:,}" + (f"  ({reasons})" if reasons else ""),
        f"  bytes skipped     {stats.bytes_skipped:,}  (noise outside sentences)",
        f"  fixes             {stats.fixes:,}"
        f"  (claimed without a usable position: {stats.invalid_fixes:,})",
        f"  out of range      {_counts_line(stats.out_of_range)}"
        "  (fields dropped from the fix)",
        f"  GNSS times        {stats.times:,}",
        f"  last fix          {fix_text}",
        f"  by type           {_counts_line(stats.by_type)}",
        f"  by talker         {_counts_line(stats.by_talker, usual=_USUAL_TALKERS)}",
    ]
    if reader.buffered:
        lines.append(f"  unfinished        {reader.buffered:,} bytes at the end (cut sentence)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway.py diag nmea-replay",
        description="Replay an NMEA capture through the gateway's GNSS reader and count "
        "what it finds.",
    )
    parser.add_argument("file", type=Path, help="capture file (raw serial dump or gpsd .log)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the text report")
    parser.add_argument("--raw", action="store_true",
                        help="feed '#' comment lines too (they are skipped by default)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    path: Path = args.file
    reader = NmeaReader()
    try:
        with path.open("rb") as stream:
            size = _size_of(stream)
            progress = Progress(size, sys.stderr, time.monotonic)
            try:
                last_fix = replay(capture_chunks(stream, keep_comments=args.raw), reader,
                                  on_progress=progress.update)
            finally:
                progress.finish()
    except OSError as exc:
        print(f"nmea-replay: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.json:
        print(json.dumps(summary(reader, last_fix), separators=(",", ":")))
    else:
        print(render_text(path, size, reader, last_fix))
    return EXIT_OK


def _size_of(stream: BinaryIO) -> int:
    """Size of a regular file; 0 (unknown) for a pipe or a device."""
    info = os.fstat(stream.fileno())
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
