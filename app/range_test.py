"""``gateway.py provision range-test --tag T``: beacon reception while the installer walks.

The installer walks the home (every room, the garden, where the person sleeps) with the
tag while this command reads the running daemon's state once a second (``app/state.py``:
the tag's ``beacons``, ``last_beacon_ms`` and ``rssi_dbm``) and shows a live line:
beacons a minute, RSSI now / lowest / mean, seconds since the last beacon, a bar. It
ends after ``--duration`` seconds, on Ctrl-C, or on ``q``, with a verdict and the
recommended absence threshold (``--absent-after``), and writes the result down as a
``tag.range_test`` action (the journal of local actions, ``provisioning/actions.py``):
the gateway seals it as a record naming who walked. No position is measured or kept.

:class:`Walk` is the sans-IO core: fed with samples of the state, it keeps bounded
statistics (an RSSI histogram of at most 129 bins, a window of rates) and returns the
live figures and the result. The rules (docs/provision-check.md, "range-test"):

* **longest silence**: the longest time the tag went unheard during the walk, to within
  a sample (the time since its last beacon at each sample, and the exact time between
  two beacons when a sample saw exactly one more);
* **coverage**: ``good`` when the longest silence is at most :data:`GOOD_SILENCE_S` and
  the 10th percentile of the RSSI at least :data:`GOOD_RSSI_DBM`; ``poor`` when the tag
  was not heard, the longest silence exceeds :data:`MARGINAL_SILENCE_S` or the 10th
  percentile is below :data:`MARGINAL_RSSI_DBM`; ``marginal`` otherwise;
* **recommended threshold**: the longest silence times :data:`SAFETY_FACTOR`, rounded up
  to :data:`RECOMMEND_STEP_S`, within :data:`RECOMMEND_MIN_S`-:data:`RECOMMEND_MAX_S`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import select
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from app.check import START_HINT, runtime_dir
from app.config import Config
from app.state import daemon_alive, read_state
from core.errors import UserError
from provisioning.actions import record
from provisioning.identity import load_identity
from provisioning.operator import Operator
from provisioning.registry import open_registry, parse_tag

__all__ = ["DEFAULT_DURATION_S", "MAX_DURATION_S", "SAMPLE_INTERVAL_S", "Live", "Result",
           "Sample", "Walk", "live_line", "recommend", "render_result"]

#: How often the daemon's state is read, seconds (it writes it once a second).
SAMPLE_INTERVAL_S = 1.0
DEFAULT_DURATION_S = 300
#: The longest walk, seconds (an hour is more than any home needs).
MAX_DURATION_S = 3600
#: Longest silence for each verdict, seconds.
GOOD_SILENCE_S = 20.0
MARGINAL_SILENCE_S = 60.0
#: 10th percentile of the RSSI for each verdict, dBm (receivers hear down to about -95).
GOOD_RSSI_DBM = -80
MARGINAL_RSSI_DBM = -90
#: The recommended ``--absent-after``: the longest silence times this, rounded up to the
#: step, within the bounds (seconds).
SAFETY_FACTOR = 3
RECOMMEND_STEP_S = 30
RECOMMEND_MIN_S = 60
RECOMMEND_MAX_S = 900
#: The window of the live beacon rate, ms.
RATE_WINDOW_MS = 60_000
#: Samples kept for that window at most (bounded whatever the sampling interval).
MAX_RATE_SAMPLES = 4096
#: The RSSI a beacon can report (signed byte, dBm): the histogram's bins.
RSSI_MIN_DBM, RSSI_MAX_DBM = -128, 0
#: The live bar: its width and the RSSI at its ends, dBm.
BAR_WIDTH = 20
BAR_FLOOR_DBM, BAR_CEIL_DBM = -100, -40

GOOD, MARGINAL, POOR = "good", "marginal", "poor"
_RANK = {GOOD: 0, MARGINAL: 1, POOR: 2}


@dataclass(frozen=True, slots=True)
class Sample:
    """The tag's row of one state file (``tags[]``), with the file's ``written_at_ms``."""

    at_ms: int
    beacons: int | None
    last_beacon_ms: int | None
    rssi_dbm: int | None

    @classmethod
    def of(cls, state: Mapping[str, Any], tag: str) -> Sample | None:
        """The sample of *tag* in *state*; None when the state does not list the tag."""
        rows = state.get("tags")
        row = next((r for r in rows if isinstance(r, Mapping) and r.get("tag") == tag),
                   None) if isinstance(rows, list) else None
        written = state.get("written_at_ms")
        if row is None or not isinstance(written, int):
            return None
        beacons, last, rssi = (v if _int(v) else None for v in (
            row.get("beacons"), row.get("last_beacon_ms"), row.get("rssi_dbm")))
        return cls(written, beacons, last, rssi)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Live:
    """What the live line shows."""

    elapsed_s: float
    beacons: int
    beacons_per_min: float | None
    rssi_now: int | None
    rssi_min: int | None
    rssi_avg: float | None
    since_last_s: float | None


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of a walk: integers only (it becomes a record, and records carry no
    floats: docs/records.md)."""

    tag: str
    duration_s: int
    ended: str  # "duration", "quit", "interrupted"
    beacons: int
    beacons_per_min: int
    silence_max_ms: int
    #: ``samples``, ``min``, ``p10``, ``median``, ``max``, ``avg`` (dBm, rounded)
    rssi: dict[str, int | None]
    verdict: str
    reasons: tuple[str, ...]
    recommended_absent_after_s: int
    absent_after_s: int

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "duration_s": self.duration_s, "ended": self.ended,
                "beacons": self.beacons, "beacons_per_min": self.beacons_per_min,
                "silence_max_ms": self.silence_max_ms, "rssi": dict(self.rssi),
                "verdict": self.verdict, "reasons": list(self.reasons),
                "recommended_absent_after_s": self.recommended_absent_after_s,
                "absent_after_s": self.absent_after_s}


