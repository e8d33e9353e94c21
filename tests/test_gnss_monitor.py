"""The GNSS monitor, sans-IO: fix records, the moved alarm and its restore, time steps."""

from __future__ import annotations

import datetime as dt

from core.clock import BUILD_FLOOR_MS, Clock
from core.record import Source
from drivers.gnss import GnssMonitor, Installed, distance_m, time_steps
from drivers.nmea import Fix, GnssTime, NmeaReader
from lab.simulators.gnss import fix_sentences

S = 1_000_000_000
SRC = Source("gnss", "port:gnss")
HOME = Installed(468100000, -712100000, radius_m=200, after_s=60)


def fix(t_s: float, lat_e7: int = 468100000, lon_e7: int = -712100000,
        hdop_c: int = 90) -> Fix:
    return Fix(lat_e7, lon_e7, 1, 9, hdop_c, 450, None, "GNGGA", int(t_s * S))


def test_distance_of_a_known_pair() -> None:
    # one thousandth of a degree of latitude is about 111 m
    assert round(distance_m(468100000, -712100000, 468110000, -712100000)) == 111


def test_fix_records_are_rate_limited() -> None:
    mon = GnssMonitor(SRC, fix_interval_s=60)
    kinds = [r.kind for t in range(0, 130) for r in mon.on_fix(fix(t))]
    assert kinds == ["gnss.fix"] * 3  # t = 0, 60, 120


def test_moved_only_after_staying_away_then_returned() -> None:
    mon = GnssMonitor(SRC, fix_interval_s=10**6, installed=HOME)
    far = 468100000 + 50000  # about 556 m north
    assert [r.kind for r in mon.on_fix(fix(0))] == ["gnss.fix"]
    assert [r.kind for t in range(1, 40) for r in mon.on_fix(fix(t, far))] == []
    mon.on_fix(fix(40))  # back in range before the minute: the timer starts again
    out = [r for t in range(41, 102) for r in mon.on_fix(fix(t, far))]
    assert [r.kind for r in out] == ["gateway.moved"]
    assert out[0].priority.label == "alarm"
    assert 540 < int(out[0].body["distance_m"]) < 570
    assert [r.kind for t in range(102, 161) for r in mon.on_fix(fix(t))] == []
    assert [r.kind for r in mon.on_fix(fix(162))] == ["gateway.returned"]


def test_poor_geometry_decides_nothing() -> None:
    mon = GnssMonitor(SRC, fix_interval_s=10**6, installed=HOME)
    far = 468100000 + 50000
    kinds = {r.kind for t in range(0, 200) for r in mon.on_fix(fix(t, far, hdop_c=900))}
    assert kinds == {"gnss.fix"}
    assert not mon.moved


def test_zda_needs_a_fresh_fix_rmc_does_not() -> None:
    mon = GnssMonitor(SRC)
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    assert mon.trusts(GnssTime(now, 5 * S, "RMC"))
    assert not mon.trusts(GnssTime(now, 5 * S, "ZDA"))
    mon.on_fix(fix(1))
    assert mon.trusts(GnssTime(now, 5 * S, "ZDA"))
    assert not mon.trusts(GnssTime(now, 30 * S, "ZDA"))


def test_gnss_time_disciplines_an_unsynced_clock_and_the_step_is_a_record() -> None:
    mono = [100 * S]
    wall_ns = int(dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp() * 1e9)  # days wrong
    clock = Clock(synced=lambda: False, wall_ns=lambda: wall_ns, mono_ns=lambda: mono[0])
    assert clock.observe() is None
    assert clock.timestamp(mono[0]).quality == "unsynced"
    assert time_steps(clock, SRC) == []
    truth = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
    clock.gnss_time(int(truth.timestamp() * 1e9), mono[0])
    steps = time_steps(clock, SRC)
    assert [r.kind for r in steps] == ["time.step"]
    body = steps[0].body
    assert (body["from"], body["to"]) == ("unsynced", "gnss")
    assert body["to_utc_ms"] == int(truth.timestamp() * 1000)
    # the system clock said 2020: unsynced time never goes below the build date
    assert body["from_utc_ms"] == BUILD_FLOOR_MS
    assert body["delta_ms"] == 12 * 3600 * 1000
    mono[0] += 5 * S
    ts = clock.timestamp(mono[0])
    assert (ts.quality, ts.utc_ms) == ("gnss", int(truth.timestamp() * 1000) + 5000)
    assert time_steps(clock, SRC) == []  # no new step


def test_simulator_sentences_read_back_exactly() -> None:
    when = dt.datetime(2026, 11, 29, 8, 30, 15, 500000, tzinfo=dt.UTC)
    events = NmeaReader().feed(fix_sentences(when, 46.81, -71.21), 1)
    fixes = [e for e in events if isinstance(e, Fix)]
    times = [e for e in events if isinstance(e, GnssTime)]
    assert {(f.lat_e7, f.lon_e7) for f in fixes} == {(468100000, -712100000)}
    assert times[0].utc == when
