"""The benchmarks stay runnable: a tiny run of bench/pipeline.py prints every key.

Figures are measured by the benches, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = ["records_per_s", "cpu_us_per_record", "record_bytes", "disk_bytes_written_per_record",
        "drain_records_per_s", "restart_s_1m", "peak_rss_mb", "sign_only_per_s",
        "alarm_latency_ms_p99", "tinydb_records_per_s", "tinydb_disk_bytes_written_per_record",
        "interleaved_records_per_s", "interleaved_sign_only_per_s",
        "records_per_s_vs_sign_only_interleaved", "interleaved_slice_ratio_min"]

pytestmark = pytest.mark.slow


def test_pipeline_bench_quick_run_prints_every_key(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "bench" / "pipeline.py"), "--quick",
                          "--json", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode in (0, 1), run.stderr[-2000:]  # 1: a target missed, not a crash
    out = json.loads(run.stdout.strip().splitlines()[-1])
    missing = [k for k in KEYS if not isinstance(out.get(k), int | float)]
    assert missing == []
    assert out["drain_left_in_store"] == 0
    assert set(out["targets"]) >= {"records_per_s", "alarm_latency_ms_p99", "peak_rss_mb"}


HOME_DAY_KEYS = ["measured_s", "records_received", "records_sealed", "uplink_wire_bytes",
                 "uplink_payload_bytes", "disk_bytes_written", "home_day_records",
                 "home_day_uplink_bytes", "home_day_disk_bytes_written"]


def test_home_day_bench_quick_run_prints_every_key(tmp_path: Path) -> None:
    """A minute of a home through the real daemon, simulators and mosquitto: the keys are
    there, the window saw every kind of the home's steady traffic, and the day figures are
    labelled as extrapolated."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "home_day.py"), "--quick",
                          "--json", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=420, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    missing = [k for k in HOME_DAY_KEYS if not isinstance(out.get(k), int | float)]
    assert missing == []
    assert out["home_day_fsyncs"] is None or isinstance(out["home_day_fsyncs"], int)
    assert "EXTRAPOLATED" in out["home_day_label"]
    assert out["records_by_kind"].get("checkin", 0) >= 1  # at least one during the run
    assert out["records_received"] > 0
    assert out["uplink_wire_bytes"] > out["uplink_payload_bytes"] > 0  # TLS and MQTT on top
    assert set(out["targets"]) == {"home_day_uplink_bytes", "home_day_disk_bytes_written"}
    platform = out["platform"]  # the real ingest took every message: verified, no gap
    assert platform["records_stored"] >= out["records_received"]
    assert platform["quarantined"] == {}
    assert platform["gaps_unexplained"] == platform["chain_breaks"] == 0
    assert platform["presence_holes_unexplained"] == platform["presence_anomalies"] == 0