def recommend(silence_max_s: float) -> int:
    """The ``--absent-after`` to use given the longest silence of a walk (module doc)."""
    raw = math.ceil(silence_max_s * SAFETY_FACTOR / RECOMMEND_STEP_S) * RECOMMEND_STEP_S
    return max(RECOMMEND_MIN_S, min(RECOMMEND_MAX_S, raw))


@dataclass
class Walk:
    """The statistics of one walk (sans-IO): :meth:`feed` each sample, then :meth:`result`."""

    tag: str
    absent_after_s: int
    start_ms: int | None = None
    last_ms: int | None = None
    beacons: int = 0
    silence_max_ms: int = 0
    _prev: Sample | None = None
    _hist: list[int] = field(default_factory=lambda: [0] * (RSSI_MAX_DBM - RSSI_MIN_DBM + 1))
    _rssi_sum: int = 0
    _rssi_n: int = 0
    _rssi_now: int | None = None
    _rates: deque[tuple[int, int]] = field(
        default_factory=lambda: deque(maxlen=MAX_RATE_SAMPLES))

    def feed(self, sample: Sample) -> Live:
        if self.start_ms is None:
            self.start_ms = sample.at_ms
        prev, self._prev = self._prev, sample
        self.last_ms = max(sample.at_ms, self.last_ms or sample.at_ms)
        new = 0
        if prev is not None and sample.beacons is not None and prev.beacons is not None:
            # fewer than before: the daemon restarted and counts from 0 again
            new = sample.beacons - prev.beacons if sample.beacons >= prev.beacons \
                else sample.beacons
        elif prev is not None and sample.last_beacon_ms != prev.last_beacon_ms:
            new = 1  # an older daemon without counts: at least one beacon
        self.beacons += new
        if new and sample.rssi_dbm is not None:
            self._rssi(sample.rssi_dbm)
        self._silence(prev, sample, new)
        self._rates.append((sample.at_ms, self.beacons))
        while self._rates and sample.at_ms - self._rates[0][0] > RATE_WINDOW_MS:
            self._rates.popleft()
        return self.live()

    def _rssi(self, rssi: int) -> None:
        rssi = max(RSSI_MIN_DBM, min(RSSI_MAX_DBM, rssi))
        self._hist[rssi - RSSI_MIN_DBM] += 1
        self._rssi_sum += rssi
        self._rssi_n += 1
        self._rssi_now = rssi

    def _silence(self, prev: Sample | None, sample: Sample, new: int) -> None:
        start = self.start_ms if self.start_ms is not None else sample.at_ms
        last = sample.last_beacon_ms
        unheard = sample.at_ms - max(last, start) if last is not None else sample.at_ms - start
        gap = 0
        if new == 1 and prev is not None and prev.last_beacon_ms is not None and \
                last is not None:  # two beacons in a row: the exact gap (within the walk)
            gap = last - max(prev.last_beacon_ms, start)
        self.silence_max_ms = max(self.silence_max_ms, unheard, gap)

    def live(self) -> Live:
        elapsed = 0.0 if self.start_ms is None or self.last_ms is None else \
            (self.last_ms - self.start_ms) / 1000
        rate = None
        if len(self._rates) >= 2:
            (t0, b0), (t1, b1) = self._rates[0], self._rates[-1]
            if t1 - t0 >= 1000:
                rate = (b1 - b0) * 60_000 / (t1 - t0)
        since = None
        if self._prev is not None and self._prev.last_beacon_ms is not None:
            since = max(0, self._prev.at_ms - self._prev.last_beacon_ms) / 1000
        return Live(elapsed, self.beacons, rate, self._rssi_now, self._percentile(0),
                    self._rssi_sum / self._rssi_n if self._rssi_n else None, since)

    def _percentile(self, share: float) -> int | None:
        """The lowest RSSI with at least *share* of the samples at or below it."""
        if not self._rssi_n:
            return None
        need = max(1, math.ceil(share * self._rssi_n))
        seen = 0
        for index, count in enumerate(self._hist):
            seen += count
            if seen >= need:
                return index + RSSI_MIN_DBM
        return RSSI_MAX_DBM  # pragma: no cover - the counts add up to _rssi_n

    def result(self, ended: str) -> Result:
        live = self.live()
        silence = self.silence_max_ms / 1000
        p10 = self._percentile(0.1)
        rssi: dict[str, int | None] = {
            "samples": self._rssi_n, "min": self._percentile(0),
            "p10": p10, "median": self._percentile(0.5),
            "max": self._max(), "avg": None if live.rssi_avg is None else round(live.rssi_avg)}
        verdict, reasons = self._verdict(silence, p10)
        rate = round(self.beacons * 60 / live.elapsed_s) if live.elapsed_s > 0 else 0
        return Result(self.tag, round(live.elapsed_s), ended, self.beacons, rate,
                      self.silence_max_ms, rssi, verdict, tuple(reasons), recommend(silence),
                      self.absent_after_s)

    def _max(self) -> int | None:
        for index in range(len(self._hist) - 1, -1, -1):
            if self._hist[index]:
                return index + RSSI_MIN_DBM
        return None

    def _verdict(self, silence_s: float, p10: int | None) -> tuple[str, list[str]]:
        if not self.beacons:
            return POOR, ["the tag was not heard during the test"]
        reasons: list[str] = []
        by_silence = GOOD if silence_s <= GOOD_SILENCE_S else \
            MARGINAL if silence_s <= MARGINAL_SILENCE_S else POOR
        if by_silence != GOOD:
            reasons.append(f"the tag went unheard for up to {silence_s:.1f} s (good: at most "
                           f"{GOOD_SILENCE_S:g} s, marginal: at most {MARGINAL_SILENCE_S:g} s)")
        by_rssi = GOOD
        if p10 is not None:
            by_rssi = GOOD if p10 >= GOOD_RSSI_DBM else \
                MARGINAL if p10 >= MARGINAL_RSSI_DBM else POOR
        if by_rssi != GOOD:
            reasons.append(f"a tenth of the beacons came at {p10} dBm or weaker (good: "
                           f"{GOOD_RSSI_DBM} dBm or stronger, marginal: {MARGINAL_RSSI_DBM})")
        if silence_s >= self.absent_after_s:
            reasons.append(f"with its threshold now ({self.absent_after_s} s) the tag would "
                           "have been reported absent during the walk")
        return max(by_silence, by_rssi, key=_RANK.__getitem__), reasons


