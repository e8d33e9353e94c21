"""The record format as documented for the platform: JSON Schema, docs, AsyncAPI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from buffer.seal import Sealer, rotation_body
from buffer.store import Evicted
from buffer.writer import gap_reading
from core.clock import Clock
from core.devices import PairedTag
from core.kinds import KIND_PRIORITY
from core.record import GENESIS_PREV, Reading, Source
from core.topics import records_topic, status_topic
from drivers.gnss import GnssMonitor, Installed
from drivers.nmea import Fix
from drivers.tag_receiver import MSG_BEACON, TagReceiverDriver
from firmware_bridge.link import Message
from firmware_bridge.messages import DeviceClass, Hello
from lab.simulators.tag import SimTag

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCHEMA = json.loads((DOCS / "record.schema.json").read_text())
KEY = Ed25519PrivateKey.generate()
S = 10**9


def produced_readings() -> list[Reading]:
    """Readings from the code that makes them in the gateway, of as many kinds as we can."""
    out: list[Reading] = []
    hello = Hello(1, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1, "TR-0001")
    tags = {"T00001000": PairedTag("T00001000", bytes(16), 60, 0)}
    drv = TagReceiverDriver(tags, lambda _k: None)
    tag = SimTag(0x1000, bytes(16), battery_pct=10, strap_closed=False)
    for event, beacon in enumerate([tag.beacon(), tag.forged()], 1):
        out += drv.on_message(Message("TR-0001", event, MSG_BEACON, beacon.to_bytes()),
                              hello, S)
    out += drv.on_message(Message("TR-0001", 9, MSG_BEACON, b"\x01"), hello, S)
    out += drv.tick(1000 * S)
    mon = GnssMonitor(Source("gnss", "port:gnss"), installed=Installed(0, 0, 100, 0))
    out += mon.on_fix(Fix(10000000, 10000000, 1, 8, 90, 120, None, "GPGGA", S))
    out.append(gap_reading([Evicted(3, 5, 100), Evicted(3, 6, 100)],
                           Source("gateway", "gw-test-0001"), S))
    out.append(Reading("key.rotate", Source("gateway", "gw-test-0001"),
                       rotation_body(Ed25519PrivateKey.generate().public_key()), S))
    out.append(Reading("time.step", Source("gateway", "gw-test-0001"),
                       {"from": "unsynced", "to": "gnss", "from_utc_ms": 1, "to_utc_ms": 2,
                        "delta_ms": 1}, S))
    return out


def sealed(readings: list[Reading]) -> list[dict[str, Any]]:
    sealer = Sealer("gw-test-0001", KEY, last_seq=0, last_digest=GENESIS_PREV, boot=1)
    clock = Clock()
    return [json.loads(sealer.seal(r, clock.timestamp(time.monotonic_ns())).data)
            for r in readings]


def test_every_produced_record_validates() -> None:
    records = sealed(produced_readings())
    kinds = {r["kind"] for r in records}
    assert {"tag.presence", "tag.spoof", "tag.tamper", "tag.battery_low", "tag.absent",
            "gnss.fix", "gateway.moved", "gap", "key.rotate", "device.error"} <= kinds
    for rec in records:
        jsonschema.validate(rec, SCHEMA)


@pytest.mark.parametrize(("field", "value"), [
    ("seq", 0), ("tq", "sundial"), ("prio", "urgent"), ("extra", 1), ("sig", "short"),
])
def test_the_schema_refuses_what_the_format_forbids(field: str, value: object) -> None:
    rec = sealed([Reading("gateway.boot", Source("gateway", "gw-test-0001"), {"boot": 1}, S)])[0]
    rec[field] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rec, SCHEMA)


def test_floats_fail_the_schema() -> None:
    rec = sealed([Reading("gateway.boot", Source("gateway", "gw-test-0001"), {"boot": 1}, S)])[0]
    rec["body"]["lat"] = 46.8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rec, SCHEMA)


def test_every_kind_is_documented() -> None:
    text = (DOCS / "records.md").read_text()
    missing = [k for k in KIND_PRIORITY if f"`{k}`" not in text]
    assert missing == []


def test_asyncapi_names_the_topics_the_gateway_uses() -> None:
    api = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    addresses = {c["address"] for c in api["channels"].values()}
    assert records_topic("{gatewayId}") in addresses
    assert status_topic("{gatewayId}") in addresses
    assert api["operations"]["publishRecords"]["bindings"]["mqtt"]["qos"] == 1
