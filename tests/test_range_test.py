"""``provision range-test``: the walk's statistics (sans-IO, samples of the daemon's state
file made here), and the command against the real daemon (``gateway.py run``) with a tag
receiver simulator whose beacons and RSSI the test controls: the verdict, and the result
sealed as a ``tag.range_test`` record in the gateway's store."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway
from app import range_test
from app.range_test import (
    MAX_RATE_SAMPLES,
    RECOMMEND_MAX_S,
    RECOMMEND_MIN_S,
    DaemonLost,
    Sample,
    Walk,
    recommend,
    walk,
)
from app.state import daemon_alive, read_state
from buffer.store import store_path
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import pair_tags
from provisioning.identity import create_identity
from tests.helpers import plaintext_config, stored_records, wait_for

REPO = Path(__file__).resolve().parents[1]
TAG = "T00003001"
T0 = 1_800_000_000_000


def steps(walk_: Walk, pattern: list[tuple[int, int | None]], start_ms: int = T0) -> None:
    """Feed one sample a second: for each second (new beacons, their RSSI) as the daemon's
    state shows them (the count, the last beacon's time and RSSI)."""
    beacons, last, rssi = 0, None, None
    for second, (new, level) in enumerate(pattern):
        at = start_ms + second * 1000
        if new:
            beacons += new
            last, rssi = at - 100, level
        walk_.feed(Sample(at, beacons, last, rssi))


# -- the rules ---------------------------------------------------------------------------------
def test_steady_strong_beacons_are_good_coverage_and_the_lowest_threshold() -> None:
    w = Walk(TAG, 120)
    steps(w, [(2, -58 - (i % 5)) for i in range(120)])
    result = w.result("duration")
    assert result.verdict == "good"
    assert result.reasons == ()
    assert result.silence_max_ms <= 1000
    assert result.beacons == 238  # the first sample is the baseline
    assert result.beacons_per_min == round(238 * 60 / 119)
    assert result.rssi["min"] == -62
    assert result.rssi["max"] == -58
    assert result.recommended_absent_after_s == RECOMMEND_MIN_S


def test_a_half_minute_unheard_is_marginal_and_sets_the_recommendation() -> None:
    w = Walk(TAG, 120)
    steps(w, [(1, -60)] * 20 + [(0, None)] * 30 + [(1, -60)] * 20)
    result = w.result("duration")
    assert result.verdict == "marginal"
    assert result.silence_max_ms == 31_000
    assert result.recommended_absent_after_s == 120  # 31 s x 3, rounded up to 30 s
    assert "unheard for up to 31.0 s" in result.reasons[0]


def test_a_long_silence_is_poor_and_says_the_current_threshold_would_have_fired() -> None:
    w = Walk(TAG, 60)
    steps(w, [(1, -60)] * 10 + [(0, None)] * 75 + [(1, -60)] * 5)
    result = w.result("quit")
    assert result.verdict == "poor"
    assert result.silence_max_ms >= 75_000
    assert any("would have been reported absent" in r for r in result.reasons)
    assert result.recommended_absent_after_s == 240
    assert result.ended == "quit"


@pytest.mark.parametrize(("level", "verdict"), [(-75, "good"), (-86, "marginal"),
                                                (-94, "poor")])
def test_the_weak_tenth_of_the_beacons_sets_the_verdict(level: int, verdict: str) -> None:
    w = Walk(TAG, 120)
    steps(w, [(1, level if i % 5 == 0 else -55) for i in range(60)])
    result = w.result("duration")
    assert result.rssi["p10"] == level
    assert result.verdict == verdict


def test_a_tag_never_heard_is_poor() -> None:
    w = Walk(TAG, 120)
    for second in range(10):
        w.feed(Sample(T0 + second * 1000, 4, T0 - 600_000, -70))  # heard long before
    result = w.result("duration")
    assert result.beacons == 0
    assert result.verdict == "poor"
    assert result.reasons == ("the tag was not heard during the test",)
    assert result.silence_max_ms == 9000  # counted from the start of the walk
    assert result.rssi["samples"] == 0


def test_the_result_holds_no_float_a_record_could_not_carry() -> None:
    from core.record import check_no_float

    w = Walk(TAG, 120)
    steps(w, [(3, -61 - i % 4) for i in range(7)])
    check_no_float(w.result("duration").to_json(), "details")  # raises on a float


def test_the_recommendation_is_bounded() -> None:
    assert recommend(0) == RECOMMEND_MIN_S
    assert recommend(21) == 90
    assert recommend(10_000) == RECOMMEND_MAX_S


def test_a_daemon_restart_during_the_walk_counts_on() -> None:
    w = Walk(TAG, 120)
    for second, count in enumerate([100, 102, 104, 1, 3]):  # restarted: counts from 0
        w.feed(Sample(T0 + second * 1000, count, T0 + second * 1000 - 50, -60))
    assert w.result("duration").beacons == 2 + 2 + 1 + 2


def test_the_exact_gap_between_two_beacons_counts() -> None:
    w = Walk(TAG, 120)
    w.feed(Sample(T0, 1, T0 - 10, -60))
    w.feed(Sample(T0 + 1000, 2, T0 + 100, -60))
    # one more beacon 2.85 s after the previous one, seen 0.04 s after it came: each
    # sample saw a beacon less than a second old, the gap between them is exact
    w.feed(Sample(T0 + 2990, 3, T0 + 2950, -60))
    assert w.silence_max_ms == 2850


def test_what_a_walk_keeps_is_bounded() -> None:
    w = Walk(TAG, 120)
    bins = len(w._hist)
    for second in range(MAX_RATE_SAMPLES * 2):
        w.feed(Sample(T0 + second * 10, second, T0 + second * 10, -200 if second % 2 else 40))
    assert len(w._hist) == bins == 129  # -128..0 dBm, whatever the device reports
    assert len(w._rates) <= MAX_RATE_SAMPLES
    result = w.result("duration")
    assert (result.rssi["min"], result.rssi["max"]) == (-128, 0)


def test_the_walk_ends_on_q_and_when_the_daemon_goes() -> None:
    state = {"written_at_ms": T0, "tags": [{"tag": TAG, "beacons": 1,
                                             "last_beacon_ms": T0, "rssi_dbm": -60}]}
    waits = iter([False, True])
    shown: list[range_test.Live] = []
    result = walk(TAG, 120, 60, read=lambda: state, wait=lambda _s: next(waits),
                  show=shown.append)
    assert result.ended == "quit"
    assert len(shown) == 2
    reads = iter([state, None])
    with pytest.raises(DaemonLost):
        walk(TAG, 120, 60, read=lambda: next(reads), wait=lambda _s: False, show=shown.append)


def test_the_live_line() -> None:
    w = Walk(TAG, 120)
    w.feed(Sample(T0, 5, T0 - 400, -61))
    live = w.feed(Sample(T0 + 1000, 6, T0 + 600, -70))
    line = range_test.live_line(TAG, live, unicode=False)
    assert line.startswith(f"{TAG}     1 s    60 beacons/min  RSSI  -70 dBm (min -70, avg -70)"
                           "  last 0.4 s ago")
    assert line.endswith("[##########..........]")
    assert line.isascii()


# -- the command, against the real daemon ----------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A gateway whose broker does not answer (its records stay in its store), a tag
    receiver with one paired tag, the daemon running."""
    identity = create_identity(tmp_path / "identity", "gw-range-0001")
    tag = SimTag(0x3001, bytes([3]) * 16)
    pair_tags(identity, [tag])
    storage_key = identity.storage_key
    identity.close()
    receiver = TagReceiverSim("TR-RANGE-0001", tags=[tag], link=tmp_path / "tty-tags").start()
    cfg = plaintext_config(tmp_path, tmp_path / "identity", port=9, extra=f"""
[[devices]]
name = "tags"
kind = "tag_receiver"
path = "{tmp_path / 'tty-tags'}"
""")
    log = tmp_path / "daemon.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                                 str(cfg)], stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)

    def alive() -> bool:
        found = read_state(tmp_path / "run")
        return found is not None and daemon_alive(found) and any(
            d["handshake"] == "ok" for d in found["devices"])
    try:
        wait_for(lambda: alive() or proc.poll() is not None, 30, "the daemon")
        assert proc.poll() is None, log.read_text()
        yield {"cfg": cfg, "tag": tag, "receiver": receiver, "storage_key": storage_key,
               "db": store_path(tmp_path / "data")}
    finally:
        # SIGKILL: a drain on SIGTERM would try the broker that never answers for 5 s; the
        # daemon is made to survive kill -9 (its store is crash-safe)
        proc.kill()
        proc.wait()
        receiver.stop()


def beacons(receiver: TagReceiverSim, tag: SimTag, rssi: int, stop: threading.Event) -> None:
    """The tag walking about: a beacon every 0.2 s at *rssi* until *stop*."""
    while not stop.wait(0.2):
        receiver.send_beacon(tag, rssi=rssi)


def range_run(site: dict[str, Any], rssi: int, capsys: pytest.CaptureFixture[str]
              ) -> tuple[int, dict[str, Any]]:
    stop = threading.Event()
    walker = threading.Thread(target=beacons, args=(site["receiver"], site["tag"], rssi, stop))
    walker.start()
    try:
        code = gateway.main(["provision", "range-test", "--config", str(site["cfg"]), "--tag",
                             site["tag"].tag, "--duration", "5", "--operator", "Ann Installer",
                             "--json"])
    finally:
        stop.set()
        walker.join()
    captured = capsys.readouterr()
    assert "RSSI" in captured.err  # the live lines went to stderr
    return code, json.loads(captured.out)


def sealed(site: dict[str, Any]) -> list[dict[str, Any]]:
    records = [json.loads(r) for r in stored_records(site["db"], site["storage_key"])]
    return [r for r in records if r["kind"] == "tag.range_test"]


def test_walks_with_strong_then_weak_beacons_are_good_then_poor_and_recorded(
    site: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = range_run(site, -55, capsys)
    assert code == 0
    assert result["verdict"] == "good"
    assert result["tag"] == site["tag"].tag
    assert result["beacons"] >= 8
    assert result["rssi"]["min"] == result["rssi"]["max"] == -55
    assert result["silence_max_ms"] <= 1500
    assert result["recommended_absent_after_s"] == RECOMMEND_MIN_S
    wait_for(lambda: len(sealed(site)) == 1, 15, "the gateway to seal the range test")
    record = sealed(site)[0]
    assert record["prio"] == "status"
    details = record["body"]["details"]
    assert details == {k: v for k, v in result.items() if k != "action"}
    assert record["body"]["operator"]["name"] == "Ann Installer"
    assert not {"lat", "lon", "lat_e7", "lon_e7", "position"} & set(details)

    # the installer walks into the far bedroom: the same beacons, weak
    code, result = range_run(site, -94, capsys)
    assert code == 1
    assert result["verdict"] == "poor"
    assert result["rssi"]["p10"] == -94
    assert any("-94 dBm or weaker" in r for r in result["reasons"])
    wait_for(lambda: len(sealed(site)) == 2, 15, "the gateway to seal the second test")
    assert sealed(site)[1]["body"]["details"]["verdict"] == "poor"


def test_without_the_daemon_or_the_pairing_it_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = create_identity(tmp_path / "identity", "gw-range-0002")
    pair_tags(identity, [SimTag(0x3002, bytes(16))])
    identity.close()
    cfg = plaintext_config(tmp_path, tmp_path / "identity", port=9)  # state in tmp/run
    args = ["provision", "range-test", "--config", str(cfg), "--operator", "Ann"]
    assert gateway.main([*args, "--tag", "T00003002"]) == 2
    err = capsys.readouterr().err
    assert "the gateway is not running" in err
    assert "systemctl start smartcorr-gateway" in err
    assert gateway.main([*args, "--tag", "T00003009"]) == 2
    assert "tag T00003009 is not paired" in capsys.readouterr().err
    assert gateway.main([*args, "--tag", "T00003002", "--duration", "0"]) == 2
    assert "--duration 0: give 1-3600 seconds" in capsys.readouterr().err
    assert not (tmp_path / "identity" / "actions.journal").exists()  # nothing written down