# -- the people's side ---------------------------------------------------------------------------
def bar(rssi: int | None, *, unicode: bool) -> str:
    full, empty = ("█", "·") if unicode else ("#", ".")
    if rssi is None:
        return empty * BAR_WIDTH
    share = (rssi - BAR_FLOOR_DBM) / (BAR_CEIL_DBM - BAR_FLOOR_DBM)
    filled = max(0, min(BAR_WIDTH, round(share * BAR_WIDTH)))
    return full * filled + empty * (BAR_WIDTH - filled)


def live_line(tag: str, live: Live, *, unicode: bool) -> str:
    rate = "--" if live.beacons_per_min is None else f"{live.beacons_per_min:.0f}"
    now = "--" if live.rssi_now is None else f"{live.rssi_now}"
    low = "--" if live.rssi_min is None else f"{live.rssi_min}"
    avg = "--" if live.rssi_avg is None else f"{live.rssi_avg:.0f}"
    since = "never" if live.since_last_s is None else f"{live.since_last_s:.1f} s ago"
    return (f"{tag} {live.elapsed_s:5.0f} s  {rate:>4} beacons/min  RSSI {now:>4} dBm "
            f"(min {low}, avg {avg})  last {since:<11} [{bar(live.rssi_now, unicode=unicode)}]")


