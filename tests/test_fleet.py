"""The fleet benchmark's quick mode (bench/fleet.py --quick): 50 gateways, each a real
MQTT client with its own chain, 2 ingest consumers on PostgreSQL sharing a subscription,
then a regional outage where every gateway reconnects at once with a backlog. Nothing is
lost, nothing is stored twice, no conflict, every alarm stored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_quick_fleet_loses_and_duplicates_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "bench/fleet.py", "--json", "--quick", "--gateways", "50",
         "--consumers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["gateways"] == 50
    assert out["records_sent"] == 50 * (out["records_per_gateway"]
                                        + out["backlog_per_gateway"])
    assert out["records_stored"] == out["records_sent"]
    assert out["records_lost"] == 0
    assert out["duplicates_stored"] == 0
    assert out["conflicts"] == 0
    assert out["quarantined"] == 0
    assert out["held"] == 0
    assert out["chain_breaks"] == 0
    assert set(out["ingest_records_per_s_by_consumers"]) == {"2"}
    assert out["ingest_records_per_s_by_consumers"]["2"] > 0
    phase = out["phases"]["2"]
    assert phase["alarms_stored"] == phase["alarms_sent"] > 0
    outage = out["outage"]
    assert outage["alarms_stored"] == outage["alarms"] > 0
    assert outage["drain_s"] > 0
    assert outage["alarm_latency_ms_p99"] is not None
    assert out["alarm_latency_ms_p99"] is not None
    assert "plain TCP" in out["transport"]
    assert out["machine"]["cpus"]
