"""The platform's signed commands (core/commands.py, app/commands.py, central/commands.py,
docs/commands.md): every refusal and its reason, the parser fuzzed, the gateway applying
them exactly once (across a SIGKILL between receipt and application), and end to end over a
real mosquitto with mTLS and the production ACL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.assembly import Gateway
from app.commands import ANNOUNCED_KEY, KILL_ENV, MAX_WAITING, NOISE_RECORDS, PENDING_FILE
from app.config import Config, DeviceSection
from buffer.store import store_path
from central import command_keys as root_side
from central import commands as tool
from central.commands import Issued, Outcome
from central.db import Database, open_db
from core.clock import Clock
from core.command_keys import (
    CommandKeyCert,
    CommandKeyring,
    CommandRoot,
    Revoked,
    make_certificate,
    make_revocations,
)
from core.commands import (
    BOX_SM2,
    BOX_X25519,
    CONSUMING,
    MAX_COMMAND_BYTES,
    MAX_LIFETIME_MS,
    MAX_SKEW_MS,
    REASONS,
    BoxKey,
    Command,
    Duplicate,
    PairKiosk,
    PairTag,
    Refusal,
    SetConfig,
    UnpairTag,
    check_command,
    command_digest,
    device_key_aad,
    digest_value,
    make_box_document,
    parse_box_document,
    sign_command,
)
from core.record import b64u, canonical
from core.suites import ED25519, SoftwareKey, Verifier
from core.topics import COMMAND_CN, PLATFORM_CN, commands_topic
from firmware_bridge.messages import DeviceClass
from lab.mosquitto import Mosquitto, Pki, client_config
from lab.simulators.tag import SimTag, TagReceiverSim
from lab.site import NOWHERE, IngestPlatform
from provisioning import command_keys as gateway_keys
from provisioning.identity import Identity, create_identity
from provisioning.registry import open_registry
from tests.helpers import stored_records, wait_for

T0 = 1_760_000_000_000
DAY = 86_400_000
YEAR = 365 * DAY
GW = "gw-cmd-0001"
OTHER = "gw-cmd-0002"
TAG = "T0000BEEF"
TAG_KEY = bytes(range(16))
REPO = Path(__file__).resolve().parents[1]


# --- a platform's keys, a gateway's keyring -------------------------------------------------

@dataclass
class Keys:
    root: SoftwareKey
    good: SoftwareKey  # region *, valid over T0
    north: SoftwareKey  # region north only
    old: SoftwareKey  # expired before T0
    next: SoftwareKey  # valid from T0 + a day
    stolen: SoftwareKey  # revoked
    stranger: SoftwareKey  # never certified
    box: BoxKey  # the gateway's encryption key
    ring: CommandKeyring = field(init=False)

    def __post_init__(self) -> None:
        ring = CommandKeyring(CommandRoot.of(self.root))
        ring.add_revocations(make_revocations(self.root, number=1, issued_at=T0 - DAY, revoked=[
            Revoked(5, self.stolen.kid, "compromised", T0 - DAY, T0 + YEAR)]))
        for serial, key, region, start, end in (
                (1, self.good, "*", T0 - DAY, T0 + YEAR),
                (2, self.north, "north", T0 - DAY, T0 + YEAR),
                (3, self.old, "*", T0 - YEAR, T0 - DAY),
                (4, self.next, "*", T0 + DAY, T0 + YEAR),
                (5, self.stolen, "*", T0 - DAY, T0 + YEAR)):
            ring._add(make_certificate(self.root, key.alg, key.public_raw, region=region,
                                       serial=serial, not_before=start, not_after=end,
                                       issued_at=start), None, refuse_revoked=False)
        self.ring = ring


@pytest.fixture(scope="module")
def keys() -> Keys:
    gen = lambda: SoftwareKey.generate(ED25519)  # noqa: E731
    return Keys(gen(), gen(), gen(), gen(), gen(), gen(), gen(), BoxKey.generate(BOX_X25519))


def pair_tag_body(keys: Keys, *, gw: str = GW, tag: str = TAG, key: bytes = TAG_KEY,
                  **more: Any) -> dict[str, Any]:
    sealed = keys.box.public.seal(key, device_key_aad(gw, "tag", tag))
    return {"tag": tag, "key": sealed.to_json(), **more}


def make(keys: Keys, *, signer: SoftwareKey | None = None, gw: str = GW, cseq: int = 1,
         issued: int = T0, valid: int = DAY, kind: str = "unpair-tag",
         body: dict[str, Any] | None = None) -> bytes:
    return sign_command(signer or keys.good, gw=gw, cseq=cseq, issued_at_ms=issued,
                        not_after_ms=issued + valid, kind=kind,
                        body={"tag": TAG} if body is None else body)


def resign(data: bytes, signer: SoftwareKey, **changes: Any) -> bytes:
    obj = json.loads(data)
    obj.update(changes)
    obj.pop("sig")
    obj["sig"] = b64u(signer.sign(canonical(obj)))
    return canonical(obj)


def check(keys: Keys, data: bytes, *, last: int = 0, now: int | None = T0,
          region: str | None = None, floor: int = 0,
          applied: Callable[[int], int | None] | None = None,
          box: BoxKey | None = None) -> Command | Refusal | Duplicate:
    return check_command(data, gateway_id=GW, keyring=keys.ring, region=region, now_ms=now,
                         last_cseq=last, floor_ms=floor, applied=applied,
                         box=box if box is not None else keys.box)


def reason(outcome: object) -> str:
    assert isinstance(outcome, Refusal), outcome
    return outcome.reason


# --- every refusal ---------------------------------------------------------------------------

def test_valid_commands_of_every_kind_pass_with_their_typed_body(keys: Keys) -> None:
    got = check(keys, make(keys, kind="pair-tag", body=pair_tag_body(keys, absent_after_s=300)))
    assert isinstance(got, Command)
    assert isinstance(got.body, PairTag)
    assert got.body.plain == TAG_KEY
    assert got.body.absent_after_s == 300
    assert not got.body.replace
    assert got.secret
    assert TAG_KEY.hex() not in repr(got)
    assert isinstance(check(keys, make(keys)).body, UnpairTag)  # type: ignore[union-attr]
    serial = "KI-0001"
    sealed = keys.box.public.seal(TAG_KEY, device_key_aad(GW, "kiosk", serial)).to_json()
    kiosk = check(keys, make(keys, kind="pair-kiosk", body={"serial": serial, "key": sealed,
                                                              "replace": True}))
    assert isinstance(kiosk, Command)
    assert isinstance(kiosk.body, PairKiosk)
    assert kiosk.body.plain == TAG_KEY
    assert kiosk.body.replace
    conf = check(keys, make(keys, kind="set-config",
                            body={"key": "health_interval_s", "value": 600}))
    assert isinstance(conf, Command)
    assert conf.body == SetConfig("health_interval_s", 600, None)
    # a regional key on a gateway of its region; a key judged by trusted time only
    assert isinstance(check(keys, make(keys, signer=keys.north), region="north"), Command)


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda d: d + b" " * MAX_COMMAND_BYTES, "too_large"),
    (lambda _d: b"\xff\xfe", "malformed"),
    (lambda _d: b"[1,2]", "malformed"),
    (lambda d: d.replace(b'"cseq":1,', b'"cseq":1,"cseq":1,'), "malformed"),
    (lambda d: d.replace(b'"cseq":1', b'"cseq":1.0'), "malformed"),
    (lambda d: d.replace(b'{"alg"', b'{ "alg"'), "non_canonical"),
    (lambda d: canonical({k: v for k, v in json.loads(d).items() if k != "sig"}), "unsigned"),
    (lambda d: d.replace(b'"tag":"T0000BEEF"', b'"tag":"T0000BEEE"'), "bad_signature"),
], ids=["too_large", "not_utf8", "not_object", "dup_key", "float", "whitespace", "no_sig",
        "altered"])
def test_the_form_is_checked_first(keys: Keys, mutate: Callable[[bytes], bytes],
                                   why: str) -> None:
    data = mutate(make(keys))
    got = check(keys, data)
    assert reason(got) == why
    assert isinstance(got, Refusal)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert not got.consumes  # anyone's garbage leaves the sequence alone


@pytest.mark.parametrize(("change", "detail"), [
    ({"v": 2}, "format version"), ({"gw": "GW!"}, "gateway id"), ({"cseq": 0}, "cseq"),
    ({"extra": 1}, "not a field"), ({"kind": "Pair Tag"}, "kind"),
    ({"not_after_ms": T0 + MAX_LIFETIME_MS + 1}, "7 days"), ({"not_after_ms": T0}, "7 days"),
    ({"alg": "rsa"}, "alg"), ({"body": []}, "'body'"), ({"cseq": True}, "'cseq'"),
], ids=["version", "gw", "cseq0", "extra", "kind", "lifetime", "no_lifetime", "alg", "body",
        "bool"])
def test_malformed_fields_are_named(keys: Keys, change: dict[str, Any], detail: str) -> None:
    got = check(keys, resign(make(keys), keys.good, **change))
    assert reason(got) == "malformed"
    assert isinstance(got, Refusal)
    assert detail in got.detail


def test_the_key_must_be_certified_current_unrevoked_and_of_the_region(keys: Keys) -> None:
    assert reason(check(keys, make(keys, signer=keys.stranger))) == "unknown_key"
    assert reason(check(keys, make(keys, signer=keys.stolen))) == "revoked"
    assert reason(check(keys, make(keys, signer=keys.north), region="south")) == "wrong_region"
    assert reason(check(keys, make(keys, signer=keys.north))) == "wrong_region"  # no region
    assert reason(check(keys, make(keys, signer=keys.old))) == "expired_key"
    assert reason(check(keys, make(keys, signer=keys.next))) == "key_not_yet_valid"
    no_keys = check_command(make(keys), gateway_id=GW, keyring=None, region=None, now_ms=T0,
                            last_cseq=0)
    assert reason(no_keys) == "unknown_key"
    # a command naming the good key but signed by another: bad_signature
    forged = resign(make(keys), keys.stranger, kid=keys.good.kid)
    assert reason(check(keys, forged)) == "bad_signature"
    # alg that is not the key's
    assert reason(check(keys, resign(make(keys), keys.good, alg="sm2-sm3"))) == "bad_signature"


def test_gateway_sequence_and_time(keys: Keys) -> None:
    other = make(keys, gw=OTHER)
    assert reason(check(keys, other)) == "wrong_gateway"
    first = make(keys, cseq=5)
    applied = {5: digest_value(command_digest(first))}
    again = check(keys, first, last=5, applied=applied.get)
    assert again == Duplicate(5, command_digest(first))
    replay = check(keys, make(keys, cseq=5, issued=T0 + 1), last=5, applied=applied.get)
    assert reason(replay) == "replayed"
    assert isinstance(replay, Refusal)
    assert replay.expected_cseq == 6
    assert not replay.consumes
    assert reason(check(keys, make(keys, cseq=3), last=5)) == "replayed"  # history gone
    gap = check(keys, make(keys, cseq=8), last=5)
    assert reason(gap) == "out_of_order"
    assert isinstance(gap, Refusal)
    assert gap.expected_cseq == 6
    late = check(keys, make(keys, issued=T0 - DAY, valid=DAY))
    assert reason(late) == "expired"
    assert isinstance(late, Refusal)
    assert late.consumes
    assert isinstance(check(keys, make(keys, issued=T0 + MAX_SKEW_MS)), Command)
    early = check(keys, make(keys, issued=T0 + MAX_SKEW_MS + 1))
    assert reason(early) == "not_yet_valid"


def test_without_trusted_time_the_floor_and_the_lifetime_decide(keys: Keys) -> None:
    # no trusted time: a command is taken unless time is known to be past its not_after
    cmd = make(keys, issued=T0, valid=DAY)
    assert isinstance(check(keys, cmd, now=None, floor=T0 - YEAR), Command)
    assert isinstance(check(keys, cmd, now=None, floor=T0 + DAY - 1), Command)
    assert reason(check(keys, cmd, now=None, floor=T0 + DAY)) == "expired"
    # its key judged at max(floor, issued_at): a key expired by then is refused
    old = make(keys, signer=keys.old, issued=T0 - YEAR + DAY)
    assert isinstance(check(keys, old, now=None, floor=0), Command)
    assert reason(check(keys, old, now=None, floor=T0)) == "expired_key"


@pytest.mark.parametrize(("kind", "body", "field"), [
    ("pair-tag", {"tag": "t0000beef", "key": {}}, "tag"),
    ("pair-tag", {"tag": TAG, "key": TAG_KEY.hex()}, "key"),
    ("pair-tag", {"tag": TAG}, "key"),
    ("pair-tag", {"tag": TAG, "key": {"alg": "aes"}}, "key.alg"),
    ("pair-tag", {"tag": TAG, "key": {"alg": BOX_X25519, "kid": "x", "ct": "AA",
                                      "epk": "AA"}}, "key.ct"),
    ("unpair-tag", {"tag": TAG, "why": "moved"}, "why"),
    ("unpair-kiosk", {"serial": " KI-1"}, "serial"),
    ("set-config", {"key": "health_interval_s", "value": 5}, "value"),
    ("set-config", {"key": "health_interval_s", "value": 86_401}, "value"),
    ("set-config", {"key": "quota_bytes", "value": 1}, "key"),
    ("set-config", {"key": "absent_after_s", "value": 60}, "tag"),
    ("set-config", {"key": "health_interval_s", "value": 600, "tag": TAG}, "tag"),
    ("set-config", {"key": "absent_after_s", "value": 5, "tag": TAG}, "value"),
], ids=["tag_form", "key_in_clear", "no_key", "key_alg", "short_ct", "extra", "serial",
        "interval_low", "interval_high", "unknown_setting", "tag_missing", "tag_extra",
        "absent_low"])
def test_bad_bodies_name_the_field(keys: Keys, kind: str, body: dict[str, Any],
                                   field: str) -> None:
    got = check(keys, make(keys, kind=kind, body=body))
    assert reason(got) == "bad_body"
    assert isinstance(got, Refusal)
    assert got.field == field
    assert got.consumes


def test_a_device_key_decrypts_only_for_its_gateway_and_device(keys: Keys) -> None:
    other_box = BoxKey.generate(BOX_X25519)
    for body, where in (
            (pair_tag_body(keys, gw=OTHER), "key.ct"),  # sealed for another gateway
            (pair_tag_body(keys, tag="T0000BEEE") | {"tag": TAG}, "key.ct"),  # another tag
            ({"tag": TAG, "key": other_box.public.seal(
                TAG_KEY, device_key_aad(GW, "tag", TAG)).to_json()}, "key.kid")):
        got = check(keys, make(keys, kind="pair-tag", body=body))
        assert reason(got) == "bad_body"
        assert isinstance(got, Refusal)
        assert got.field == where
        assert TAG_KEY.hex() not in got.detail


def test_unknown_kinds_and_every_reason_listed(keys: Keys) -> None:
    got = check(keys, make(keys, kind="reboot-now", body={}))
    assert reason(got) == "unknown_kind"
    assert isinstance(got, Refusal)
    assert got.consumes
    assert set(CONSUMING) <= set(REASONS)
    with pytest.raises(ValueError, match="unknown refusal"):
        Refusal("nope", "", "")


def test_sm2_encryption_and_the_signed_box_document(keys: Keys) -> None:
    box = BoxKey.generate(BOX_SM2)
    aad = device_key_aad(GW, "tag", TAG)
    assert box.open(box.public.seal(TAG_KEY, aad), aad) == TAG_KEY
    with pytest.raises(ValueError, match="decrypt"):
        box.open(box.public.seal(TAG_KEY, aad), device_key_aad(GW, "tag", "T00000001"))
    identity = SoftwareKey.generate(ED25519)
    doc = make_box_document(identity, gateway_id=GW, box=keys.box.public, created_ms=T0)
    known = {identity.kid: Verifier(identity.alg, identity.public_raw)}
    assert parse_box_document(doc, known, GW) == keys.box.public
    with pytest.raises(ValueError, match="not an identity key"):
        parse_box_document(doc, {}, GW)
    with pytest.raises(ValueError, match="does not verify"):
        parse_box_document({**doc, "created_ms": T0 + 1}, known, GW)
    with pytest.raises(ValueError, match="not the encryption key"):
        parse_box_document(doc, known, OTHER)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(data=st.one_of(
    st.binary(max_size=512),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.sampled_from(["v", "gw", "cseq", "kind", "body", "kid",
                                                    "alg", "sig", "tag", "key", "x"]),
                                   inner, max_size=6),
                 max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_garbage_never_crashes_the_parser(keys: Keys, data: bytes) -> None:
    got = check(keys, data)
    assert isinstance(got, Refusal)
    assert got.reason in REASONS
    assert not got.consumes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_no_altered_command_is_taken(keys: Keys, position: int, byte: int) -> None:
    data = make(keys, kind="pair-tag", body=pair_tag_body(keys))
    pos = position % len(data)
    altered = data[:pos] + bytes([byte]) + data[pos + 1:]
    got = check(keys, altered)
    if altered == data:
        assert isinstance(got, Command)
    else:
        assert isinstance(got, Refusal)


# --- the gateway's side, end to end over mosquitto (mTLS, the production ACL) ---------------


@dataclass
class Lab:
    """A platform (its command root and key, its ingest on SQLite) and a gateway identity
    holding the platform's command keys, on one mosquitto."""

    tmp: Path
    broker: Mosquitto
    pki: Pki
    identity: Identity
    db_url: str
    signer: SoftwareKey
    cert: CommandKeyCert
    ingest: IngestPlatform

    def issue(self, kind: str, body: dict[str, Any], *, valid_ms: int = DAY,
              cseq: int | None = None) -> Issued:
        with open_db(self.db_url, migrate=False) as db:
            return tool.issue(db, self.signer, self.cert, self.identity.gateway_id, kind=kind,
                              body=body, valid_ms=valid_ms, created_by="test", cseq=cseq)

    def publish(self, data: bytes, gw: str | None = None) -> None:
        gw = gw or self.identity.gateway_id
        tool.publish(client_config(self.broker, self.pki, COMMAND_CN),
                     Issued(gw, 0, "raw", command_digest(data), data, 0))

    def send(self, kind: str, body: dict[str, Any], **kw: Any) -> Issued:
        issued = self.issue(kind, body, **kw)
        self.publish(issued.data)
        return issued

    def answer(self, issued: Issued | bytes, timeout: float = 20.0) -> Outcome:
        if isinstance(issued, bytes):
            issued = Issued(self.identity.gateway_id, 0, "raw", command_digest(issued),
                            issued, 0)
        with open_db(self.db_url, migrate=False) as db:
            found = tool.wait_answer(db, issued, timeout)
        assert found is not None, f"no answer to {issued.kind} {issued.cseq}"
        return found

    def records(self, kind: str) -> list[dict[str, Any]]:
        with open_db(self.db_url, migrate=False) as db, db.transaction(write=False) as tx:
            rows = tx.all("SELECT data FROM records WHERE gw = ? AND kind = ? ORDER BY seq",
                          (self.identity.gateway_id, kind))
        return [json.loads(bytes(r[0])) for r in rows]

    def box(self) -> Any:
        with open_db(self.db_url, migrate=False) as db:
            return tool.gateway_box(db, self.identity.gateway_id)

    def wait_box(self) -> Any:
        found: list[Any] = []

        def ready() -> bool:
            try:
                found.append(self.box())
            except tool.CommandError:
                return False
            return True
        wait_for(ready, 20, "the gateway's key.encryption record at the platform")
        return found[0]

    def pair_tag_body(self, tag: SimTag, **more: Any) -> dict[str, Any]:
        gw = self.identity.gateway_id
        return {"tag": tag.tag, "key": tool.sealed_key_body(self.wait_box(), gw, "tag",
                                                            tag.tag, tag.key), **more}

    def gateway_config(self, devices: list[DeviceSection] | None = None, *,
                       require_authorisation: bool = True) -> Config:
        return Config(self.tmp / "data",
                      client_config(self.broker, self.pki, self.identity.gateway_id),
                      devices=devices or [], identity_dir=self.identity.directory,
                      require_authorisation=require_authorisation)


