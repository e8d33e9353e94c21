"""Over real pseudo-terminals, with a faulty wire: nothing lost, nothing twice, nothing forged.

The long run is ``python bench/serial_faults.py --json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lab import serial_faults
from lab.simulators.device import PacedLine

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("protocol", "window"), [(1, 0), (2, 16)], ids=["v1", "v2-window"])
def test_lossy_wire_spoofing_tags_and_an_unplug(protocol: int, window: int) -> None:
    out = serial_faults.run(150, bit_error_rate=1e-3, drop_rate=0.01, spoofs=10, replays=10,
                            rate=300, seed=5, unplug=True, unplug_s=0.5, reboot=True,
                            garbage_rate=0.02, timeout_s=90, protocol=protocol,
                            window=window)
    assert out["completed"]
    assert out["events_lost"] == 0
    assert out["events_duplicated"] == 0
    assert out["events_corrupted"] == 0
    assert out["events_committed_once"] == out["events_sent"] == 170
    assert out["spoof_rejected"] == out["spoof_sent"] == 20
    assert out["replug_recovery_s"] is not None
    # the wire really was faulty, and the link really worked for it
    assert out["wire_faults"]["to_host"]["dropped"] > 0
    assert out["link"]["bad_frames"] > 0
    if protocol == 1:  # a burst per write at random: the window makes fewer, larger writes
        assert out["wire_faults"]["to_host"]["garbage_bursts"] > 0
    assert out["link"]["window"] == window  # the window was in force at the end


def test_a_clean_wire_with_a_window_needs_no_retransmission() -> None:
    out = serial_faults.run(300, bit_error_rate=0, drop_rate=0, spoofs=0, replays=0,
                            rate=2000, seed=1, unplug=False, reboot=False, garbage_rate=0,
                            timeout_s=60, protocol=2, window=32)
    assert out["events_committed_once"] == out["events_sent"] == 300
    assert out["link"]["window"] == 32
    assert out["link"]["bad_frames"] == 0
    assert out["link"]["device_retransmits"] == 0


def test_a_slow_device_is_served_all_the_same() -> None:
    out = serial_faults.run(30, bit_error_rate=0, drop_rate=0, spoofs=0, replays=0, rate=50,
                            seed=2, unplug=False, reboot=False, garbage_rate=0,
                            byte_delay_s=0.002, timeout_s=60)
    assert out["events_committed_once"] == out["events_sent"] == 30


def test_a_clean_wire_needs_no_retransmission() -> None:
    out = serial_faults.run(100, bit_error_rate=0, drop_rate=0, spoofs=0, replays=0, rate=500,
                            seed=1, unplug=False, reboot=False, garbage_rate=0, timeout_s=60)
    assert out["events_committed_once"] == out["events_sent"] == 100
    assert out["link"]["bad_frames"] == 0


def test_a_paced_line_delivers_each_byte_when_its_last_bit_would_arrive() -> None:
    byte = 10 / 115_200  # 8N1: 86.8 us a byte
    eps = 1e-9
    line = PacedLine(115_200)
    line.put(bytes(40), 1.0)  # 32 bytes (a FIFO's worth), then 8
    assert line.due(1.0 + 32 * byte - eps) == b""
    assert line.due(1.0 + 32 * byte + eps) == bytes(32)
    line.put(b"\x01", 1.0)  # behind what is on the line already
    assert line.next_at == pytest.approx(1.0 + 40 * byte)
    assert line.due(1.0 + 41 * byte + eps) == bytes(8) + b"\x01"
    assert line.next_at is None
    line.put(b"\x02", 5.0)  # an idle line starts when fed
    assert line.due(5.0 + byte + eps) == b"\x02"


def test_the_serial_line_bench_runs_both_versions_through_the_stack() -> None:
    """Smoke run of bench/serial_line.py (its figures are the bench's, not asserted)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import serial_line

    for protocol, window in ((1, 0), (2, 8)):
        out = serial_line.run_one(40, protocol=protocol, window=window, paced=True,
                                  timeout_s=60)
        assert out["completed"]
        assert out["window"] == window
        assert (out["receipts"] == 0) == (protocol == 1)  # RECEIPTs only with the window
