"""``gateway.py demo --scenario supervision`` (lab/scenario_supervision.py, issue 14 item 7):
the whole demo as a user runs it, and the scenario's own helpers."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import zoneinfo
from pathlib import Path

import pytest

from core.commands import sign_command
from core.suites import ED25519, SoftwareKey
from lab.scenario_supervision import LabWall, forged_from, next_midnight, p99

REPO = Path(__file__).resolve().parents[1]
#: The Done-when's duration; the demo then drains and waits for the script's last record.
DURATION_S = 60


@pytest.mark.slow
def test_the_supervision_demo_shows_every_step_on_record() -> None:
    proc = subprocess.run(
        [sys.executable, "gateway.py", "demo", "--scenario", "supervision", "--duration",
         str(DURATION_S), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=DURATION_S + 150, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["commands_rejected"] == out["forged_or_replayed_sent"] > 0
    assert out["presence_violations"] >= 1
    assert out["presence_returns"] == out["presence_violations"]
    assert out["leave_late_returns"] >= 1
    assert out["spot_checks_answered"] >= 1
    assert out["authorisation_expired"] >= 1
    assert out["published"] == out["received"] == out["verified"]
    assert out["bad_signature"] == 0
    assert out["chain_gaps"] == 0
    # the rest of the new keys, consistent with the records
    assert out["commands_applied"] == out["kinds"]["command.applied"] >= 1
    assert out["commands_sent"] == out["commands_applied"] + out["commands_rejected"]
    assert isinstance(out["spot_check_ms_p99"], int)
    assert out["spot_check_ms_p99"] > 0
    assert out["kinds"]["time.step"] == 1  # the lab's step, on record
    assert out["lab_clock_step_ms"] > 1000


def test_next_midnight_is_the_first_anywhere() -> None:
    at = dt.datetime(2027, 3, 28, 0, 50, tzinfo=dt.UTC)  # Europe's DST change that night
    at_ms = int(at.timestamp() * 1000)
    zone, day, midnight_ms = next_midnight(at_ms)
    assert midnight_ms > at_ms
    local = dt.datetime.fromtimestamp(midnight_ms / 1000, zoneinfo.ZoneInfo(zone))
    assert (local.hour, local.minute) == (0, 0)
    assert local.date() == day + dt.timedelta(days=1)
    # no zone reaches its midnight earlier (a sample, including the quarter-hour ones)
    for name in ("Asia/Kathmandu", "Australia/Eucla", "Asia/Kolkata", "Pacific/Chatham",
                 "America/St_Johns", "Europe/Berlin", "UTC"):
        z = zoneinfo.ZoneInfo(name)
        nxt = dt.datetime.combine(at.astimezone(z).date() + dt.timedelta(days=1), dt.time(),
                                  z)
        assert int(nxt.timestamp() * 1000) >= midnight_ms
    assert midnight_ms - at_ms <= 30 * 60_000  # every midnight is on a UTC quarter hour


def test_p99_and_the_lab_wall() -> None:
    assert p99([]) is None
    assert p99([5.0]) == 5.0
    assert p99([float(i) for i in range(1, 201)]) == 198.0
    wall = LabWall()
    before = wall()
    wall.step(600_000)
    assert wall() - before >= 600_000 * 1_000_000


def test_the_forged_command_keeps_the_signature_of_other_bytes() -> None:
    key = SoftwareKey.generate(ED25519)
    data = sign_command(key, gw="gw-1", cseq=1, issued_at_ms=1, not_after_ms=2,
                        kind="set-authorisation", body={"tag": "T00000001",
                                                        "end": "2027-01-31"})
    forged = json.loads(forged_from(data, 5))
    original = json.loads(data)
    assert forged["sig"] == original["sig"]
    assert (forged["cseq"], forged["body"]["end"]) == (5, "2027-04-01")