def render_result(result: Result, action: int | None) -> str:
    rssi = result.rssi
    lines = [
        f"range test of tag {result.tag}: {result.duration_s} s ({result.ended}), "
        f"{result.beacons} beacon(s), {result.beacons_per_min} a minute",
        f"longest silence {result.silence_max_ms / 1000:.1f} s; RSSI min {rssi['min']}, 10th "
        f"percentile "
        f"{rssi['p10']}, median {rssi['median']}, mean {rssi['avg']} dBm "
        f"({rssi['samples']} sample(s))",
        f"coverage: {result.verdict.upper()}",
    ]
    lines += [f"  - {reason}" for reason in result.reasons]
    if result.verdict == POOR:
        lines.append("  move the receiver nearer the middle of the home (or add one) and test "
                     "again: a higher threshold only hides the gaps")
    rec, now = result.recommended_absent_after_s, result.absent_after_s
    lines.append(f"recommended absence threshold: {rec} s (now {now} s)"
                 + ("" if rec == now else f": apply it with 'provision pair-tag --tag "
                                          f"{result.tag} --replace --key-file FILE "
                                          f"--absent-after {rec}' (the key the tag holds now: "
                                          "it keeps working), then restart the gateway"))
    if action is not None:
        lines.append(f"written down as action {action} (tag.range_test): the gateway records "
                     "it")
    return "\n".join(lines)


# -- the walk, against the running daemon ---------------------------------------------------------
class DaemonLost(Exception):  # noqa: N818 - a state of the world, not a bug
    """The daemon's state stopped being current during the walk."""


def walk(tag: str, absent_after_s: int, duration_s: float, *,
         read: Callable[[], Mapping[str, Any] | None], wait: Callable[[float], bool],
         show: Callable[[Live], None], interval_s: float = SAMPLE_INTERVAL_S,
         monotonic: Callable[[], float] = time.monotonic) -> Result:
    """Sample *read* (the daemon's alive state, or None) every *interval_s* until
    *duration_s* passed, *wait* returns True (the installer pressed q) or Ctrl-C; show
    each sample. :class:`DaemonLost` when the state goes (the gateway stopped)."""
    state = Walk(tag, absent_after_s)
    end = monotonic() + duration_s
    ended = "duration"
    try:
        while True:
            found = read()
            sample = None if found is None else Sample.of(found, tag)
            if sample is None:
                raise DaemonLost(tag)
            show(state.feed(sample))
            left = end - monotonic()
            if left <= 0:
                break
            if wait(min(interval_s, left)):
                ended = "quit"
                break
    except KeyboardInterrupt:
        ended = "interrupted"
    return state.result(ended)


# -- the command -----------------------------------------------------------------------------------
#: The action the result is written down as (provisioning/actions.py; a record kind of its own).
ACTION = "tag.range_test"
#: Without a terminal, a live line this often, seconds (a log, not an animation).
LOG_EVERY_S = 10.0


