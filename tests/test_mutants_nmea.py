"""NMEA reader: exact values, boundaries and counters that mutation testing found unchecked.

Sentences are written as the receiver prints them (checksums computed); each test pins
one thing down: a field's exact integer (and that it is an ``int``: ``==`` alone lets
``46.0 == 46`` pass), a boundary on each side, a counter. docs/mutation.md has the run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import reduce
from operator import xor

import pytest

from drivers.nmea import (
    BAD_ADDRESS,
    BAD_CHECKSUM_FIELD,
    MAX_LINE,
    NO_CHECKSUM,
    TOO_LONG,
    ChecksumMismatch,
    Fix,
    Fragment,
    GnssTime,
    NmeaReader,
    Sentence,
    SentenceFramer,
)

HOUR_NS = 3600 * 10**9


def nmea(body: str) -> bytes:
    checksum = reduce(xor, body.encode("ascii"), 0)
    return f"${body}*{checksum:02X}\r\n".encode("ascii")


def gga(*, time: str = "123519.00", lat: str = "4807.038", ns: str = "N", lon: str = "01131.000",
        ew: str = "E", quality: str = "1", sats: str = "08", hdop: str = "0.9",
        alt: str = "545.4", alt_unit: str = "M") -> bytes:
    return nmea(f"GPGGA,{time},{lat},{ns},{lon},{ew},{quality},{sats},{hdop},{alt},{alt_unit},"
                "46.9,M,,")


def rmc(*, time: str = "123519.00", date: str = "230324", status: str = "A",
        lat: str = "4807.038", lon: str = "01131.000", mode: str = "A") -> bytes:
    return nmea(f"GNRMC,{time},{status},{lat},N,{lon},E,0.0,0.0,{date},,,{mode}")


def one_fix(data: bytes, reader: NmeaReader | None = None, mono_ns: int = 0) -> Fix:
    events = (reader or NmeaReader()).feed(data, mono_ns)
    [fix] = [e for e in events if isinstance(e, Fix)]
    return fix


def assert_ints(fix: Fix) -> None:
    for name in ("lat_e7", "lon_e7", "quality", "sats", "hdop_c", "alt_dm", "mono_ns"):
        value = getattr(fix, name)
        assert value is None or type(value) is int, (name, value)


# -- framer ---------------------------------------------------------------------------------
def test_fragments_keep_the_head_a_technician_needs() -> None:
    framer = SentenceFramer()
    long_run = b"$GPGGA," + b"1," * 100
    frames = framer.feed(long_run + b"\r\n" + b"$GPGGA,1,2\r\n" + b"$GPHDT,,T*G1\r\n"
                         + b"$GPHDT,,T*1G\r\n" + b"$GPHDT,,T*1C\r\n")
    assert frames == [
        Fragment(TOO_LONG, long_run[:12]),
        Fragment(NO_CHECKSUM, b"$GPGGA,1,2"),
        Fragment(BAD_CHECKSUM_FIELD, b"$GPHDT,,T*"),
        Fragment(BAD_CHECKSUM_FIELD, b"$GPHDT,,T*"),
        ChecksumMismatch("GPHDT,,T", 0x1C, 0x1B),
    ]


def test_a_too_long_run_is_discarded_across_reads_then_the_next_sentence_is_read() -> None:
    framer = SentenceFramer()
    assert framer.feed(b"$" + b"A" * 200) == [Fragment(TOO_LONG, b"$" + b"A" * 11)]
    assert framer.buffered == 0
    assert framer.feed(b"A" * 300) == []  # still the same run: nothing buffered, no report
    assert framer.buffered == 0
    assert framer.feed(b"AA\r\n" + nmea("GPHDT,,T")) == [Sentence("GPHDT,,T")]


def test_an_unfinished_sentence_is_buffered_until_its_end() -> None:
    reader = NmeaReader()
    data = nmea("GPHDT,,T")
    assert reader.feed(data[:8], 0) == []
    assert reader.buffered == 8
    assert reader.feed(data[8:-3], 0) == []  # up to "*" and one digit
    assert reader.buffered == len(data) - 3
    reader.feed(data[-3:], 0)
    assert reader.buffered == 0
    assert reader.stats.sentences_ok == 1


def test_noise_bytes_are_counted_line_ends_are_not() -> None:
    reader = NmeaReader()
    reader.feed(b"ab\r\ncd\n\xb5b" + nmea("GPHDT,,T") + b"\x00$\x01" + b"\r\n", 0)
    assert reader.stats.bytes_skipped == 4 + 2 + 3  # ab cd, \xb5 b, \x00 $ \x01
    assert reader.stats.sentences_ok == 1
    assert reader.stats.rejected == 0


@pytest.mark.parametrize("max_line", [15, 0])
def test_max_line_below_16_is_refused_with_the_reason(max_line: int) -> None:
    with pytest.raises(ValueError, match=rf"^max_line must be at least 16, got {max_line}$"):
        NmeaReader(max_line)


def test_max_line_of_16_is_the_smallest_accepted() -> None:
    reader = NmeaReader(16)
    assert reader.max_line == 16
    assert NmeaReader().max_line == MAX_LINE
    assert reader.feed(nmea("GPHDT,,T"), 0) == []  # 14 bytes from $ to the checksum
    assert reader.stats.sentences_ok == 1


# -- the reader's counters -----------------------------------------------------------------
def test_counters_by_type_talker_and_reason() -> None:
    reader = NmeaReader()
    data = (gga() + gga() + rmc() + nmea("GPGSV,1,1,00") + nmea("GPTXT,01,01,02,x")
            + nmea("PGRME,1.7,M,2.4,M,3.0,M") + nmea("gpgga,1") + b"$GPHDT,,T*00\r\n"
            + b"$GPGGA,1,2\r\n")
    reader.feed(data, 0)
    stats = reader.stats
    assert stats.sentences_ok == 6
    assert stats.by_type == {"GGA": 2, "RMC": 1, "GSV": 1, "TXT": 1, "PGRME": 1}
    assert stats.by_talker == {"GP": 4, "GN": 1, "P": 1}
    assert stats.skipped_types == 2
    assert stats.checksum_errors == 1
    assert (stats.rejected, stats.rejected_by_reason) == (2, {BAD_ADDRESS: 1, NO_CHECKSUM: 1})
    assert (stats.fixes, stats.times) == (3, 1)


# -- fixes: exact integers ---------------------------------------------------------------
def test_gga_fix_is_exact_integers() -> None:
    fix = one_fix(gga(), mono_ns=42)
    assert fix == Fix(lat_e7=481_173_000, lon_e7=115_166_667, quality=1, sats=8, hdop_c=90,
                      alt_dm=5454, utc=None, sentence="GPGGA", mono_ns=42)
    assert_ints(fix)


def test_south_and_west_are_negative() -> None:
    fix = one_fix(gga(ns="S", ew="W"))
    assert (fix.lat_e7, fix.lon_e7) == (-481_173_000, -115_166_667)
    assert_ints(fix)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("hdop", "0.125", 12),  # half to even
        ("hdop", "0.135", 14),
        ("hdop", "0", 0),
        ("hdop", "-1.0", None),  # negative: no HDOP
        ("hdop", "", None),
        ("hdop", "1.2.3", None),
        ("alt", "-12.35", -124),
        ("alt", "0.05", 0),
        ("alt", "0.15", 2),
        ("sats", "", None),
        ("sats", "12", 12),
        ("sats", "x", None),
    ],
)
def test_optional_gga_fields(field: str, value: str, expected: int | None) -> None:
    fix = one_fix(gga(**{field: value}))
    attr = {"hdop": "hdop_c", "alt": "alt_dm", "sats": "sats"}[field]
    assert getattr(fix, attr) == expected
    assert_ints(fix)


def test_altitude_in_another_unit_is_left_out() -> None:
    assert one_fix(gga(alt_unit="F")).alt_dm is None


@pytest.mark.parametrize(
    ("lat", "ns", "lon", "ew", "expected"),
    [
        ("9000.000", "N", "18000.000", "E", (900_000_000, 1_800_000_000)),  # the very edges
        ("9000.000", "S", "18000.000", "W", (-900_000_000, -1_800_000_000)),
        ("0000.000", "N", "00100.000", "E", (0, 10_000_000)),  # on the equator
        ("0100.000", "N", "00000.000", "E", (10_000_000, 0)),  # on the meridian
        ("0000.000006", "N", "00000.000", "E", (1, 0)),  # 1e-7 degrees: not 0/0
        ("4559.99999", "N", "00600.0", "E", (459_999_998, 60_000_000)),
    ],
)
def test_positions_at_the_edges(lat: str, ns: str, lon: str, ew: str,
                                expected: tuple[int, int]) -> None:
    fix = one_fix(gga(lat=lat, ns=ns, lon=lon, ew=ew))
    assert (fix.lat_e7, fix.lon_e7) == expected
    assert_ints(fix)


@pytest.mark.parametrize(
    ("lat", "ns", "lon", "ew"),
    [
        ("9000.001", "N", "00100.000", "E"),  # past the pole
        ("9100.000", "N", "00100.000", "E"),
        ("4760.000", "N", "00100.000", "E"),  # 60 minutes
        ("4807.038", "N", "18000.001", "E"),
        ("4807.038", "N", "18100.000", "W"),
        ("4807.038", "N", "00160.000", "E"),
        ("0000.000", "N", "00000.000", "E"),  # 0/0: "no position"
        ("0000.000", "S", "00000.000", "W"),
        ("4807.038", "X", "01131.000", "E"),
        ("4807.038", "N", "01131.000", "X"),
        ("4807.038", "", "01131.000", "E"),
    ],
)
def test_positions_out_of_range_give_no_fix_and_are_counted(lat: str, ns: str, lon: str,
                                                            ew: str) -> None:
    reader = NmeaReader()
    assert reader.feed(gga(lat=lat, ns=ns, lon=lon, ew=ew), 0) == []
    assert (reader.stats.invalid_fixes, reader.stats.fixes) == (1, 0)


def test_rmc_with_a_position_out_of_range_still_gives_the_time() -> None:
    reader = NmeaReader()
    assert reader.feed(rmc(lat="9100.000"), 3) == [
        GnssTime(datetime(2024, 3, 23, 12, 35, 19, tzinfo=UTC), 3, "RMC")]
    assert (reader.stats.invalid_fixes, reader.stats.fixes, reader.stats.times) == (1, 0, 1)


def test_no_fix_quality_is_not_an_invalid_fix() -> None:
    reader = NmeaReader()
    assert reader.feed(gga(quality="0", lat="", lon="") + gga(quality="7"), 0) == []
    assert reader.stats.invalid_fixes == 0


# -- time -----------------------------------------------------------------------------------
def test_rmc_gives_time_and_a_dated_fix() -> None:
    reader = NmeaReader()
    events = reader.feed(rmc(time="235959.25", date="311279"), 7)
    utc = datetime(2079, 12, 31, 23, 59, 59, 250_000, tzinfo=UTC)
    assert events == [
        GnssTime(utc, 7, "RMC"),
        Fix(481_173_000, 115_166_667, 1, None, None, None, utc, "GNRMC", 7),
    ]
    assert (reader.stats.times, reader.stats.fixes) == (1, 1)


@pytest.mark.parametrize(
    ("time", "micro"),
    [("120000", 0), ("120000.", 0), ("120000.5", 500_000), ("120000.1234567", 123_456)],
)
def test_fractions_of_a_second(time: str, micro: int) -> None:
    [event, _] = NmeaReader().feed(rmc(time=time, date="010124"), 0)
    assert event == GnssTime(datetime(2024, 1, 1, 12, 0, 0, micro, tzinfo=UTC), 0, "RMC")


@pytest.mark.parametrize("time", ["235960", "240000", "236000", "1200", "12000a", ""])
def test_impossible_times_give_no_time(time: str) -> None:
    reader = NmeaReader()
    events = reader.feed(rmc(time=time, date="010124"), 0)
    assert [type(e) for e in events] == [Fix]  # the position still counts
    assert events[0].utc is None


@pytest.mark.parametrize(
    ("date", "year"),
    [("010100", 2000), ("311279", 2079), ("010180", None), ("311299", None), ("320124", None),
     ("011324", None), ("0101240", None)],
)
def test_rmc_two_digit_years(date: str, year: int | None) -> None:
    events = NmeaReader().feed(rmc(date=date), 0)
    times = [e for e in events if isinstance(e, GnssTime)]
    assert [t.utc.year for t in times] == ([year] if year else [])


@pytest.mark.parametrize(
    ("mode", "status", "is_fix"),
    [("A", "A", True), ("D", "A", True), ("", "A", True), ("N", "A", False), ("M", "A", False),
     ("S", "A", False), ("A", "V", False)],
)
def test_rmc_status_and_mode(mode: str, status: str, is_fix: bool) -> None:
    events = NmeaReader().feed(rmc(mode=mode, status=status), 0)
    assert [type(e) for e in events] == ([GnssTime, Fix] if is_fix else [])


def test_zda_gives_trusted_time() -> None:
    reader = NmeaReader()
    assert reader.feed(nmea("GPZDA,201530.00,04,07,2002,00,00"), 5) == [
        GnssTime(datetime(2002, 7, 4, 20, 15, 30, tzinfo=UTC), 5, "ZDA")]
    assert reader.feed(nmea("GPZDA,201530.00,04,07,1999,00,00"), 5) == []
    assert reader.feed(nmea("GPZDA,201530.00,31,04,2002,00,00"), 5) == []
    assert reader.stats.times == 1


@pytest.mark.parametrize(
    ("rmc_time", "gga_time", "after_ns", "expected"),
    [
        # GGA just before midnight, one second after a time just past it: the day before
        ("000001.00", "235959.00", 10**9, datetime(2024, 3, 1, 23, 59, 59, tzinfo=UTC)),
        # GGA just past midnight, after a time just before it: the next day
        ("235959.00", "000001.00", 2 * 10**9, datetime(2024, 3, 3, 0, 0, 1, tzinfo=UTC)),
        # the same time of day 25 hours later: the date follows the monotonic clock
        ("120000.00", "120000.00", 25 * HOUR_NS, datetime(2024, 3, 3, 12, 0, 0, tzinfo=UTC)),
        # 11 hours earlier on the same day, not 13 hours later on the next
        ("230000.00", "120000.00", 0, datetime(2024, 3, 2, 12, 0, 0, tzinfo=UTC)),
    ],
)
def test_gga_is_dated_nearest_to_the_last_trusted_time(rmc_time: str, gga_time: str,
                                                       after_ns: int, expected: datetime) -> None:
    reader = NmeaReader()
    reader.feed(rmc(time=rmc_time, date="020324"), 1000)
    assert one_fix(gga(time=gga_time), reader, mono_ns=1000 + after_ns).utc == expected


def test_gga_mono_clock_is_read_in_nanoseconds() -> None:
    reader = NmeaReader()
    reader.feed(rmc(time="120000.00", date="020324"), 0)
    # 13 hours later by the monotonic clock: 01:00 on the next day, not on this one
    assert one_fix(gga(time="010000.00"), reader, mono_ns=13 * HOUR_NS).utc == datetime(
        2024, 3, 3, 1, 0, 0, tzinfo=UTC)
    # 11 hours later: 23:00 on the same day
    assert one_fix(gga(time="230000.00"), reader, mono_ns=11 * HOUR_NS).utc == datetime(
        2024, 3, 2, 23, 0, 0, tzinfo=UTC)


# -- found by the second run --------------------------------------------------------------
def test_a_too_long_run_cut_at_a_read_boundary_then_a_sentence() -> None:
    framer = SentenceFramer()
    assert framer.feed(b"$" + b"A" * 200) == [Fragment(TOO_LONG, b"$" + b"A" * 11)]
    # the next read starts with the next sentence: the run ended right before it
    assert framer.feed(nmea("GPHDT,,T")) == [Sentence("GPHDT,,T")]
    assert framer.bytes_skipped == 0


def test_bytes_of_a_discarded_run_are_not_noise_the_bytes_after_it_are() -> None:
    framer = SentenceFramer()
    framer.feed(b"$" + b"A" * 200)
    framer.feed(b"A" * 300)
    assert framer.bytes_skipped == 0  # part of the rejected run
    framer.feed(b"AA*00\r\n")  # the run ends at "*": "*00" is noise
    assert framer.bytes_skipped == 3
    framer.feed(b"xy\r\n")  # no longer discarding: noise
    assert framer.bytes_skipped == 5


def test_invalid_fixes_and_checksum_errors_add_up() -> None:
    reader = NmeaReader()
    reader.feed(gga(lat="9100.000") + gga(lon="") + b"$GPHDT,,T*00\r\n$GPHDT,,T*01\r\n", 0)
    assert (reader.stats.invalid_fixes, reader.stats.checksum_errors) == (2, 2)


def test_rmc_without_a_date_is_dated_by_the_last_trusted_time() -> None:
    reader = NmeaReader()
    reader.feed(nmea("GPZDA,120000.00,02,03,2024,00,00"), 0)
    fix = one_fix(rmc(time="120001.00", date=""), reader, mono_ns=10**9)
    assert fix.utc == datetime(2024, 3, 2, 12, 0, 1, tzinfo=UTC)
    assert reader.stats.times == 1  # a fix, not a trusted time


@pytest.mark.parametrize("fields", ["201530.00,04,07,,00,00", "201530.00,04,,2002,00,00",
                                    "201530.00,,07,2002,00,00", ",04,07,2002,00,00"])
def test_zda_with_a_field_missing_gives_no_time(fields: str) -> None:
    reader = NmeaReader()
    assert reader.feed(nmea(f"GPZDA,{fields}"), 0) == []
    assert reader.stats.times == 0


def test_the_date_follows_the_monotonic_clock_from_the_trusted_time_not_from_zero() -> None:
    reader = NmeaReader()
    trusted_at = 50 * HOUR_NS
    reader.feed(rmc(time="235959.00", date="020324"), trusted_at)
    assert one_fix(gga(time="000001.00"), reader, mono_ns=trusted_at + 2 * 10**9).utc == \
        datetime(2024, 3, 3, 0, 0, 1, tzinfo=UTC)


def test_monotonic_nanoseconds_become_whole_microseconds() -> None:
    reader = NmeaReader()
    reader.feed(rmc(time="120000.00", date="020324"), 0)
    # 24 h 30 s later: 12:00:30 on the 3rd, nearer midnight of the 4th than of the 3rd
    assert one_fix(gga(time="000000.00"), reader, mono_ns=(24 * 3600 + 30) * 10**9).utc == \
        datetime(2024, 3, 4, 0, 0, 0, tzinfo=UTC)
    # 24 h and 999 ns: exactly noon (the 999 ns are dropped), halfway between two
    # midnights: the earlier one
    assert one_fix(gga(time="000000.00"), reader, mono_ns=24 * HOUR_NS + 999).utc == \
        datetime(2024, 3, 3, 0, 0, 0, tzinfo=UTC)


def test_rejections_and_checksum_errors_are_logged_with_their_head(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad_address = "gpgga," + "1" * 60
    with caplog.at_level("DEBUG", logger="drivers.nmea"):
        NmeaReader().feed(nmea(bad_address) + b"$GPHDT,,T*1C\r\n"
                          + b"$GPGGA," + b"1," * 40 + b"*00\r\n", 0)
    assert caplog.messages == [
        f"nmea: rejected (bad_address): {bad_address[:40]!r}",
        "nmea: checksum 1C != 1B in 'GPHDT,,T'",
        f"nmea: checksum 00 != 7A in {('GPGGA,' + '1,' * 40)[:40]!r}",
    ]


# -- range checks (drivers/nmea.py: MAX_PLAUSIBLE_YEAR, MIN/MAX_ALT_DM, MAX_HDOP_C, MAX_SATS)
@pytest.mark.parametrize(
    ("field", "highest", "above"),
    [("alt", "10000.0", "10000.1"), ("alt", "-1000.0", "-1000.1"), ("hdop", "99.99", "100.00"),
     ("sats", "99", "100")],
)
def test_fix_fields_at_their_limits_are_kept_and_beyond_are_dropped_and_counted(
    field: str, highest: str, above: str, caplog: pytest.LogCaptureFixture,
) -> None:
    attr = {"hdop": "hdop_c", "alt": "alt_dm", "sats": "sats"}[field]
    reader = NmeaReader()
    assert getattr(one_fix(gga(**{field: highest}), reader), attr) is not None
    with caplog.at_level("DEBUG", logger="drivers.nmea"):
        assert getattr(one_fix(gga(**{field: above}), reader), attr) is None
        assert getattr(one_fix(gga(**{field: above}), reader), attr) is None
    assert reader.stats.out_of_range == {field: 2}
    assert caplog.messages == [f"nmea: {field} out of range"] * 2


def test_zda_years_up_to_2099_and_no_further(caplog: pytest.LogCaptureFixture) -> None:
    reader = NmeaReader()
    assert reader.feed(nmea("GPZDA,000000.00,31,12,2099,00,00"), 0) == [
        GnssTime(datetime(2099, 12, 31, tzinfo=UTC), 0, "ZDA")]
    with caplog.at_level("DEBUG", logger="drivers.nmea"):
        assert reader.feed(nmea("GPZDA,000000.00,01,01,2100,00,00")
                           + nmea("GPZDA,000000.00,30,02,2024,00,00"), 0) == []
    assert reader.stats.out_of_range == {"date": 2}
    assert caplog.messages == ["nmea: date 2100-01-01 out of range",
                               "nmea: date 2024-02-30 out of range"]
