"""GNSS side: the sans-IO NMEA reader, its pynmea2 pitfalls, real captures, the replay command.

The captures are gpsd's regression logs from real receivers (../shared/data/nmea, read in
place). Each is fed whole and in seeded random chunks; the counts in CAPTURES were checked
against the files by hand and by an independent line-by-line count.
"""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime
from fractions import Fraction
from functools import reduce
from operator import xor
from pathlib import Path

import pynmea2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.nmea_replay import Progress, capture_chunks, main
from drivers.nmea import (
    BAD_ADDRESS,
    BAD_CHECKSUM_FIELD,
    E7,
    FIELD_ALT,
    FIELD_DATE,
    FIELD_HDOP,
    FIELD_SATS,
    MAX_ALT_DM,
    MAX_HDOP_C,
    MAX_LINE,
    MAX_PLAUSIBLE_YEAR,
    MAX_SATS,
    MIN_ALT_DM,
    MIN_PLAUSIBLE_YEAR,
    NO_CHECKSUM,
    TOO_LONG,
    UNPARSABLE,
    ChecksumMismatch,
    Fix,
    Fragment,
    GnssTime,
    NmeaReader,
    NmeaStats,
    Sentence,
    SentenceFramer,
)

NMEA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nmea"
HYPOTHESIS = settings(
    max_examples=150, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def nmea(body: str, *, end: str = "\r\n") -> bytes:
    """``$body*hh`` with the right checksum: fixtures read as the receiver prints them."""
    checksum = reduce(xor, body.encode("ascii"), 0)
    return f"${body}*{checksum:02X}{end}".encode("ascii")


def feed_all(data: bytes, max_line: int = MAX_LINE) -> tuple[NmeaReader, list[Fix | GnssTime]]:
    reader = NmeaReader(max_line)
    return reader, reader.feed(data, 0)


def feed_chunks(data: bytes, sizes: list[int] | random.Random,
                max_line: int = MAX_LINE) -> tuple[NmeaReader, list[Fix | GnssTime]]:
    reader = NmeaReader(max_line)
    events: list[Fix | GnssTime] = []
    pos = 0
    i = 0
    while pos < len(data):
        if isinstance(sizes, random.Random):
            size = sizes.randint(1, 64)
        else:
            size = sizes[i % len(sizes)] if sizes else len(data)
        events += reader.feed(data[pos : pos + size], 0)
        assert reader.buffered <= max_line
        pos += size
        i += 1
    return reader, events


def fixes(events: list[Fix | GnssTime]) -> list[Fix]:
    return [e for e in events if isinstance(e, Fix)]


def times(events: list[Fix | GnssTime]) -> list[GnssTime]:
    return [e for e in events if isinstance(e, GnssTime)]


def utc(text: str) -> datetime:
    """``utc("2024-03-23 12:35:19.5")``: a tz-aware UTC datetime, readable in asserts."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# ----------------------------------------------------------------------------------------
# Framing: '$' ... '*hh' wherever it sits
# ----------------------------------------------------------------------------------------
GGA = "GPGGA,123519.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
RMC = "GPRMC,123519.00,A,4807.038,N,01131.000,E,022.4,084.4,230324,003.1,W,A"


def test_one_sentence_byte_by_byte() -> None:
    framer = SentenceFramer()
    frames = []
    for byte in nmea(GGA):
        frames += framer.feed(bytes([byte]))
        assert framer.buffered < MAX_LINE
    assert frames == [Sentence(GGA)]
    assert framer.buffered == 0
    assert framer.bytes_skipped == 0  # line ends are not noise


def test_sentences_run_together_and_after_binary() -> None:
    ubx = bytes.fromhex("b5 62 0a 04 dc 00 24 13 fe 00")  # a UBX frame holding a '$' byte
    data = ubx + nmea(GGA, end="") + nmea(RMC, end="") + b"\x00\xff" + nmea(GGA)
    assert SentenceFramer().feed(data) == [Sentence(GGA), Sentence(RMC), Sentence(GGA)]


def test_cut_line_then_next_sentence() -> None:
    cut = nmea(RMC)[:40]  # the receiver was reset mid-line
    frames = SentenceFramer().feed(cut + b"\r\n" + nmea(GGA))
    assert frames == [Fragment(NO_CHECKSUM, cut), Sentence(GGA)]


def test_cut_line_glued_to_next_sentence() -> None:
    frames = SentenceFramer().feed(nmea(RMC)[:30] + nmea(GGA))
    assert [type(f) for f in frames] == [Fragment, Sentence]
    assert frames[1] == Sentence(GGA)


def test_checksum_mismatch_is_reported_not_parsed() -> None:
    bad = nmea(GGA).replace(b"4807.038", b"4807.039")
    frames = SentenceFramer().feed(bad)
    assert len(frames) == 1
    assert isinstance(frames[0], ChecksumMismatch)
    assert frames[0].stated != frames[0].computed
    reader, events = feed_all(bad)
    assert events == []
    assert (reader.stats.sentences_ok, reader.stats.checksum_errors) == (0, 1)


def test_lowercase_checksum_digits_accepted() -> None:
    body = "GPGSA,A,3,04,05,,09,12,,,24,,,,,2.5,1.3,2.1"
    line = nmea(body).decode().lower().replace(body.lower(), body).encode()
    assert SentenceFramer().feed(line) == [Sentence(body)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"$GPGGA,123519,4807.038,N\r\n", NO_CHECKSUM, id="no checksum"),
        pytest.param(b"$GPHDT,,T*\r\n", BAD_CHECKSUM_FIELD, id="no checksum digits"),
        pytest.param(b"$GPHDT,,T*1G\r\n", BAD_CHECKSUM_FIELD, id="non-hex digit"),
        pytest.param(b"$GPGGA,12\x1b[H\x1b[J3519*00\r\n", NO_CHECKSUM, id="ANSI escape inside"),
    ],
)
def test_fragments_are_rejected_and_counted(data: bytes, reason: str) -> None:
    reader, events = feed_all(data + nmea("GPHDT,,T"))
    assert events == []
    assert reader.stats.rejected == 1
    assert reader.stats.rejected_by_reason == {reason: 1}
    assert reader.stats.by_type == {"HDT": 1}  # the next sentence is still read


def test_lone_dollar_in_binary_is_noise_not_a_fragment() -> None:
    reader, _ = feed_all(b"\xb5\x62$\x01\x02$\xff" + nmea("GPHDT,,T"))
    assert reader.stats.rejected == 0
    assert reader.stats.bytes_skipped == 7


def test_too_long_run_is_rejected_without_buffering() -> None:
    reader = NmeaReader(max_line=40)
    reader.feed(b"$GPTXT,", 0)
    for _ in range(100):  # a '$' then endless text: never held beyond max_line
        reader.feed(b"A" * 30, 0)
        assert reader.buffered <= 40
    events = reader.feed(b"*00\r\n" + nmea("GPHDT,,T") + b"$" + b"B" * 40 + nmea("GPHDT,,T"), 0)
    assert events == []
    assert reader.stats.rejected_by_reason == {TOO_LONG: 2}
    assert reader.stats.by_type == {"HDT": 2}


def test_sentence_of_exactly_max_line_is_accepted() -> None:
    body = "GPTXT,01,01,02," + "x" * 20
    line = nmea(body, end="")
    framer = SentenceFramer(max_line=len(line))
    assert framer.feed(line) == [Sentence(body)]
    assert SentenceFramer(max_line=len(line) - 1).feed(line) == [
        Fragment(TOO_LONG, line[:12])
    ]


def test_max_line_below_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="max_line"):
        NmeaReader(max_line=8)


def test_empty_feed_and_state_across_calls() -> None:
    reader = NmeaReader()
    assert reader.feed(b"", 0) == []
    line = nmea(GGA)
    assert reader.feed(line[:10], 0) == []
    assert reader.buffered == 10
    assert len(reader.feed(line[10:], 0)) == 1
    assert reader.buffered == 0


# ----------------------------------------------------------------------------------------
# Sentence handling: addresses, talkers, types
# ----------------------------------------------------------------------------------------
def test_unknown_types_and_proprietary_are_counted_and_skipped() -> None:
    data = nmea("GNGNS,213712.000,4111.59903,N,11156.54809,W,AANN,13,0.93,01482.5,-016.5,,")
    data += nmea("PSTMCPU,54.57,-1,98") + nmea("PGRME,1.7,M,2.4,M,3.0,M") + nmea("GPTXT,01,01,02,x")
    reader, events = feed_all(data)
    assert events == []  # GNS carries a position, but fixes come from GGA/RMC only
    assert reader.stats.sentences_ok == 4
    assert reader.stats.skipped_types == 4
    assert reader.stats.by_type == {"GNS": 1, "PSTMCPU": 1, "PGRME": 1, "TXT": 1}
    assert reader.stats.by_talker == {"GN": 1, "P": 2, "GP": 1}


def test_other_talkers_are_counted_and_still_decoded() -> None:
    reader, events = feed_all(nmea(GGA.replace("GPGGA", "QZGGA")))
    assert [f.sentence for f in fixes(events)] == ["QZGGA"]
    assert reader.stats.by_talker == {"QZ": 1}


@pytest.mark.parametrize(
    "body", ["", ",,,", "gpgga,1,2", "GP GGA,1", "GPGGAX,1", "G1,2", "1PGRME,1"]
)
def test_bad_address_is_rejected(body: str) -> None:
    reader, events = feed_all(nmea(body))
    assert events == []
    assert reader.stats.rejected_by_reason == {BAD_ADDRESS: 1}
    assert reader.stats.sentences_ok == 0


# ----------------------------------------------------------------------------------------
# pynmea2 pitfalls: each shown in pynmea2, then handled by the reader
# ----------------------------------------------------------------------------------------
def test_pitfall_empty_position_reads_zero_in_pynmea2_and_gives_no_fix() -> None:
    no_position = "GPGGA,120000.00,,,,,1,05,1.2,,,,,,"  # claims quality 1, position empty
    msg = pynmea2.parse(no_position)
    assert (msg.latitude, msg.longitude) == (0.0, 0.0)  # pynmea2 invents 0/0
    rmc = "GPRMC,120000.00,A,,,,,0.0,,230324,,,A"
    assert pynmea2.parse(rmc).latitude == 0.0

    reader, events = feed_all(nmea(no_position) + nmea(rmc))
    assert fixes(events) == []
    assert reader.stats.invalid_fixes == 2
    assert reader.stats.sentences_ok == 2
    assert len(times(events)) == 1  # the RMC's date and time are still valid


def test_pitfall_properties_raise_on_empty_fields() -> None:
    empty_rmc = "GPRMC,,V,,,,,,,,,,N"
    empty_zda = "GPZDA,,,,,00,00"
    empty_gsa = "GPGSA,A,,,,,,,,,,,,,,,,"
    with pytest.raises(TypeError):
        _ = pynmea2.parse(empty_rmc).datetime
    with pytest.raises(TypeError):
        _ = pynmea2.parse(empty_zda).datetime
    with pytest.raises(ValueError, match="invalid literal"):
        _ = pynmea2.parse(empty_gsa).is_valid
    with pytest.raises(ValueError, match="not valid"):
        _ = pynmea2.parse("GPGGA,1,4404,N,12118.8515,W,1,10,,,,,,,").latitude

    data = b"".join(nmea(b) for b in (empty_rmc, empty_zda, empty_gsa, "GPGGA,,,,,,0,,,,,,,,"))
    reader, events = feed_all(data)
    assert events == []
    assert reader.stats.sentences_ok == 4
    assert reader.stats.rejected == 0


def test_pitfall_failed_conversion_returns_the_raw_string() -> None:
    bad = "GPGGA,12x519,4807.038,N,01131.000,E,x,08,0.9,545.4,M,46.9,M,,"
    msg = pynmea2.parse(bad)
    assert msg.gps_qual == "x"  # declared int, comes back as str
    assert msg.timestamp == "12x519"
    reader, events = feed_all(nmea(bad))
    assert events == []
    assert reader.stats.sentences_ok == 1


def test_pitfall_nmea41_rmc_nav_status_is_not_a_validity_flag() -> None:
    # u-blox NMEA 4.11: mode D, nav status V ("not provided"); pynmea2 calls it invalid.
    body = "GNRMC,223745.00,A,3806.62964,N,12237.61382,W,0.040,,110720,,,D,V"
    assert pynmea2.parse(body).is_valid is False
    _, events = feed_all(nmea(body))
    assert times(events) == [GnssTime(utc("2020-07-11 22:37:45"), 0, "RMC")]
    [fix] = fixes(events)
    assert (fix.lat_e7, fix.lon_e7, fix.quality, fix.sentence) == (
        381104940, -1226268970, 1, "GNRMC")
    assert fix.utc == utc("2020-07-11 22:37:45")


def test_pitfall_nmea41_extra_fields_are_not_misread() -> None:
    gsa = "GNGSA,A,3,68,69,70,78,84,85,,,,,,,1.5,1.3,1.0,2"  # 4.11 system id at the end
    assert pynmea2.parse(gsa).vdop == "1.0"
    gsv = "GPGSV,1,1,01,36,19,156,51,1"  # one satellite, then the 4.11 signal id
    assert pynmea2.parse(gsv).sv_prn_num_2 == "1"  # pynmea2 reads the signal id as a PRN
    gga = GGA + ",extra,fields"
    reader, events = feed_all(nmea(gsa) + nmea(gsv) + nmea(gga))
    assert reader.stats.by_type == {"GSA": 1, "GSV": 1, "GGA": 1}
    [fix] = fixes(events)
    assert (fix.lat_e7, fix.quality, fix.sats, fix.hdop_c, fix.alt_dm) == (
        481173000, 1, 8, 90, 5454)


def test_pitfall_rmc_mode_n_with_status_a_is_not_a_fix() -> None:
    body = "GPRMC,000452.981,A,4404.1306,N,12118.8515,W,0.0,,190120,,,N"
    reader, events = feed_all(nmea(body))
    assert events == []
    assert reader.stats.sentences_ok == 1


@pytest.mark.parametrize("short", ["PUBX", "PASHR", "PTNL", "PSXN", "PVTX"])
def test_pitfall_short_proprietary_raises_inside_pynmea2(short: str) -> None:
    with pytest.raises(IndexError):
        pynmea2.parse(f"${short}")
    reader, events = feed_all(nmea(short) + nmea(short + ",00"))
    assert events == []
    assert reader.stats.by_type == {short: 2}
    assert reader.stats.rejected == 0


def test_pitfall_decoded_type_pynmea2_cannot_parse_is_rejected() -> None:
    with pytest.raises(pynmea2.ParseError):
        pynmea2.parse("$GPGGA")
    reader, events = feed_all(nmea("GPGGA"))  # a GGA with no comma at all
    assert events == []
    assert reader.stats.rejected_by_reason == {UNPARSABLE: 1}


# ----------------------------------------------------------------------------------------
# Fixes: never invented, integers only
# ----------------------------------------------------------------------------------------
def test_gga_fix_fields_are_exact_integers() -> None:
    body = "GNGGA,132819.60,4134.49795459,S,09345.03431408,W,4,10,0.9,-278.161,M,-31.4,M,6.6,0133"
    [fix] = fixes(feed_all(nmea(body))[1])
    # 41 + 34.49795459/60 = 41.57496590983..., 93 + 45.03431408/60 = 93.75057190133...
    assert fix == Fix(-415749659, -937505719, 4, 10, 90, -2782, None, "GNGGA", 0)


@pytest.mark.parametrize(
    ("lat", "lon"),
    [
        ("36000.0000,N", "72000.0000,E"),  # TN-200 no-fix placeholder
        ("9000.0001,N", "01131.000,E"),  # beyond the pole
        ("4807.038,N", "18000.001,E"),
        ("4860.000,N", "01131.000,E"),  # 60 minutes
        ("4807.038,X", "01131.000,E"),
        ("4807.038,", "01131.000,E"),
        ("48o7.038,N", "01131.000,E"),
        ("0000.0000,N", "00000.0000,E"),  # 0/0 is a placeholder, not a place
    ],
)
def test_invalid_positions_give_no_fix(lat: str, lon: str) -> None:
    body = f"GPGGA,123519,{lat},{lon},1,08,0.9,545.4,M,46.9,M,,"
    reader, events = feed_all(nmea(body))
    assert events == []
    assert reader.stats.invalid_fixes == 1


@pytest.mark.parametrize(("quality", "is_fix"), [("0", False), ("1", True), ("2", True),
                                                  ("4", True), ("5", True), ("6", True),
                                                  ("7", False), ("8", False), ("", False)])
def test_gga_quality(quality: str, is_fix: bool) -> None:
    body = f"GPGGA,123519,4807.038,N,01131.000,E,{quality},08,0.9,545.4,M,46.9,M,,"
    assert bool(fixes(feed_all(nmea(body))[1])) is is_fix


def test_gga_optional_fields_empty_or_odd() -> None:
    body = "GPGGA,,4807.038,N,01131.000,E,1,,,545.4,F,,,,"  # no time, sats, hdop; feet
    [fix] = fixes(feed_all(nmea(body))[1])
    assert (fix.sats, fix.hdop_c, fix.alt_dm, fix.utc) == (None, None, None, None)


# ----------------------------------------------------------------------------------------
# Time: trusted sources, dates for GGA
# ----------------------------------------------------------------------------------------
def test_gga_before_any_date_has_no_utc_then_takes_rmc_date() -> None:
    data = nmea(GGA) + nmea(RMC) + nmea(GGA.replace("123519.00", "123520.50"))
    events = feed_all(data)[1]
    assert [type(e).__name__ for e in events] == ["Fix", "GnssTime", "Fix", "Fix"]
    first, rmc_fix, second = fixes(events)
    assert first.utc is None
    assert rmc_fix.utc == utc("2024-03-23 12:35:19")
    assert second.utc == utc("2024-03-23 12:35:20.5")


def test_rmc_two_digit_years_and_implausible_dates() -> None:
    rmc_2024 = RMC
    rmc_1994 = RMC.replace("230324", "230394")  # 1994: before MIN_PLAUSIBLE_YEAR, not trusted
    events = feed_all(nmea(rmc_1994) + nmea(rmc_2024))[1]
    assert times(events) == [GnssTime(utc("2024-03-23 12:35:19"), 0, "RMC")]
    assert [f.utc for f in fixes(events)] == [None, utc("2024-03-23 12:35:19")]


def test_gga_takes_date_of_last_trusted_time() -> None:
    gga = GGA.replace("123519.00", "123520.25")
    [*_, fix] = fixes(feed_all(nmea(RMC) + nmea(gga))[1])
    assert fix.utc == utc("2024-03-23 12:35:20.25")


def test_gga_across_midnight_lands_on_the_next_day() -> None:
    zda = "GPZDA,235959.50,31,12,2023,00,00"
    gga = GGA.replace("123519.00", "000000.50")
    events = feed_all(nmea(zda) + nmea(gga))[1]
    assert times(events) == [GnssTime(utc("2023-12-31 23:59:59.5"), 0, "ZDA")]
    assert fixes(events)[0].utc == utc("2024-01-01 00:00:00.5")


def test_gga_date_follows_the_monotonic_clock() -> None:
    reader = NmeaReader()
    reader.feed(nmea("GPZDA,120000.00,28,02,2024,,"), mono_ns=1_000_000_000)
    a_day_later = 1_000_000_000 + 24 * 3600 * 1_000_000_000
    [fix] = reader.feed(nmea(GGA.replace("123519.00", "120001.00")), mono_ns=a_day_later)
    assert isinstance(fix, Fix)
    assert fix.utc == utc("2024-02-29 12:00:01")
    assert fix.mono_ns == a_day_later


@pytest.mark.parametrize(
    "zda",
    [
        "GPZDA,,,,,00,00",  # BT-451 before time is known
        "GPZDA,120000.00,30,02,2024,,",  # no such day
        "GPZDA,120000.00,06,01,1980,,",  # receiver default (GPS epoch)
        "GPZDA,235960.00,31,12,2016,,",  # leap second: no datetime for it
        "GPZDA,120000.00,1,1,20x4,,",
    ],
)
def test_untrusted_zda_gives_no_time(zda: str) -> None:
    reader, events = feed_all(nmea(zda) + nmea(GGA))
    assert times(events) == []
    assert fixes(events)[0].utc is None
    assert reader.stats.sentences_ok == 2


def test_rmc_status_v_gives_neither_fix_nor_time() -> None:
    body = "GPRMC,000452.981,V,36000.0000,N,72000.0000,E,0.000000,,190120,,"
    reader, events = feed_all(nmea(body))
    assert events == []
    assert reader.stats.invalid_fixes == 0  # it does not claim a fix


# ----------------------------------------------------------------------------------------
# Range checks: every numeric field that reaches a record
# ----------------------------------------------------------------------------------------
def test_out_of_range_fields_are_left_out_and_counted() -> None:
    body = "GPGGA,123519,4807.038,N,01131.000,E,1,120,100.0,100000000000000000000.0,M,,,,"
    reader, events = feed_all(nmea(body))
    [fix] = fixes(events)
    assert (fix.sats, fix.hdop_c, fix.alt_dm) == (None, None, None)
    assert fix.lat_e7 == 481173000  # the fix itself stands
    assert reader.stats.out_of_range == {FIELD_SATS: 1, FIELD_HDOP: 1, FIELD_ALT: 1}


@pytest.mark.parametrize("zda", ["GPZDA,120000.00,01,01,9999,00,00",
                                 "GPZDA,120000.00,01,01,2100,00,00",
                                 "GPZDA,120000.00,01,01,1999,00,00"])
def test_zda_year_out_of_range_gives_no_time(zda: str) -> None:
    reader, events = feed_all(nmea(zda))
    assert events == []
    assert reader.stats.out_of_range == {FIELD_DATE: 1}


_NUMBER = st.text("0123456789.-", min_size=1, max_size=24)


@HYPOTHESIS
@given(alt=_NUMBER, hdop=_NUMBER, sats=_NUMBER, ddmmyy=st.text("0123456789", min_size=6,
                                                               max_size=6),
       year=st.integers(0, 99_999))
def test_numeric_fields_reaching_a_fix_are_in_range(alt: str, hdop: str, sats: str,
                                                    ddmmyy: str, year: int) -> None:
    gga = f"GPGGA,123519,4807.038,N,01131.000,E,1,{sats},{hdop},{alt},M,46.9,M,,"
    rmc = f"GPRMC,123519.00,A,4807.038,N,01131.000,E,0.1,1.0,{ddmmyy},,,A"
    zda = f"GPZDA,123519.00,{ddmmyy[:2]},{ddmmyy[2:4]},{year},00,00"
    reader, events = feed_all(nmea(gga) + nmea(rmc) + nmea(zda))
    for fix in fixes(events):
        assert fix.sats is None or 0 <= fix.sats <= MAX_SATS
        assert fix.hdop_c is None or 0 <= fix.hdop_c <= MAX_HDOP_C
        assert fix.alt_dm is None or MIN_ALT_DM <= fix.alt_dm <= MAX_ALT_DM
        assert fix.utc is None or MIN_PLAUSIBLE_YEAR <= fix.utc.year <= MAX_PLAUSIBLE_YEAR + 1
    for t in times(events):
        assert MIN_PLAUSIBLE_YEAR <= t.utc.year <= MAX_PLAUSIBLE_YEAR
    assert reader.stats.sentences_ok == 3


# ----------------------------------------------------------------------------------------
# Real captures
# ----------------------------------------------------------------------------------------
# file: (sentences_ok, checksum_errors, rejected, fixes, times, bytes_skipped)
CAPTURES: dict[str, tuple[int, int, int, int, int, int]] = {
    "bt451.log": (144, 0, 0, 26, 26, 0),
    "bu353s4.log": (90, 0, 0, 50, 25, 0),
    "ericsson-gru04-02-70sec.log": (976, 0, 0, 2, 71, 0),
    "et-332.log": (106, 0, 1, 38, 38, 566),  # one GSA with ANSI escapes in its checksum
    "furuno_gl_ga.log": (306, 0, 0, 32, 32, 0),
    "garmin17n.log": (22, 0, 0, 4, 2, 0),
    "hemi.log": (753, 0, 0, 21, 108, 0),
    "mt3339.log": (138, 0, 0, 60, 60, 0),
    "nl2008u.log": (127, 0, 0, 18, 18, 45),  # a non-ASCII '#' comment line
    "nmea-rtk.log": (244, 0, 0, 244, 122, 0),
    "polarx2.log": (75, 0, 0, 10, 10, 61),  # non-ASCII '#' comment line
    "quectel-eg25-g.log": (861, 0, 0, 46, 23, 0),
    "quectel-l76k-nmea.log": (2280, 0, 0, 300, 300, 0),
    "skytraq-PX1172RH_DS.log": (195, 0, 0, 18, 18, 670),  # 3 gpsd JSON lines
    "st-teseo-liv3f.log": (406, 0, 0, 58, 29, 0),
    "telit-pls83-w.log": (225, 0, 0, 40, 20, 0),
    "tn200-all.log": (66, 0, 0, 0, 0, 0),
    "ublox-8.log": (1008, 0, 1, 144, 144, 144),  # binary first line; last RMC cut
    "ublox-lea-5h.log": (164, 0, 0, 37, 19, 0),
    "ublox-neo-m9n-nmea.log": (1403, 0, 0, 122, 122, 0),
    "ublox8-uniqid-monhw.log": (52, 0, 0, 10, 6, 5458),  # UBX binary between sentences
}


def capture(name: str) -> bytes:
    with (NMEA_DIR / name).open("rb") as stream:
        return b"".join(capture_chunks(stream))


def test_every_capture_is_in_the_table() -> None:
    assert sorted(p.name for p in NMEA_DIR.glob("*.log")) == sorted(CAPTURES)


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_capture_counts_whole_and_chunked(name: str) -> None:
    data = capture(name)
    reader, events = feed_all(data)
    stats = reader.stats
    assert (stats.sentences_ok, stats.checksum_errors, stats.rejected, stats.fixes,
            stats.times, stats.bytes_skipped) == CAPTURES[name]
    assert sum(stats.by_type.values()) == sum(stats.by_talker.values()) == stats.sentences_ok
    assert len(fixes(events)) == stats.fixes
    assert len(times(events)) == stats.times
    for fix in fixes(events):
        assert abs(fix.lat_e7) <= 900_000_000
        assert abs(fix.lon_e7) <= 1_800_000_000
        assert fix.utc is None or fix.utc.tzinfo is UTC

    chunked_reader, chunked_events = feed_chunks(data, random.Random(name))
    assert chunked_events == events
    assert chunked_reader.stats == stats
    byte_reader, byte_events = feed_chunks(data, [1])
    assert byte_events == events
    assert byte_reader.stats == stats


def test_capture_type_counts_match_readme() -> None:
    stats = feed_all(capture("ublox-neo-m9n-nmea.log"))[0].stats
    assert stats.by_type == {"GSV": 732, "GSA": 244, "RMC": 61, "VTG": 61, "GGA": 61,
                             "GLL": 61, "GST": 61, "ZDA": 61, "GBS": 61}
    assert stats.by_talker == {"GN": 671, "GP": 244, "GL": 183, "GA": 183, "GB": 122}
    stats = feed_all(capture("ericsson-gru04-02-70sec.log"))[0].stats
    assert stats.by_type["PERC"] == 464
    assert stats.by_talker["P"] == 464 + 3 * 71


def test_capture_bu353s4_first_fixes() -> None:
    # $GPGGA,030719.000,3747.0873,S,17518.8938,E,1,08,1.1,59.9,M,23.7,M,,0000*7D
    # $GPRMC,030719.000,A,3747.0873,S,17518.8938,E,0.69,181.39,311214,,,A*7D
    events = feed_all(capture("bu353s4.log"))[1]
    gga, rmc = fixes(events)[:2]
    assert gga == Fix(-377847883, 1753148967, 1, 8, 110, 599, None, "GPGGA", 0)
    assert (rmc.lat_e7, rmc.lon_e7, rmc.sentence) == (-377847883, 1753148967, "GPRMC")
    assert rmc.utc == utc("2014-12-31 03:07:19")
    assert times(events)[0] == GnssTime(utc("2014-12-31 03:07:19"), 0, "RMC")
    # the next GGA (030720.000) takes the RMC's date
    assert fixes(events)[2].utc == utc("2014-12-31 03:07:20")


def test_capture_nmea_rtk_first_fix() -> None:
    # $GNGGA,132819.60,4134.49795459,N,09345.03431408,W,2,10,0.9,278.161,M,-31.442,M,6.6,0133*6A
    [first, *_] = fixes(feed_all(capture("nmea-rtk.log"))[1])
    assert first == Fix(415749659, -937505719, 2, 10, 90, 2782, None, "GNGGA", 0)
    qualities = {f.quality for f in fixes(feed_all(capture("nmea-rtk.log"))[1])}
    assert qualities == {1, 2, 4}  # RMC fixes are quality 1; README: GGA quality 2 and 4


def test_capture_hemi_gga_dated_by_zda() -> None:
    # ZDA during the no-fix stretch: $GPZDA,193913.00,07,09,2018,00,00*63
    # first fix: $GPGGA,194050.00,4221.8237733,N,07101.9411707,W,1,00,3.3,10.835,M,...
    events = feed_all(capture("hemi.log"))[1]
    first = fixes(events)[0]
    assert first == Fix(423637296, -710323528, 1, 0, 330, 108, utc("2018-09-07 19:40:50"),
                        "GPGGA", 0)
    assert times(events)[0] == GnssTime(utc("2018-09-07 19:39:13"), 0, "ZDA")


def test_capture_ublox8_rmc_after_binary_noise_is_recovered() -> None:
    # line 1: binary noise, then $GNRMC,000941.00,A,4404.13387,N,12118.85628,W,...,100117,,,A
    [first, *_] = fixes(feed_all(capture("ublox-8.log"))[1])
    assert first.sentence == "GNRMC"
    assert (first.lat_e7, first.lon_e7) == (440688978, -1213142713)
    assert first.utc == utc("2017-01-10 00:09:41")


def test_capture_without_fix_gives_none() -> None:
    reader, events = feed_all(capture("tn200-all.log"))
    assert events == []
    assert reader.stats.invalid_fixes == 0


# ----------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------
def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def run_split(
    data: bytes, cuts: list[int], max_line: int
) -> tuple[NmeaReader, list[Fix | GnssTime]]:
    reader = NmeaReader(max_line)
    events: list[Fix | GnssTime] = []
    for piece in split(data, cuts):
        events += reader.feed(piece, 0)
        assert reader.buffered <= max_line
    return reader, events


@HYPOTHESIS
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=40),
       max_line=st.sampled_from([16, 40, MAX_LINE]))
def test_arbitrary_bytes_never_raise_and_do_not_depend_on_splitting(
    data: bytes, cuts: list[int], max_line: int
) -> None:
    whole = NmeaReader(max_line)
    events = whole.feed(data, 0)
    reader, split_events = run_split(data, cuts, max_line)
    assert split_events == events
    assert reader.stats == whole.stats
    assert reader.stats.sentences_ok == sum(reader.stats.by_type.values())


_FIELD_TEXT = st.text(alphabet="0123456789.,-+NSEWAVDMx ", max_size=14)


@st.composite
def checksummed_sentences(draw: st.DrawFn) -> bytes:
    """Sentences with a valid checksum and arbitrary fields: the parser paths, fuzzed."""
    address = draw(st.sampled_from(["GPGGA", "GNRMC", "GPZDA", "GPGSA", "GLGSV", "GPVTG",
                                    "GAGLL", "GPGNS", "PUBX", "PGRME", "P", "GP", "QZGGA"]))
    fields = draw(st.lists(_FIELD_TEXT, max_size=16))
    return nmea(",".join([address, *fields]))


@HYPOTHESIS
@given(parts=st.lists(st.one_of(checksummed_sentences(), st.binary(max_size=20)), max_size=30),
       cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_checksummed_garbage_fields_never_raise(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    reader, events = run_split(data, cuts, MAX_LINE)
    whole, whole_events = feed_all(data)
    assert (events, reader.stats) == (whole_events, whole.stats)
    for event in events:
        assert event.utc is None or event.utc.tzinfo is UTC
        if isinstance(event, Fix):
            assert abs(event.lat_e7) <= 900_000_000
            assert abs(event.lon_e7) <= 1_800_000_000
            assert (event.lat_e7, event.lon_e7) != (0, 0)
    assert reader.stats.fixes == len(fixes(events))


@st.composite
def gga_fixes(draw: st.DrawFn) -> tuple[str, int, int]:
    lat_deg = draw(st.integers(0, 89))
    lat_min_1e5 = draw(st.integers(1, 5_999_999))
    lon_deg = draw(st.integers(0, 179))
    lon_min_1e5 = draw(st.integers(1, 5_999_999))
    north, east = draw(st.booleans()), draw(st.booleans())
    lat = f"{lat_deg:02d}{lat_min_1e5 // 100000:02d}.{lat_min_1e5 % 100000:05d}"
    lon = f"{lon_deg:03d}{lon_min_1e5 // 100000:02d}.{lon_min_1e5 % 100000:05d}"
    hemispheres = f"{'N' if north else 'S'},{lon},{'E' if east else 'W'}"
    body = f"GNGGA,101010.00,{lat},{hemispheres},1,07,1.1,,,,,,"
    lat_e7 = round((lat_deg + Fraction(lat_min_1e5, 6_000_000)) * E7) * (1 if north else -1)
    lon_e7 = round((lon_deg + Fraction(lon_min_1e5, 6_000_000)) * E7) * (1 if east else -1)
    return body, lat_e7, lon_e7


@HYPOTHESIS
@given(
    sentences=st.lists(gga_fixes(), min_size=1, max_size=12),
    garbage=st.lists(st.binary(max_size=60), min_size=13, max_size=13),
    cuts=st.lists(st.integers(0, 3000), max_size=30),
)
def test_valid_sentences_survive_any_garbage_between_them(
    sentences: list[tuple[str, int, int]], garbage: list[bytes], cuts: list[int]
) -> None:
    data = garbage[0] + b"".join(
        nmea(body, end="") + garbage[i + 1] for i, (body, _, _) in enumerate(sentences)
    )
    framer_frames = []
    framer = SentenceFramer()
    for piece in split(data, cuts):
        framer_frames += framer.feed(piece)
        assert framer.buffered <= MAX_LINE
    recovered = iter(f.body for f in framer_frames if isinstance(f, Sentence))
    assert all(any(body == got for got in recovered) for body, _, _ in sentences)

    _, events = run_split(data, cuts, MAX_LINE)
    got = iter((f.lat_e7, f.lon_e7) for f in fixes(events))
    assert all(any(position == (lat, lon) for position in got) for _, lat, lon in sentences)


@HYPOTHESIS
@given(
    sentences=st.lists(gga_fixes(), min_size=2, max_size=8),
    inside=st.lists(st.tuples(st.integers(0, 100), st.binary(min_size=1, max_size=10)),
                    max_size=8),
    cuts=st.lists(st.integers(0, 2000), max_size=20),
)
def test_garbage_inside_one_sentence_loses_only_that_sentence(
    sentences: list[tuple[str, int, int]], inside: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    lines = [nmea(body) for body, _, _ in sentences]
    damaged = set()
    for where, junk in inside:
        index = where % len(lines)
        line = lines[index]
        at = 1 + where % (len(line) - 3)  # after '$', before the line end
        lines[index] = line[:at] + junk + line[at:]
        damaged.add(index)
    framer = SentenceFramer()
    bodies = []
    for piece in split(b"".join(lines), cuts):
        bodies += [f.body for f in framer.feed(piece) if isinstance(f, Sentence)]
    for index, (body, _, _) in enumerate(sentences):
        if index not in damaged:
            assert body in bodies


# ----------------------------------------------------------------------------------------
# diag nmea-replay
# ----------------------------------------------------------------------------------------
def last_json(out: str) -> dict[str, object]:
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["ublox-neo-m9n-nmea.log", "ublox8-uniqid-monhw.log"])
def test_replay_json_matches_the_reader(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(NMEA_DIR / name), "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    reader, events = feed_all(capture(name))
    stats: NmeaStats = reader.stats
    assert result["sentences_ok"] == stats.sentences_ok
    assert result["checksum_errors"] == stats.checksum_errors
    assert result["rejected"] == stats.rejected
    assert result["fixes"] == stats.fixes
    assert result["by_type"] == stats.by_type
    assert result["by_talker"] == stats.by_talker
    last = fixes(events)[-1]
    assert result["last_fix"] == {
        "lat": last.lat_e7 / 1e7, "lon": last.lon_e7 / 1e7,
        "utc": last.utc.isoformat() if last.utc else None,
        "quality": last.quality, "sentence": last.sentence,
    }


def test_replay_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(NMEA_DIR / "garmin17n.log")]) == 0
    out = capsys.readouterr().out
    assert "sentences ok      22" in out
    assert "checksum errors   0" in out
    assert "fixes             4" in out
    assert "52.2190650, 21.0108517  quality 2  2005-03-16T09:38:03+00:00  (GPGGA)" in out
    assert "PGRME 2" in out
    assert "GP 12  P 10" in out


def test_replay_binary_garbage_exits_0(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(random.Random(7).randbytes(200_000) + b"$GPGGA,1,2,3\r\n$")
    assert main([str(junk), "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["fixes"] == 0
    assert result["last_fix"] is None
    assert isinstance(result["rejected"], int)
    assert result["rejected"] >= 1


def test_replay_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert main([str(empty)]) == 0
    assert "sentences ok      0" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_replay_unreadable_file_exits_2(kind: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.log" if kind == "missing" else tmp_path
    assert main([str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err
    assert captured.out == ""


def test_replay_keeps_binary_lines_that_start_with_hash() -> None:
    data = (b"# a comment with $GPHDT,,T*1B inside\n"
            b"#\x01\xff binary record starting with '#'" + nmea("GPHDT,,T")
            + b"#not a comment at line start? yes it is\n")
    kept = b"".join(capture_chunks(io.BytesIO(data)))
    assert kept == b"#\x01\xff binary record starting with '#'" + nmea("GPHDT,,T")
    raw = b"".join(capture_chunks(io.BytesIO(data), keep_comments=True))
    assert raw == data


def test_replay_streams_lines_longer_than_a_read() -> None:
    data = b"#" * 200_000 + b"\n" + b"\xff" * 200_000 + nmea("GPHDT,,T")
    chunks = list(capture_chunks(io.BytesIO(data)))
    assert b"".join(chunks) == b"\xff" * 200_000 + nmea("GPHDT,,T")
    assert max(len(c) for c in chunks) <= 2 * 64 * 1024


def test_progress_only_after_a_second() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = Progress(1000, out, lambda: now[0])
    progress.update(100)
    now[0] = 0.5
    progress.update(500)
    assert out.getvalue() == ""
    now[0] = 1.2
    progress.update(600)
    now[0] = 1.5
    progress.update(700)  # refreshed at most once a second
    progress.finish()
    assert out.getvalue() == "\rnmea-replay:  60% (600 of 1,000 bytes)\n"


def test_replay_marks_unusual_talkers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture_file = tmp_path / "qzss.log"
    capture_file.write_bytes(nmea(GGA.replace("GPGGA", "QZGGA")) + nmea(GGA) + nmea("PUBX,00"))
    assert main([str(capture_file)]) == 0
    out = capsys.readouterr().out
    assert "by talker         GP 1  P 1  QZ (other) 1" in out
    assert "48.1173000, 11.5166667  quality 1  date unknown  (GPGGA)" in out


def test_sentence_types_chosen_by_the_wire_are_counted_in_bounded_memory() -> None:
    from drivers.nmea import MAX_COUNTED_KEYS, OTHER_KEY

    reader = NmeaReader()
    for n in range(1000):
        body = f"PXYZ{n:06d},1"
        checksum = 0
        for ch in body:
            checksum ^= ord(ch)
        reader.feed(f"${body}*{checksum:02X}\r\n".encode(), n)
    assert reader.stats.sentences_ok == 1000
    assert len(reader.stats.by_type) <= MAX_COUNTED_KEYS + 1
    assert reader.stats.by_type[OTHER_KEY] >= 1000 - MAX_COUNTED_KEYS
    assert sum(reader.stats.by_type.values()) == 1000
