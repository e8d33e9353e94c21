"""The record format as documented for the platform: JSON Schema, docs, AsyncAPI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from buffer.store import Evicted
from buffer.writer import gap_reading
from central.verifier import Verifier
from core.clock import Clock
from core.devices import PairedTag
from core.kinds import KIND_PRIORITY
from core.record import Reading, Source
from core.session import rotation_body
from core.suites import SUITES, SoftwareKey
from core.topics import records_topic, status_topic
from drivers.gnss import GnssMonitor, Installed
from drivers.nmea import Fix
from drivers.tag_receiver import MSG_BEACON, TagReceiverDriver
from firmware_bridge.framed import LedgerOnly
from firmware_bridge.link import Message
from firmware_bridge.messages import DeviceClass, Hello
from lab.chains import Chain
from lab.simulators.tag import SimTag

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCHEMA = json.loads((DOCS / "record.schema.json").read_text())
S = 10**9


def produced_readings(chain: Chain | None = None) -> list[Reading]:
    """Readings from the code that makes them in the gateway, of as many kinds as we can
    (sealed after *chain*'s key.session, at seq 2 on)."""
    chain = chain or Chain()
    assert chain.identity is not None
    out: list[Reading] = []
    hello = Hello(1, DeviceClass.TAG_RECEIVER, (1, 0, 0), 1, "TR-0001")
    tags = {"T00001000": PairedTag("T00001000", bytes(16), 60, 0)}
    drv = TagReceiverDriver(tags, lambda _k: None)
    tag = SimTag(0x1000, bytes(16), battery_pct=10, strap_closed=False)
    for event, beacon in enumerate([tag.beacon(), tag.beacon(), tag.forged()], 1):
        made = drv.on_message(Message("TR-0001", event, MSG_BEACON, beacon.to_bytes()),
                              hello, S)
        out += [] if isinstance(made, LedgerOnly) else made  # the spoof closes an interval
    made = drv.on_message(Message("TR-0001", 9, MSG_BEACON, b"\x01"), hello, S)
    assert not isinstance(made, LedgerOnly)
    out += made
    out += drv.tick(1000 * S)
    mon = GnssMonitor(Source("gnss", "port:gnss"), installed=Installed(0, 0, 100, 0))
    out += mon.on_fix(Fix(10000000, 10000000, 1, 8, 90, 120, None, "GPGGA", S))
    out.append(gap_reading([Evicted(3, 5, 100), Evicted(3, 6, 100)],
                           Source("gateway", "gw-test-0001"), S))
    new_identity = SoftwareKey.generate(chain.identity.alg)
    out.append(Reading("key.rotate", Source("gateway", "gw-test-0001"),
                       rotation_body(gateway_id=chain.gateway_id, new=new_identity,
                                     new_class="file", from_seq=len(out) + 2,
                                     current=chain.identity, current_class="file"), S))
    out.append(Reading("time.step", Source("gateway", "gw-test-0001"),
                       {"from": "unsynced", "to": "gnss", "from_utc_ms": 1, "to_utc_ms": 2,
                        "delta_ms": 1}, S))
    return out


def sealed_data(readings: list[Reading], chain: Chain | None = None) -> list[bytes]:
    """As the gateway seals them: its start's key.session (seq 1), then *readings*."""
    chain = chain or Chain()
    clock = Clock()
    out = [chain.start_session(clock.timestamp(time.monotonic_ns())).data]
    for r in readings:
        out.append(chain.sealer.seal(r, clock.timestamp(time.monotonic_ns())).data)
    return out


def sealed(readings: list[Reading], chain: Chain | None = None) -> list[dict[str, Any]]:
    return [json.loads(data) for data in sealed_data(readings, chain)]


@pytest.mark.parametrize("suite", list(SUITES))
def test_every_produced_record_validates(suite: str) -> None:
    chain = Chain(suite=suite)
    data = sealed_data(produced_readings(chain), chain)
    records = [json.loads(d) for d in data]
    kinds = {r["kind"] for r in records}
    assert {"tag.interval", "tag.spoof", "tag.tamper", "tag.battery_low", "tag.absent",
            "gnss.fix", "gateway.moved", "gap", "key.session", "key.rotate",
            "device.error"} <= kinds
    for rec in records:
        jsonschema.validate(rec, SCHEMA)
    # and they are what the platform verifies (the key.rotate certificate included)
    v = Verifier({chain.gateway_id: chain.registration})
    v.ingest(b"\n".join(data))
    assert v.summary()["verified"] == len(records)
    assert v.summary()["forged_certificate"] == v.summary()["malformed"] == 0


def boot_record() -> dict[str, Any]:
    return sealed([Reading("gateway.boot", Source("gateway", "gw-test-0001"), {"boot": 1}, S)])[-1]


@pytest.mark.parametrize(("field", "value"), [
    ("seq", 0), ("tq", "sundial"), ("prio", "urgent"), ("extra", 1), ("sig", "short"),
    ("v", 1), ("alg", "hmac-sha256"), ("kid", "short"),
])
def test_the_schema_refuses_what_the_format_forbids(field: str, value: object) -> None:
    rec = boot_record()
    jsonschema.validate(rec, SCHEMA)
    rec[field] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rec, SCHEMA)


@pytest.mark.parametrize("field", ["alg", "v", "kid", "sig"])
def test_the_schema_requires_every_field_of_format_2(field: str) -> None:
    rec = boot_record()
    del rec[field]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rec, SCHEMA)


@pytest.mark.parametrize(("where", "value"), [
    ("cert_sig", None), ("cert.type", "identity"), ("cert.identity", None),
    ("cert.identity.class", "hsm"), ("cert.key", "short"), ("cert.alg", "rsa"),
])
def test_the_schema_refuses_a_malformed_session_certificate(where: str, value: object) -> None:
    rec = sealed([])[0]
    assert rec["kind"] == "key.session"
    jsonschema.validate(rec, SCHEMA)
    *path, last = where.split(".")
    target = rec["body"]
    for name in path:
        target = target[name]
    if value is None:
        del target[last]
    else:
        target[last] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rec, SCHEMA)


def test_floats_fail_the_schema() -> None:
    rec = boot_record()
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
