"""Time that cannot be poisoned (issue 8, finding 3): the poisoned NMEA sequences.

Each sequence is fed to the real GNSS protocol object (NMEA bytes -> reader -> monitor ->
clock) under a fake clock; readings are stamped in seq order by :class:`Stamper`, the
part of the store writer that matters here (``Clock.timestamp`` per reading, the ledger
kept). The health thread's clock watch runs every 5 s. Over every sequence:

* no record is stamped before the floor (the newest committed record's time at start);
* no record carries a year the steady-fix rule did not accept;
* at most one ``time.step`` a minute;
* record time never goes backwards between consecutive records but at a ``time.step``.

The restart test runs the product's store and writer: the floor and the moved state
come back from the store.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.assembly import CLOCK_WATCH_S, Pipeline
from core.clock import (
    AGREE_MS,
    BUILD_FLOOR_MS,
    FAR_AHEAD_MS,
    FLOOR_LEDGER_KEY,
    STEADY_FAR_NS,
    STEP_MIN_INTERVAL_NS,
    Clock,
    GnssVerdict,
)
from core.record import Reading, SealedRecord, Source, Timestamp
from drivers.gnss import MOVED_LEDGER_KEY, GnssProtocol, Installed, time_steps
from drivers.nmea import FIELD_ALT, FIELD_DATE, Fix
from lab.simulators.gnss import fix_sentences, nmea_sentence
from lab.site import NOWHERE
from provisioning.identity import Identity

S = 1_000_000_000
MS = 1_000_000
UTC = dt.UTC
#: The newest committed record's time when the gateway starts.
FLOOR = dt.datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
FLOOR_MS = int(FLOOR.timestamp()) * 1000
#: The true time at the first sentence (the gateway was off for an hour).
TRUTH = FLOOR + dt.timedelta(hours=1)
WALL_2020 = dt.datetime(2020, 1, 1, tzinfo=UTC)  # a Pi without RTC, unsynchronised
LAT, LON = 46.81, -71.21
HOME = Installed(468100000, -712100000, radius_m=200, after_s=60)
GW = Source("gateway", "gw-test-0001")
START_MONO = 1000 * S


def ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def year_of(utc_ms: int) -> int:
    return dt.datetime.fromtimestamp(utc_ms / 1000, UTC).year


@dataclass(frozen=True)
class Stamped:
    kind: str
    t: int
    tq: str
    mono_ns: int
    body: dict[str, object]


class Stamper:
    """A sink stamping each reading in seq order, as the store writer does."""

    def __init__(self, clock: Clock, ledger: dict[str, int] | None = None) -> None:
        self.clock = clock
        self.records: list[Stamped] = []
        self.ledger: dict[str, int] = ledger if ledger is not None else {}

    def submit(self, reading: Reading,
               on_committed: Callable[[SealedRecord], None] | None = None) -> None:
        self.submit_all([reading], on_committed)

    def submit_all(self, readings: list[Reading],
                   on_committed: Callable[[SealedRecord], None] | None = None) -> None:
        del on_committed
        for r in readings:
            ts = self.clock.timestamp(r.mono_ns)
            self.records.append(Stamped(r.kind, ts.utc_ms, ts.quality, r.mono_ns,
                                        dict(r.body)))
            self.ledger.update(r.ledger)

    def last_committed_event(self, serial: str) -> int | None:
        return self.ledger.get(serial)

    @property
    def backlog(self) -> int:
        return 0


class Rig:
    """The GNSS port's protocol object, a fake clock, and the health thread's clock watch."""

    def __init__(self, *, floor_ms: int | None = FLOOR_MS, synced: bool = False,
                 ledger: dict[str, int] | None = None) -> None:
        self.mono = START_MONO
        self.synced = synced
        self.wall_at_start = ms(WALL_2020) * MS
        self.clock = Clock(synced=lambda: self.synced, wall_ns=self._wall,
                           mono_ns=lambda: self.mono, floor_ms=floor_ms)
        self.clock.observe()  # the gateway's baseline
        self.sink = Stamper(self.clock, ledger)
        self.proto = GnssProtocol("gnss", self.sink, self.clock, fix_interval_s=10,
                                  installed=HOME, ledger=self.sink.last_committed_event)
        self.fed: list[tuple[int, int]] = []  # (mono_ns, offset ms) of every GNSS time
        self._next_watch = self.mono

    def _wall(self) -> int:
        return self.wall_at_start + (self.mono - START_MONO)

    def feed(self, data: bytes, *, after_s: float = 1.0) -> None:
        self.mono += int(after_s * S)
        self.proto.data_received(data, self.mono)
        self.watch()

    def watch(self) -> None:
        """The health thread's clock watch, every :data:`CLOCK_WATCH_S`."""
        while self.mono >= self._next_watch:
            self.sink.submit_all(time_steps(self.clock, GW))
            self._next_watch += int(CLOCK_WATCH_S * S)

    def second(self, *utcs: dt.datetime, extra: bytes = b"") -> None:
        """One second of a receiver printing RMC+GGA for each of *utcs*, then *extra*."""
        data = b"".join(fix_sentences(u, LAT, LON) for u in utcs) + extra
        self.fed.extend((self.mono + S, ms(u) - (self.mono + S) // MS) for u in utcs)
        self.feed(data)

    @property
    def records(self) -> list[Stamped]:
        return self.sink.records


def zda(when: dt.datetime, year: int) -> bytes:
    t = when.strftime("%H%M%S.") + f"{when.microsecond // 10000:02d}"
    return nmea_sentence(f"GPZDA,{t},{when.day:02d},{when.month:02d},{year},00,00")


def steady_runs(fed: list[tuple[int, int]], offset_ms: int) -> list[tuple[int, int]]:
    """(first, last) mono of each run of consecutive GNSS times agreeing with *offset_ms*."""
    runs = []
    for agrees, group in itertools.groupby(fed, key=lambda f: abs(f[1] - offset_ms) <= AGREE_MS):
        items = list(group)
        if agrees:
            runs.append((items[0][0], items[-1][0]))
    return runs


def assert_unpoisoned(rig: Rig, floor_ms: int = FLOOR_MS) -> None:
    """The measurable claims of the issue, over everything the rig recorded."""
    records = rig.records
    assert records, "nothing recorded"
    assert min(r.t for r in records) >= floor_ms
    for prev, rec in itertools.pairwise(records):
        assert rec.t >= prev.t or rec.kind == "time.step", (prev, rec)
    steps = [r.mono_ns for r in records if r.kind == "time.step"]
    assert all(b - a >= STEP_MIN_INTERVAL_NS for a, b in itertools.pairwise(steps))
    verified: list[int] = []  # offsets of far-ahead times already checked
    for i, rec in enumerate(records):
        if i and rec.t == records[i - 1].t:
            continue  # clamped: the previous record's time (checked there)
        floor_then = floor_ms + (rec.mono_ns - START_MONO) // MS
        offset = rec.t - rec.mono_ns // MS
        if rec.t > floor_then + FAR_AHEAD_MS and all(
                abs(offset - v) > AGREE_MS for v in verified):
            # far ahead: only after a run of GNSS times agreeing with it, ten minutes long
            before = [f for f in rig.fed if f[0] <= rec.mono_ns]
            runs = steady_runs(before, offset)
            assert any(last - first >= STEADY_FAR_NS for first, last in runs), (
                year_of(rec.t), rec)
            verified.append(offset)


def test_rmc_date_311279_read_as_2079_is_not_trusted() -> None:
    rig = Rig()
    for i in range(120):
        rig.second(TRUTH + dt.timedelta(seconds=i))
    for i in range(120, 420):  # five minutes of 2079 (RMC date field 311279)
        rig.second((TRUTH + dt.timedelta(seconds=i)).replace(year=2079, month=12, day=31))
    for i in range(420, 500):
        rig.second(TRUTH + dt.timedelta(seconds=i))
    assert_unpoisoned(rig)
    assert {year_of(r.t) for r in rig.records} == {2026}
    assert rig.clock.stats.gnss_holding == 300
    assert [r.body["to"] for r in rig.records if r.kind == "time.step"] == ["gnss"]


def test_zda_2099_beside_true_rmc_is_never_steady() -> None:
    rig = Rig()
    for i in range(900):
        now = TRUTH + dt.timedelta(seconds=i)
        rig.second(now, extra=zda(now, 2099))
    assert_unpoisoned(rig)
    assert {year_of(r.t) for r in rig.records} == {2026}
    assert {r.tq for r in rig.records[3:]} == {"gnss"}
    assert rig.clock.stats.gnss_unsteady >= 899  # each 2099 interrupted by the true RMC


def test_zda_year_9999_is_out_of_range_and_counted() -> None:
    rig = Rig()
    for i in range(30):
        now = TRUTH + dt.timedelta(seconds=i)
        rig.second(now, extra=zda(now, 9999))
    assert rig.proto.reader.stats.out_of_range[FIELD_DATE] == 30
    assert rig.proto.reader.stats.times == 30  # the RMCs only
    assert_unpoisoned(rig)


def test_receiver_flip_flopping_between_2020_and_2079() -> None:
    rig = Rig()
    for i in range(1200):  # twenty minutes, every second the other year
        now = TRUTH + dt.timedelta(seconds=i)
        year = 2020 if i % 2 else 2079
        rig.second(now.replace(year=year))
    assert_unpoisoned(rig)
    assert {r.tq for r in rig.records} == {"unsynced"}  # neither was ever used
    assert [r.kind for r in rig.records if r.kind == "time.step"] == []
    assert rig.clock.stats.gnss_before_floor == 600
    assert rig.clock.stats.gnss_adopted == 0


def test_a_far_ahead_time_is_used_once_steady_for_ten_minutes() -> None:
    rig = Rig()
    ahead = TRUTH + dt.timedelta(days=3)  # e.g. the gateway was off for three days
    for i in range(660):
        rig.second(ahead + dt.timedelta(seconds=i))
    assert_unpoisoned(rig)
    gnss = [r for r in rig.records if r.tq == "gnss"]
    assert gnss
    assert gnss[0].mono_ns - (START_MONO + S) >= STEADY_FAR_NS
    [step] = [r for r in rig.records if r.kind == "time.step"]
    assert step.body["since_last"] == {"gnss_before_floor": 0, "gnss_holding": 600,
                                       "gnss_unsteady": 0, "steps_damped": 0}


def test_far_ahead_time_agreeing_with_ntp_is_used_at_once() -> None:
    rig = Rig(synced=True)
    ahead = TRUTH + dt.timedelta(days=3)
    rig.wall_at_start = ms(ahead) * MS - S
    assert rig.clock.gnss_time(ms(ahead) * MS, rig.mono) is GnssVerdict.USED


def test_flapping_between_two_plausible_times_is_damped() -> None:
    rig = Rig()
    for i in range(1200):  # every 90 s the receiver jumps by two hours, then back
        now = TRUTH + dt.timedelta(seconds=i)
        rig.second(now + dt.timedelta(hours=2) if (i // 90) % 2 else now)
    assert_unpoisoned(rig)
    # the first fix, then the jump once steady for a minute; going back would be below
    # the floor the jumped-to time raised: refused
    assert len([r for r in rig.records if r.kind == "time.step"]) == 2
    assert rig.clock.stats.gnss_before_floor > 500


def test_a_backward_step_goes_back_only_at_its_time_step_record() -> None:
    rig = Rig(synced=True)
    rig.wall_at_start = (ms(TRUTH) + 3_600_000) * MS  # the system clock an hour ahead
    for i in range(200):
        rig.second(TRUTH + dt.timedelta(seconds=i))
        if i == 100:  # NTP steps the system clock back by the hour
            rig.wall_at_start -= 3_600_000 * MS
    assert_unpoisoned(rig)
    backwards = [b for a, b in itertools.pairwise(rig.records) if b.t < a.t]
    assert [b.kind for b in backwards] == ["time.step"]
    assert backwards[0].body["delta_ms"] == -3_600_000


def test_flapping_every_fix_between_two_plausible_times_never_jumps() -> None:
    rig = Rig()
    for i in range(600):
        now = TRUTH + dt.timedelta(seconds=i)
        rig.second(now + dt.timedelta(hours=2) if i % 2 else now)
    assert_unpoisoned(rig)
    assert len([r for r in rig.records if r.kind == "time.step"]) == 1  # the first fix


def test_altitude_of_1e21_dm_never_reaches_a_record() -> None:
    rig = Rig()
    gga = (f"GNGGA,{TRUTH:%H%M%S}.00,4648.6000,N,07112.6000,W,1,08,0.9,"
           "100000000000000000000.0,M,20.1,M,,")
    rig.feed(nmea_sentence(gga))
    fixes = [r for r in rig.records if r.kind == "gnss.fix"]
    assert [f.body["alt_dm"] for f in fixes] == [None]
    assert rig.proto.reader.stats.out_of_range[FIELD_ALT] == 1
    assert [f.alt_dm for f in rig.proto.reader.feed(fix_sentences(TRUTH, LAT, LON), 0)
            if isinstance(f, Fix)] == [None, 450]


def test_no_record_below_the_build_date_without_any_floor() -> None:
    rig = Rig(floor_ms=None)
    for i in range(60):
        rig.second((TRUTH + dt.timedelta(seconds=i)).replace(year=2020))
    assert_unpoisoned(rig, BUILD_FLOOR_MS)
    assert rig.clock.stats.gnss_before_floor == 60


def test_records_from_an_older_instant_are_clamped_not_backwards() -> None:
    clock = Clock(synced=lambda: True, wall_ns=lambda: ms(TRUTH) * MS, mono_ns=lambda: 10 * S)
    first = clock.timestamp(10 * S)
    older = clock.timestamp(10 * S - 5 * MS)  # another port's reading, queued behind
    assert older == Timestamp(first.utc_ms, "ntp", 10_000 - 5)  # its instant stays in mono
    assert clock.stats.clamped == 1


# -- fuzz: any sequence of GNSS times ---------------------------------------------------------
POISON = st.sampled_from([
    dt.timedelta(0), dt.timedelta(hours=2), -dt.timedelta(hours=2), dt.timedelta(days=2),
    dt.datetime(2079, 12, 31, tzinfo=UTC) - TRUTH, dt.datetime(2099, 1, 1, tzinfo=UTC) - TRUTH,
    WALL_2020 - TRUTH, -dt.timedelta(days=1),
])


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@example([(dt.timedelta(days=2), 125, 20, False), (-dt.timedelta(days=2526, seconds=-39600), 1, 2,
          False), (dt.timedelta(0), 37, 1, False), (-dt.timedelta(hours=2), 31, 20, False),
          (dt.timedelta(hours=2), 29, 19, True)])  # NTP below a floor raised by a steady lie
@given(st.lists(st.tuples(POISON, st.integers(1, 300), st.integers(1, 20), st.booleans()),
                min_size=1, max_size=10))
def test_fuzz_any_gnss_sequence_keeps_the_claims(
        segments: list[tuple[dt.timedelta, int, int, bool]]) -> None:
    """Segments of (offset from the truth, fixes, seconds between fixes, NTP synced), fed
    to the clock as the GNSS protocol does (the NMEA path is the tests above)."""
    rig = Rig()
    elapsed = 0
    src = Source("gnss", "port:gnss")
    for shift, count, every_s, synced in segments:
        rig.synced = synced
        if synced:  # NTP has set the system clock right
            rig.wall_at_start = (ms(TRUTH) + elapsed * 1000) * MS - (rig.mono - START_MONO)
        for _ in range(count):
            elapsed += every_s
            rig.mono += every_s * S
            utc_ms = ms(TRUTH + shift) + elapsed * 1000
            rig.fed.append((rig.mono, utc_ms - rig.mono // MS))
            rig.clock.gnss_time(utc_ms * MS, rig.mono)
            rig.sink.submit_all([*time_steps(rig.clock, src),
                                 Reading("gnss.fix", src, {}, rig.mono)])
            rig.watch()
    assert_unpoisoned(rig)


# -- restarts: the floor and the moved state come back from the store ---------------------------
def restart_rig(tmp_path: Path, identity: Identity, clock: Clock) -> Pipeline:
    pipe = Pipeline(tmp_path / "data", identity, NOWHERE, clock=clock, source=GW)
    pipe.start(uplink=False)
    return pipe


def test_moved_state_and_floor_survive_a_restart(tmp_path: Path, identity: Identity) -> None:
    mono = [START_MONO]
    far = dt.timedelta(minutes=0)
    first = Clock(synced=lambda: True, wall_ns=lambda: ms(TRUTH) * MS + (mono[0] - START_MONO),
                  mono_ns=lambda: mono[0])
    pipe = restart_rig(tmp_path, identity, first)
    proto = GnssProtocol("gnss", pipe.writer, first, installed=HOME,
                         ledger=pipe.writer.ledger_value)
    for i in range(90):  # 90 s about 5.5 km north of home: moved
        mono[0] += S
        proto.data_received(fix_sentences(TRUTH + far + dt.timedelta(seconds=i), LAT + 0.05,
                                          LON), mono[0])
    assert pipe.writer.flush()
    assert pipe.writer.ledger_value(MOVED_LEDGER_KEY) == 1
    newest = pipe.reader.newest_record()
    assert newest is not None
    last_t = json.loads(newest)["t"]
    pipe.stop(drain_s=0)

    mono[0] = START_MONO  # a new boot: the monotonic clock starts again
    second = Clock(synced=lambda: False, wall_ns=lambda: ms(WALL_2020) * MS,
                   mono_ns=lambda: mono[0])
    pipe = restart_rig(tmp_path, identity, second)
    try:
        assert second.floor_ms() >= last_t  # the newest record's time
        proto = GnssProtocol("gnss", pipe.writer, second, installed=HOME,
                             ledger=pipe.writer.ledger_value)
        assert proto.monitor.moved
        kinds = []
        for i in range(90):  # back home
            mono[0] += S
            proto.data_received(fix_sentences(TRUTH + dt.timedelta(minutes=5, seconds=i),
                                              LAT, LON), mono[0])
        assert pipe.writer.flush()
        kinds = list(pipe.writer.stats.by_kind)
        assert "gateway.returned" in kinds
        assert "gateway.moved" not in kinds
        assert pipe.writer.ledger_value(MOVED_LEDGER_KEY) == 0
        assert (pipe.writer.ledger_value(FLOOR_LEDGER_KEY) or 0) >= last_t - 60_000
    finally:
        pipe.stop(drain_s=0)


def test_floor_from_the_ledger_once_every_record_is_deleted(tmp_path: Path,
                                                            identity: Identity) -> None:
    mono = [START_MONO]
    clock = Clock(synced=lambda: True, wall_ns=lambda: ms(TRUTH) * MS + (mono[0] - START_MONO),
                  mono_ns=lambda: mono[0])
    pipe = restart_rig(tmp_path, identity, clock)
    proto = GnssProtocol("gnss", pipe.writer, clock, ledger=pipe.writer.ledger_value)
    mono[0] += S
    proto.data_received(fix_sentences(TRUTH, LAT, LON), mono[0])
    assert pipe.writer.flush()
    last_seq = pipe.store.state.last_seq
    for prio, count in pipe.store.usage.items():
        if count[0]:
            pipe.writer.delete_range(int(prio), 1, last_seq, count[0])
    assert pipe.writer.flush()
    assert pipe.reader.newest_record() is None
    pipe.stop(drain_s=0)

    second = Clock(synced=lambda: False, wall_ns=lambda: ms(WALL_2020) * MS,
                   mono_ns=lambda: mono[0])
    pipe = restart_rig(tmp_path, identity, second)
    try:
        assert second.floor_ms() >= ms(TRUTH)
        assert second.gnss_time(ms(WALL_2020) * MS, mono[0]) is GnssVerdict.BEFORE_FLOOR
    finally:
        pipe.stop(drain_s=0)