class RangeTestError(UserError):
    """The test cannot run as asked; the message says why and what to do."""


def run(cfg: Config, tag_text: str, duration_s: float, operator: Operator, *,
        out: TextIO, err: TextIO, stdin: TextIO, as_json: bool,
        interval_s: float = SAMPLE_INTERVAL_S) -> int:
    """``provision range-test``: 0 when coverage is good or marginal, 1 when poor or the
    gateway stopped during the test."""
    if not 1 <= duration_s <= MAX_DURATION_S:
        raise RangeTestError(f"--duration {duration_s:g}: give 1-{MAX_DURATION_S} seconds "
                             f"(default {DEFAULT_DURATION_S})")
    tag = parse_tag(tag_text)
    identity = load_identity(cfg.identity_path, repair=False)
    identity.close()  # its storage key (for the journal) stays: the TPM is not needed again
    registry = open_registry(identity)
    try:
        paired = registry.get(tag)
    finally:
        registry.close()
    if paired is None:
        raise RangeTestError(f"tag {tag} is not paired with this gateway: pair it first "
                             "(provision pair-tag), or see 'provision list-tags'")
    where = runtime_dir(cfg)

    def read() -> Mapping[str, Any] | None:
        found = read_state(where)
        return found if found is not None and daemon_alive(found) else None

    first = read()
    if first is None:
        raise RangeTestError(f"the gateway is not running (no current state in {where}): "
                             f"{START_HINT}; the test shows what the gateway hears")
    if Sample.of(first, tag) is None:
        raise RangeTestError(f"the running gateway does not listen for tag {tag} (paired after "
                             "it started): restart it (systemctl restart smartcorr-gateway)")
    unicode = _utf8(err)
    tty = err.isatty()
    shown = [0.0]

    def show(live: Live) -> None:
        line = live_line(tag, live, unicode=unicode)
        if tty:
            err.write(f"\r{line}")
        elif live.elapsed_s - shown[0] >= LOG_EVERY_S or live.elapsed_s == 0:
            shown[0] = live.elapsed_s
            err.write(f"{line}\n")
        err.flush()

    if not as_json:
        err.write(f"range test of tag {tag} for {duration_s:g} s: walk the home with the tag; "
                  "q (then Enter, without a terminal) or Ctrl-C ends it\n")
    try:
        with _keys(stdin) as wait:
            result = walk(tag, paired.absent_after_s, duration_s, read=read, wait=wait,
                          show=show, interval_s=interval_s)
    except DaemonLost:
        if tty:
            err.write("\n")
        err.write(f"provision range-test: the gateway stopped during the test: {START_HINT}, "
                  "and test again (nothing was written down)\n")
        return 1
    if tty:
        err.write("\n")
    action = record(identity, ACTION, result.to_json(), operator)
    if as_json:
        out.write(json.dumps(result.to_json() | {"action": action}, sort_keys=True) + "\n")
    else:
        out.write(render_result(result, action) + "\n")
    return 1 if result.verdict == POOR else 0


def _utf8(stream: TextIO) -> bool:
    return stream.isatty() and (getattr(stream, "encoding", "") or "").lower().replace(
        "-", "") == "utf8"


@contextlib.contextmanager
def _keys(stdin: TextIO) -> Iterator[Callable[[float], bool]]:
    """A wait of at most *timeout* seconds that returns True when the installer typed q:
    on a terminal one key press (cbreak mode, restored after), else a line ``q``."""
    try:
        fd = stdin.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        fd = -1
    never = threading.Event()  # never set: its wait is the sampling tick
    if fd < 0:
        yield never.wait
        return
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        tty.setcbreak(fd)
    closed = threading.Event()  # end of input: only the time (or Ctrl-C) ends the test now

    def wait(timeout: float) -> bool:
        if closed.is_set():
            return never.wait(timeout)
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            return False
        data = os.read(fd, 64)
        if not data:
            closed.set()
            return never.wait(timeout)
        return b"q" in data.lower()

    try:
        yield wait
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
