"""docs/test-vectors/intervals.json: the gateway's tag driver makes these intervals of these
beacons, byte for byte; every record verifies; the continuity the platform proves holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from central.record import Registration, parse_record
from central.verifier import Verifier
from lab import interval_vectors

DIRECTORY = Path(__file__).resolve().parents[1] / "docs" / "test-vectors"
SCHEMA = json.loads((DIRECTORY.parent / "record.schema.json").read_text())


def load() -> dict[str, Any]:
    vec: dict[str, Any] = json.loads((DIRECTORY / interval_vectors.FILE).read_text("ascii"))
    return vec


# (lab.vectors writes the file: tests/test_vectors.py checks it is reproduced byte for byte)


def test_every_record_verifies_and_follows_the_schema() -> None:
    vec = load()
    reg = Registration.from_json(vec["registration"])
    verifier = Verifier({reg.gateway_id: reg})
    for r in vec["records"]:
        data = bytes.fromhex(r["canonical_hex"])
        jsonschema.validate(parse_record(data), SCHEMA)
        assert len(verifier.ingest(data, vec["topic"])) == 1
    summary = verifier.summary()
    assert summary["verified"] == len(vec["records"])
    assert verifier.gaps(vec["gateway"]) == []


def test_intervals_are_continuous_but_for_explained_holes() -> None:
    vec = load()
    records = [parse_record(bytes.fromhex(r["canonical_hex"])) for r in vec["records"]]
    found = interval_vectors.continuity(records, vec["tag"])
    assert found == vec["continuity"]
    intervals = found["intervals"]
    assert {i["closed"] for i in intervals} == {"state_change", "max_age", "stop"}
    assert found["holes"] == [{"from_counter": 12, "to_counter": 30,
                               "explained_by": {"seq": 7, "kind": "tag.absent"}}]
    # every beacon heard is in exactly one interval; the lost ones are radio loss inside
    # an interval or the explained hole
    heard = [int(bytes.fromhex(s["beacon_hex"])[4:8][::-1].hex(), 16)
             for s in vec["steps"] if s["do"] == "beacon"]
    for counter in heard:
        assert sum(i["first_counter"] <= counter <= i["last_counter"]
                   for i in intervals) == 1
    assert sum(i["beacons"] for i in intervals) == len(heard)
    # an interval is sealed just before the transition record it precedes
    kinds = [r["kind"] for r in records]
    for k, kind in enumerate(kinds):
        if kind in ("tag.tamper", "tag.tamper_restored", "tag.absent", "tag.present",
                    "tag.spoof"):
            assert kinds[k - 1] == "tag.interval"