@pytest.fixture
def lab(tmp_path: Path, mosquitto: Mosquitto, pki: Pki) -> Iterator[Lab]:
    root_side.init_root(tmp_path / "root")
    root_side.issue(tmp_path / "root", "*", 30, tmp_path / "keys")
    root_side.export(tmp_path / "root", tmp_path / "export")
    identity = create_identity(tmp_path / "identity", GW)
    gateway_keys.install(identity.directory, tmp_path / "export", time.time_ns() // 1_000_000)
    signer, cert = root_side.load_command_signer(tmp_path / "keys" / "command-key-1.key")
    db_url = f"sqlite:///{tmp_path / 'ingest.db'}"
    ingest = IngestPlatform(client_config(mosquitto, pki, PLATFORM_CN), identity, db_url,
                            client_id=PLATFORM_CN).start()
    try:
        yield Lab(tmp_path, mosquitto, pki, identity, db_url, signer, cert, ingest)
    finally:
        ingest.stop()


def running(lab: Lab, devices: list[DeviceSection] | None = None, *,
            require_authorisation: bool = True) -> Gateway:
    """The gateway, its clock synchronised (NTP, as a connected gateway's): commands are
    judged by trusted time (the untrusted case is the sans-IO tests'). It requires an
    authorisation before it records a tag's presence, as in production, unless told."""
    gateway = Gateway(lab.gateway_config(devices, require_authorisation=require_authorisation),
                      lab.identity,
                      clock=Clock(synced=lambda: True))
    gateway.start()
    wait_for(lambda: gateway.forwarder.stats.connected, 15, "the gateway's uplink")
    return gateway


@pytest.mark.slow
def test_pair_tag_over_mqtt_then_its_beacons_are_accepted(lab: Lab) -> None:
    tag = SimTag(0xBEEF, bytes(range(16)))
    sim = TagReceiverSim("TR-CMD-0001", tags=[tag], link=lab.tmp / "tty-tags").start()
    # pairing alone, no authorisation: a bench's setting ([supervision])
    gateway = running(lab, [DeviceSection("tags", DeviceClass.TAG_RECEIVER, sim.path)],
                      require_authorisation=False)
    try:
        driver = gateway._tag_drivers[0]
        sim.send_beacon(tag)
        wait_for(lambda: driver.stats.rejected["unknown_tag"] >= 1, 15, "an unpaired beacon")
        assert gateway.writer.ledger_value(ANNOUNCED_KEY) is not None
        body = lab.pair_tag_body(tag, absent_after_s=600)
        assert tag.key.hex() not in json.dumps(body)  # never in clear on the broker
        started = time.monotonic()
        issued = lab.send("pair-tag", body)
        outcome = lab.answer(issued)
        rtt = time.monotonic() - started
        assert outcome.outcome == "applied", outcome.body
        registry = open_registry(lab.identity)
        try:
            paired = registry.get(tag.tag)
        finally:
            registry.close()
        assert paired is not None
        assert paired.key == tag.key
        assert paired.absent_after_s == 600
        state = outcome.body["state"]
        assert state["of"] == "tags"
        assert state["sha256"] == hashlib.sha256(
            (lab.identity.directory / "tags.json").read_bytes()).hexdigest()
        assert outcome.body["cseq"] == 1
        assert outcome.body["details"]["tag"] == tag.tag
        assert rtt < 10
        # its beacons are taken from now on, without a restart
        for _ in range(3):
            sim.send_beacon(tag)
        # they extend its presence interval (sealed at most interval_max_s later): taken
        wait_for(lambda: gateway.writer.ledger_value(f"tag:{tag.tag}") == tag.counter, 20,
                 "the paired tag's beacons committed (its counter)")
        assert [v.beacons for v in driver.view() if v.tag == tag.tag] == [3]
        # the same command again (the broker's redelivery): acknowledged, not applied again
        lab.publish(issued.data)
        marker = lab.send("set-config", {"key": "health_interval_s", "value": 600})
        assert lab.answer(marker).outcome == "applied"
        assert gateway.commands is not None
        assert gateway.commands.stats.duplicates == 1
        assert len(lab.records("command.applied")) == 2
        assert gateway.health_interval_s == 600
    finally:
        gateway.stop(2)
        sim.stop()


@pytest.mark.slow
def test_each_bad_command_is_refused_with_its_reason_record(lab: Lab, tmp_path: Path) -> None:
    gateway = running(lab)
    try:
        box = lab.wait_box()
        first = lab.send("unpair-tag", {"tag": TAG})  # cseq 1: applied (nothing to unpair)
        assert lab.answer(first).outcome == "applied"
        assert lab.answer(first).body["changed"] is False
        stranger = SoftwareKey.generate(ED25519)
        now = time.time_ns() // 1_000_000
        gw = lab.identity.gateway_id

        def signed(signer: SoftwareKey = lab.signer, **kw: Any) -> bytes:
            args: dict[str, Any] = {"gw": gw, "cseq": 2, "issued_at_ms": now,
                                    "not_after_ms": now + DAY, "kind": "unpair-tag",
                                    "body": {"tag": TAG}} | kw
            return sign_command(signer, **args)

        cases: list[tuple[bytes, str, bool]] = [
            (b"not a command", "malformed", False),
            (canonical({k: v for k, v in json.loads(signed()).items() if k != "sig"}),
             "unsigned", False),
            (signed(stranger), "unknown_key", False),
            (resign(signed(), stranger), "bad_signature", False),
            (signed(gw=OTHER), "wrong_gateway", False),
            (signed(cseq=1, body={"tag": "T00000001"}), "replayed", False),
            (signed(cseq=9), "out_of_order", False),
            (signed(issued_at_ms=now - 2 * DAY, not_after_ms=now - DAY), "expired", True),
            (signed(cseq=3, kind="reboot-now", body={}), "unknown_kind", True),
            (signed(cseq=4, kind="set-config", body={"key": "health_interval_s",
                                                     "value": 1}), "bad_body", True),
            (signed(cseq=5, kind="pair-tag", body={"tag": TAG, "key": box.seal(
                TAG_KEY, device_key_aad(gw, "tag", "T00000002")).to_json()}), "bad_body", True),
        ]
        for data, why, consumed in cases:
            lab.publish(data)
            got = lab.answer(data)
            assert (got.outcome, got.reason, got.body["consumed"]) == \
                ("rejected", why, consumed), (why, got.body)
            assert got.body["command_sha256"] == command_digest(data)
            assert TAG_KEY.hex() not in json.dumps(got.body)
        rejected = lab.records("command.rejected")
        assert [r["body"]["reason"] for r in rejected] == [c[1] for c in cases]
        assert all(r["prio"] == "alarm" for r in rejected)
        # the sequence moved only for the consuming refusals: 5 is answered, 6 is next
        nxt = lab.send("unpair-tag", {"tag": TAG}, cseq=None)
        assert nxt.cseq == 2  # the platform's own table knows only its commands
        got = lab.answer(nxt)
        assert got.reason == "replayed"
        assert got.body["expected_cseq"] == 6
    finally:
        gateway.stop(2)


@pytest.mark.slow
def test_commands_queued_while_offline_arrive_and_apply_in_order(lab: Lab) -> None:
    gateway = running(lab)
    lab.wait_box()
    gateway.stop(2)  # a clean disconnect: the broker keeps the session and its subscription
    tags = [SimTag(0x5000 + i, bytes([i + 1]) * 16) for i in range(3)]
    issued = [lab.send("pair-tag", lab.pair_tag_body(t)) for t in tags]
    issued.append(lab.send("unpair-tag", {"tag": tags[0].tag}))
    again = running(lab)
    try:
        outcomes = [lab.answer(i) for i in issued]
        assert [o.outcome for o in outcomes] == ["applied"] * 4
        assert [o.seq for o in outcomes] == sorted(o.seq for o in outcomes)  # in cseq order
        assert [o.body["cseq"] for o in outcomes] == [1, 2, 3, 4]
        registry = open_registry(lab.identity)
        try:
            assert sorted(registry.snapshot()) == [t.tag for t in tags[1:]]
        finally:
            registry.close()
        # the unpairing marks the tag's data for removal once delivered (app/removals.py)
        assert again.writer.ledger_value(f"unpaired:tag:{tags[0].tag}") == 1
    finally:
        again.stop(2)


@pytest.mark.slow
def test_a_tag_unpaired_by_command_has_its_data_removed_without_a_restart(lab: Lab) -> None:
    """The platform's unpair-tag goes through the same removal as ``provision unpair-tag``
    (app/removals.py): once every record about the tag is delivered, ``tag.data_removed``
    and its ledger entries gone, while the daemon runs (the receiver's driver dropped the
    pairing at once; a command line's unpairing waits for a restart)."""
    from app.removals import pending_key
    from drivers.tag_receiver import counter_key

    tag = SimTag(0xD001, bytes([9]) * 16)
    reg = open_registry(lab.identity)
    try:
        reg.pair(tag.tag, tag.key, absent_after_s=600)
    finally:
        reg.close()
    sim = TagReceiverSim("TR-CMD-0002", tags=[tag], link=lab.tmp / "tty-tags").start()
    gateway = running(lab, [DeviceSection("tags", DeviceClass.TAG_RECEIVER, sim.path)],
                      require_authorisation=False)
    try:
        for _ in range(3):
            sim.send_beacon(tag)
        # the beacons extend the tag's open presence interval: committed as ledger entries
        wait_for(lambda: gateway.writer.ledger_value(counter_key(tag.tag)) is not None, 20,
                 "the tag's beacons committed")
        outcome = lab.answer(lab.send("unpair-tag", {"tag": tag.tag}))
        assert outcome.outcome == "applied", outcome.body
        assert outcome.body["details"]["was_paired"] is True
        wait_for(lambda: [r["body"] for r in lab.records("tag.data_removed")] != [], 30,
                 "tag.data_removed at the platform, the daemon still running")
        [removed] = [r["body"] for r in lab.records("tag.data_removed")]
        assert removed["tag"] == tag.tag
        assert "counter" in removed["ledger"]
        # its open interval was sealed at the unpairing, and delivered before the removal
        [interval] = [r for r in lab.records("tag.interval") if r["body"]["tag"] == tag.tag]
        assert (interval["body"]["closed"], interval["body"]["beacons"]) == ("unpaired", 3)
        # every record about the tag was delivered before: at or below the bound
        applied = lab.records("command.applied")[-1]
        assert removed["delivered_through"] >= applied["seq"]
        assert interval["seq"] <= removed["delivered_through"]
        assert gateway.writer.ledger_value(counter_key(tag.tag)) is None
        assert gateway.writer.ledger_value(pending_key("tag", tag.tag)) is None
        # its beacons are refused from now on (not paired), and nothing of it is sealed
        before = gateway._tag_drivers[0].stats.rejected["unknown_tag"]
        sim.send_beacon(tag)
        wait_for(lambda: gateway._tag_drivers[0].stats.rejected["unknown_tag"] > before, 10,
                 "the unpaired tag's beacon refused")
    finally:
        gateway.stop(2)
        sim.stop()


@pytest.mark.slow
def test_no_gateway_may_publish_on_a_command_topic(lab: Lab) -> None:
    """The ACL: a gateway can write neither another gateway's command topic nor its own;
    only the command publisher can."""
    victim_seen: list[bytes] = []
    victim = mqtt_client(lab, OTHER, subscribe=commands_topic(OTHER), seen=victim_seen)
    attacker = mqtt_client(lab, GW)
    try:
        for topic in (commands_topic(OTHER), commands_topic(GW)):
            reason_code = publish_and_wait(attacker, topic, b"forged")
            assert reason_code.is_failure, reason_code
            assert reason_code.value == 0x87, reason_code
        lab.publish(b"sentinel", gw=OTHER)  # the publisher may
        wait_for(lambda: b"sentinel" in victim_seen, 10, "the publisher's message")
        assert victim_seen == [b"sentinel"]
    finally:
        for client in (victim, attacker):
            client.disconnect()
            client.loop_stop()


def mqtt_client(lab: Lab, cn: str, *, subscribe: str | None = None,
                seen: list[bytes] | None = None) -> mqtt.Client:
    from core.mqtt import make_client

    client = make_client(cn, client_config(lab.broker, lab.pki, cn))
    ready = threading.Event()

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if subscribe is not None:
            c.subscribe(subscribe, qos=1)
        else:
            ready.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: ready.set()
    client.on_message = lambda _c, _u, m: (seen if seen is not None else []).append(
        bytes(m.payload))
    client.connect_async(lab.broker.host, lab.broker.port, 30, clean_start=True)
    client.loop_start()
    assert ready.wait(15), f"{cn} could not connect"
    return client


def publish_and_wait(client: mqtt.Client, topic: str, payload: bytes) -> Any:
    done = threading.Event()
    got: list[Any] = []

    def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        got.append(reason)
        done.set()

    client.on_publish = on_publish
    client.publish(topic, payload, qos=1)
    assert done.wait(10), "no PUBACK"
    return got[0]


DAEMON_CONFIG = """
[gateway]
identity_dir = "{identity}"
data_dir = "{data}"
[paths]
runtime_dir = "{run}"
[broker]
host = "{host}"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
"""


def daemon(lab: Lab, config: Path, kill_at: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.Popen([sys.executable, str(REPO / "gateway.py"), "run", "--config",
                             str(config)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["pending", "effect"])
def test_applied_exactly_once_across_a_sigkill_between_receipt_and_application(
        lab: Lab, point: str) -> None:
    files = lab.pki.client(GW)
    config = lab.tmp / "gateway.toml"
    config.write_text(DAEMON_CONFIG.format(
        identity=lab.identity.directory, data=lab.tmp / "data", run=lab.tmp / "run",
        host=lab.broker.host, port=lab.broker.port, ca=lab.pki.ca_file, cert=files.cert,
        key=files.key))
    tag = SimTag(0xC0FFEE, bytes([7]) * 16)
    proc = daemon(lab, config, kill_at=point)
    try:
        issued = lab.send("pair-tag", lab.pair_tag_body(tag))
        assert proc.wait(30) == -signal.SIGKILL  # killed at the injection point
        pending = lab.tmp / "data" / PENDING_FILE
        assert pending.exists()
        registry = open_registry(lab.identity)
        try:
            assert (registry.get(tag.tag) is not None) == (point == "effect")
        finally:
            registry.close()
        assert lab.records("command.applied") == []  # nothing answered yet
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = daemon(lab, config)
    try:
        outcome = lab.answer(issued, timeout=30)
        assert outcome.outcome == "applied"
        assert outcome.body["recovered"] is True
        assert outcome.body["changed"] is (point == "pending")  # the effect happened once
        # the broker sends the unacknowledged command again: a duplicate, acknowledged;
        # the next command is applied after it
        marker = lab.send("unpair-tag", {"tag": "T00000001"})
        assert lab.answer(marker, timeout=30).body["cseq"] == 2
        applied = [r["body"] for r in lab.records("command.applied")]
        assert [b["cseq"] for b in applied] == [1, 2]
        assert not pending.exists()
        registry = open_registry(lab.identity)
        try:
            paired = registry.get(tag.tag)
        finally:
            registry.close()
        assert paired is not None
        assert paired.key == tag.key
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the gateway's service without a broker: bounds, conflicts ------------------------------


@dataclass
class Offline:
    gateway: Gateway
    signer: SoftwareKey
    identity: Identity
    cseq: int = 0

    def command(self, kind: str, body: dict[str, Any], *, cseq: int | None = None) -> bytes:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        now = time.time_ns() // 1_000_000
        return sign_command(self.signer, gw=self.identity.gateway_id, cseq=cseq,
                            issued_at_ms=now, not_after_ms=now + DAY, kind=kind, body=body)

    def deliver(self, data: bytes) -> threading.Event:
        acked = threading.Event()
        assert self.gateway.commands is not None
        self.gateway.commands._arrived(data, acked.set)
        return acked

    def answered(self, data: bytes) -> dict[str, Any]:
        acked = self.deliver(data)
        assert acked.wait(10), "not acknowledged"
        return self.answer(data)

    def answer(self, data: bytes) -> dict[str, Any]:
        sha = command_digest(data)
        for rec in self.records():
            if rec["kind"].startswith("command.") and rec["body"]["command_sha256"] == sha:
                return dict(rec)
        raise AssertionError("no answer record")

    def records(self) -> list[dict[str, Any]]:
        assert self.gateway.writer.flush()
        path = store_path(self.gateway.data_dir)
        return [json.loads(r) for r in stored_records(path, self.identity.storage_key)]

    def box(self) -> Any:
        from provisioning.box import load_box_key

        box = load_box_key(self.identity)
        assert box is not None
        return box.public


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[Offline]:
    root_side.init_root(tmp_path / "root")
    root_side.issue(tmp_path / "root", "*", 30, tmp_path / "keys")
    root_side.export(tmp_path / "root", tmp_path / "export")
    identity = create_identity(tmp_path / "identity", GW)
    gateway_keys.install(identity.directory, tmp_path / "export", time.time_ns() // 1_000_000)
    signer, _cert = root_side.load_command_signer(tmp_path / "keys" / "command-key-1.key")
    gateway = Gateway(Config(tmp_path / "data", NOWHERE, identity_dir=identity.directory),
                      identity, clock=Clock(synced=lambda: True))
    gateway.start()
    try:
        yield Offline(gateway, signer, identity)
    finally:
        gateway.stop(0.1)


def test_a_paired_tag_is_not_rekeyed_without_replace(offline: Offline) -> None:
    registry = open_registry(offline.identity)
    try:
        registry.pair(TAG, bytes(16))
    finally:
        registry.close()
    box = offline.box()
    sealed = box.seal(TAG_KEY, device_key_aad(GW, "tag", TAG)).to_json()
    refused = offline.answered(offline.command("pair-tag", {"tag": TAG, "key": sealed}))
    assert refused["kind"] == "command.rejected"
    assert refused["body"]["reason"] == "conflict"
    assert refused["body"]["consumed"] is True
    assert not (offline.gateway.data_dir / PENDING_FILE).exists()
    applied = offline.answered(offline.command("pair-tag", {"tag": TAG, "key": sealed,
                                                            "replace": True}))
    assert applied["kind"] == "command.applied"
    assert applied["body"]["changed"] is True
    assert applied["body"]["details"]["replaced"] is True
    unpaired = offline.answered(offline.command("set-config", {
        "key": "absent_after_s", "value": 300, "tag": "T00000001"}))
    assert unpaired["body"]["reason"] == "conflict"
    done = offline.answered(offline.command("set-config", {
        "key": "absent_after_s", "value": 300, "tag": TAG}))
    assert done["body"]["details"] == {"key": "absent_after_s", "value": 300, "tag": TAG,
                                       "before": 120}


def test_noise_refusals_are_recorded_at_a_bounded_rate(offline: Offline) -> None:
    for i in range(NOISE_RECORDS + 5):  # one at a time, as the broker's window allows
        assert offline.deliver(b"noise %d" % i).wait(10)
    rejected = [r for r in offline.records() if r["kind"] == "command.rejected"]
    assert len(rejected) == NOISE_RECORDS  # the rest counted, not recorded
    commands = offline.gateway.commands
    assert commands is not None
    assert commands.stats.suppressed == 5
    # the next record says how many were left out; a consuming refusal is always recorded
    late = offline.answered(offline.command("reboot-now", {}))
    assert late["body"]["reason"] == "unknown_kind"
    assert late["body"]["suppressed"] == 5


def test_commands_waiting_in_memory_are_bounded(offline: Offline) -> None:
    commands = offline.gateway.commands
    assert commands is not None
    commands.stop()  # the worker stops taking: what arrives waits
    acks = [offline.deliver(offline.command("unpair-tag", {"tag": TAG}))
            for _ in range(MAX_WAITING + 3)]
    assert commands.stats.dropped == 3  # left unacknowledged: the broker sends them again
    assert commands.status()["waiting"] == MAX_WAITING
    assert not any(a.is_set() for a in acks)


@pytest.mark.slow
def test_the_platform_s_command_line_sends_waits_and_prints_the_outcome(
        lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    from central.cli import main as ingest

    gateway = running(lab)
    files = lab.pki.client(COMMAND_CN)
    tag = SimTag(0x7A7A, bytes([3]) * 16)
    key_file = lab.tmp / "tag.key"
    key_file.write_text(tag.key.hex() + "\n")
    key_file.chmod(0o600)
    common = ["command", "--db", lab.db_url, "--gw", GW, "--key", str(lab.tmp / "keys"),
              "--broker", f"{lab.broker.host}:{lab.broker.port}", "--ca", str(lab.pki.ca_file),
              "--tls-cert", str(files.cert), "--tls-key", str(files.key), "--json"]
    try:
        lab.wait_box()
        assert ingest([*common, "pair-tag", "--tag", tag.tag, "--tag-key-file",
                       str(key_file)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["outcome"], out["cseq"], out["kind"]) == ("applied", 1, "pair-tag")
        assert out["rtt_ms"] >= 0
        assert out["record_seq"] > 0
        assert tag.key.hex() not in json.dumps(out)
        # refused by the gateway: exit 1 with the reason
        assert ingest([*common, "pair-tag", "--tag", tag.tag, "--tag-key-file",
                       str(key_file)]) == 0  # the same key again: applied, nothing changed
        assert json.loads(capsys.readouterr().out)["answer"]["changed"] is False
        other = lab.tmp / "other.key"
        other.write_text("00" * 16)
        assert ingest([*common, "pair-tag", "--tag", tag.tag, "--tag-key-file",
                       str(other)]) == 1
        out = json.loads(capsys.readouterr().out)
        assert (out["outcome"], out["reason"]) == ("rejected", "conflict")
        # usage errors: exit 2 with one line saying what to fix
        bad = lab.tmp / "bad.key"
        bad.write_text("not hex")
        assert ingest([*common, "pair-tag", "--tag", tag.tag, "--tag-key-file",
                       str(bad)]) == 2
        assert "32 hex digits" in capsys.readouterr().err
        assert ingest([*common, "set-config", "--setting", "health_interval_s",
                       "--value", "5"]) == 2
        assert "value: must be 60-86400 s, got 5" in capsys.readouterr().err
        # a command lost on its way (stored, never published): the next is out of order,
        # the lost one is sent again, then the next, whose earlier refusal is not its answer
        lost = lab.issue("unpair-tag", {"tag": "T00000001"})
        assert ingest([*common, "unpair-tag", "--tag", "T00000002"]) == 1
        out = json.loads(capsys.readouterr().out)
        assert (out["reason"], out["answer"]["expected_cseq"]) == ("out_of_order", lost.cseq)
        assert ingest([*common, "resend", "--cseq", str(lost.cseq)]) == 0
        assert json.loads(capsys.readouterr().out)["outcome"] == "applied"
        assert ingest([*common, "resend", "--cseq", str(lost.cseq + 1)]) == 0
        assert json.loads(capsys.readouterr().out)["outcome"] == "applied"
    finally:
        gateway.stop(2)
    with open_db(lab.db_url, migrate=False) as db, db.transaction(write=False) as tx:
        rows = tx.all("SELECT cseq, outcome FROM commands WHERE gw = ? ORDER BY cseq", (GW,))
    assert rows == [(1, "applied"), (2, "applied"), (3, "rejected:conflict"), (4, "applied"),
                    (5, "applied")]


def test_the_platform_numbers_commands_and_bounds_the_unanswered(db: Database,
                                                                  tmp_path: Path) -> None:
    """On SQLite and PostgreSQL: cseq 1, 2, 3… per gateway; at most MAX_OUTSTANDING
    unexpired commands wait for an answer; a lost one is signed anew at its cseq."""
    from central.ingest import Ingest
    from central.record import Registration

    identity = create_identity(tmp_path / "identity", GW)
    Ingest(db).enrol(Registration.from_json(identity.registration()))
    root_side.init_root(tmp_path / "root")
    root_side.issue(tmp_path / "root", "*", 30, tmp_path / "keys")
    signer, cert = root_side.load_command_signer(tmp_path / "keys" / "command-key-1.key")

    def issue(cseq: int | None = None) -> Issued:
        return tool.issue(db, signer, cert, GW, kind="unpair-tag", body={"tag": TAG},
                          valid_ms=DAY, created_by="test", cseq=cseq)

    with pytest.raises(tool.CommandError, match="not an unanswered command"):
        issue(cseq=1)  # none sent yet
    assert [issue().cseq for _ in range(tool.MAX_OUTSTANDING)] == \
        list(range(1, tool.MAX_OUTSTANDING + 1))
    with pytest.raises(tool.CommandError, match="still wait for an answer"):
        issue()
    with db.transaction() as tx:  # an expired one no longer counts
        tx.execute("UPDATE commands SET not_after = 0 WHERE cseq IN (1, 2)")
    assert issue().cseq == tool.MAX_OUTSTANDING + 1
    again = issue(cseq=1)  # the expired, unanswered one signed anew at its cseq
    assert again.cseq == 1
    assert tool.stored(db, GW, 1).sha256 == again.sha256
    with pytest.raises(tool.CommandError, match="not enrolled"):
        tool.issue(db, signer, cert, OTHER, kind="unpair-tag", body={"tag": TAG},
                   valid_ms=DAY, created_by="test")
