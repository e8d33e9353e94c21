"""The test vectors of docs/test-vectors/ hold for our own platform code, and the strict
verification they pin: canonical bytes, base64url, the gateway of the topic, the order
of a delivery class (docs/records.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from central.record import (
    KeyLookup,
    RecordError,
    Registration,
    VerifiedRecord,
    gateway_of_topic,
    parse_record,
    verify_record,
)
from central.verifier import Verifier
from core.record import JSON, b64u, canonical, unb64u
from core.suites import Verifier as PublicKey
from core.suites import digest
from core.topics import records_topic
from lab import vectors
from lab.chains import Chain
from lab.vectors import T0

DIRECTORY = Path(__file__).resolve().parents[1] / "docs" / "test-vectors"
SCHEMA = json.loads((DIRECTORY.parent / "record.schema.json").read_text())
CHAIN_FILES = ["ed25519.json", "sm2.json"]
#: The reasons a verifier gives; each is a counter of Verifier.summary().
REASONS = ("malformed", "non_canonical", "bad_signature", "unknown_key", "unknown_gateway",
           "wrong_gateway", "forged_certificate", "out_of_validity")


def load(name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads((DIRECTORY / name).read_text(encoding="ascii"))
    return obj


def records(vec: dict[str, Any]) -> dict[str, bytes]:
    return {r["name"]: bytes.fromhex(r["canonical_hex"]) for r in vec["records"]}


def verifier(vec: dict[str, Any], on_record: Any = None) -> Verifier:
    reg = Registration.from_json(vec["registration"])
    return Verifier({reg.gateway_id: reg}, on_record=on_record)


def trusting(vec: dict[str, Any]) -> KeyLookup:
    """verify_record's key lookup: the session keys that sign the file's valid records."""
    signers = [vec["keys"][r["signed_by"]] for r in vec["records"]]
    keys = {k["kid"]: PublicKey(k["alg"], unb64u(k["public_b64u"])) for k in signers}

    def key_for(rec: dict[str, JSON]) -> tuple[PublicKey, str] | None:
        key = keys.get(str(rec["kid"]))
        return None if key is None else (key, "file")
    return key_for


def invalid_cases() -> list[tuple[str, dict[str, Any]]]:
    return [(name, case) for name in CHAIN_FILES for case in load(name)["invalid"]]


def test_the_generator_reproduces_the_files_byte_for_byte(tmp_path: Path) -> None:
    assert vectors.write(tmp_path) == {}  # no SM2 signature made anew
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in DIRECTORY.glob("*.json"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (DIRECTORY / name).read_bytes(), name


def test_canonical_vectors() -> None:
    for case in load("canonical.json")["cases"]:
        data = bytes.fromhex(case["canonical_hex"])
        assert canonical(case["value"]) == data == case["canonical"].encode("utf-8")
        assert spec_encode(case["value"]) == data


@pytest.mark.parametrize("name", CHAIN_FILES)
def test_every_valid_record_verifies_with_its_bytes_and_digest(name: str) -> None:
    vec = load(name)
    seen: list[VerifiedRecord] = []
    v = verifier(vec, seen.append)
    delivered = [r for r in vec["records"] if r["delivered"]]
    by_seq = {r["seq"]: r for r in vec["records"]}
    alg = vec["registration"]["alg"]
    for r in vec["records"]:
        data = bytes.fromhex(r["canonical_hex"])
        assert data == r["canonical"].encode("utf-8")
        rec = parse_record(data)
        jsonschema.validate(rec, SCHEMA)
        assert (rec["seq"], rec["kind"], rec["sig"], rec["prev"]) == \
            (r["seq"], r["kind"], r["sig"], r["prev"])
        unsigned = {k: v for k, v in rec.items() if k != "sig"}
        assert canonical(unsigned).hex() == r["signed_hex"]
        key = vec["keys"][r["signed_by"]]
        assert PublicKey(key["alg"], unb64u(key["public_b64u"])).verify(
            unb64u(r["sig"]), bytes.fromhex(r["signed_hex"]))
        assert digest(alg, data).hex() == r["digest_hex"]
        before = by_seq.get(r["seq"] - 1)
        assert unb64u(r["prev"]) == (bytes.fromhex(before["digest_hex"]) if before
                                     else bytes(32))
        assert verify_record(data, trusting(vec)).digest.hex() == r["digest_hex"]
    for r in delivered:
        assert len(v.ingest(bytes.fromhex(r["canonical_hex"]), vec["topic"])) == 1
    summary = v.summary()
    assert summary["verified"] == len(delivered)
    assert all(summary[reason] == 0 for reason in REASONS), summary
    assert summary["chain_gaps"] == summary["reordered"] == 0
    assert v.gaps(vec["gateway"]) == []  # an evicted seq is named by the gap record
    assert [(s.seq, s.digest.hex()) for s in seen] == \
        [(r["seq"], r["digest_hex"]) for r in delivered]


@pytest.mark.parametrize(("name", "case"), invalid_cases(),
                         ids=[f"{n}:{c['name']}" for n, c in invalid_cases()])
def test_every_invalid_record_is_refused_with_its_reason(name: str,
                                                         case: dict[str, Any]) -> None:
    vec = load(name)
    known = records(vec)
    v = verifier(vec)
    for context in case["context"]:
        v.ingest(known[context], vec["topic"])
    assert v.summary()["verified"] == len(case["context"])
    before = v.summary()
    data = bytes.fromhex(case["bytes_hex"])
    assert v.ingest(data, case["topic"]) == []
    after = v.summary()
    changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert changed == {case["reason"]: 1, "messages": 1} | \
        ({"held": 1} if case["reason"] == "unknown_key" else {}), changed
    if case["alone"]:  # the record and the key its kid names show it
        with pytest.raises(RecordError) as err:
            verify_record(data, trusting(vec))
        assert err.value.reason == case["reason"]
    else:
        rec = json.loads(data)
        if case["reason"] == "wrong_gateway":
            assert gateway_of_topic(case["topic"]) != rec["gw"]


# -- canonical bytes, byte by byte --------------------------------------------------------

def spec_encode(value: JSON) -> bytes:
    """The canonical bytes as docs/records.md defines them, written from the text alone."""
    return _spec(value).encode("utf-8")


_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
          "\f": "\\f"}


_LITERALS = {True: "true", False: "false", None: "null"}


def _spec(value: JSON) -> str:
    if value is True or value is False or value is None:
        return _LITERALS[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in _SHORT:
                out.append(_SHORT[ch])
            elif ord(ch) < 0x20:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ",".join(_spec(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ",".join(_spec(k) + ":" + _spec(value[k]) for k in sorted(value)) + "}"


def test_the_documented_string_encoding_is_cpythons() -> None:
    chars = [chr(c) for c in range(0x800)] + ["\u2028", "\u2029", "\ufeff", "\uffff",
                                              "\U0001f600", "\U0010ffff"]
    for ch in chars:
        value = {"s": f"a{ch}b", ch: 1}
        assert canonical(value) == spec_encode(value), hex(ord(ch))


def test_documented_examples_of_canonical_bytes() -> None:
    assert canonical({"s": "\x00\x1f\x7f\u00e9"}) == b'{"s":"\\u0000\\u001f\x7f\xc3\xa9"}'
    assert canonical({"b": [1, -2], "B": None, "a": {"d": True, "c": False}}) == \
        b'{"B":null,"a":{"c":false,"d":true},"b":[1,-2]}'


# -- strict parsing -----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["AAA=", "AA==", "A", "AAAAA", "+A", "/A", "A A", "AAA\n",
                                  "AB", "AAB", "AAC", "_x", "é", "\uff21A"])
def test_base64url_that_is_not_its_one_form_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="Invalid base64url"):
        unb64u(text)


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\xff", b"\xff\xfe", b"\xfb\xff\xbf",
                                 b"\x00\x00\x01", bytes(64)])
def test_base64url_round_trips(raw: bytes) -> None:
    assert unb64u(b64u(raw)) == raw


def presence() -> tuple[Chain, list[bytes]]:
    c = Chain("gw-vect-0001")
    out = [c.start_session(T0).data, c.seal("tag.presence", {"n": 1, "s": "x"}, T0).data]
    return c, out


@pytest.mark.parametrize(("old", "new", "reason"), [
    (b'"n":1', b'"n":1.0', "malformed"),
    (b'"n":1', b'"n":1E0', "malformed"),
    (b'"n":1', b'"n":NaN', "malformed"),
    (b'"n":1', b'"n":Infinity', "malformed"),
    (b'"n":1', b'"n":01', "malformed"),
    (b'"n":1', b'"n":9223372036854775807', None),  # in range: parses (its signature fails)
    (b'"n":1', b'"n":-9223372036854775808', None),
    (b'"n":1', b'"n":9223372036854775808', "malformed"),
    (b'"n":1', b'"n":-9223372036854775809', "malformed"),
    (b'"n":1', b'"n":-0', "non_canonical"),  # -0 parses as 0, encoded 0
    (b'"n":1', b'"n":1,"n":1', "non_canonical"),
    (b'"s":"x"', b'"s":"\\u0078"', "non_canonical"),
    (b'"s":"x"', b'"s":"x\\/"', "non_canonical"),
    (b'"s":"x"', b'"s":"\xff"', "malformed"),  # no UTF-8
    (b'"s":"x"', b'"s":"\xed\xa0\x80"', "malformed"),  # an encoded surrogate: no UTF-8
    (b'{"alg"', b'\xef\xbb\xbf{"alg"', "malformed"),  # a byte order mark
    (b'{"alg"', b' {"alg"', "non_canonical"),
    (b'"v":2}', b'"v":2}\r', "non_canonical"),
])
def test_strict_parsing(old: bytes, new: bytes, reason: str | None) -> None:
    _c, data = presence()
    changed = data[1].replace(old, new, 1)
    assert changed != data[1]
    if reason is None:
        assert canonical(parse_record(changed)) == changed
        return
    with pytest.raises(RecordError) as err:
        parse_record(changed)
    assert err.value.reason == reason


def test_the_chain_digest_is_over_the_received_bytes() -> None:
    c, data = presence()
    v = Verifier({c.gateway_id: c.registration})
    got = v.ingest(b"\n".join(data))
    assert [r.digest for r in got] == [digest(c.registration.alg, d) for d in data]


def test_produced_records_are_canonical_and_pass_strict_parsing() -> None:
    """The gateway seals canonical bytes: strictness refuses none of them."""
    from tests.test_formats import produced_readings, sealed_data

    for suite in ("ed25519", "sm"):
        c = Chain(suite=suite)
        for data in sealed_data(produced_readings(c), c):
            assert parse_record(data) == json.loads(data)


# -- the gateway of the topic -------------------------------------------------------------

@pytest.mark.parametrize(("topic", "gw"), [
    (records_topic("gw-0001"), "gw-0001"),
    ("smartcorr/v1/gw/gw-0001/status", None),
    ("smartcorr/v1/gw/+/records", None),
    ("smartcorr/v1/gw/#", None),
    ("smartcorr/v1/gw/gw-0001/records/x", None),
    ("smartcorr/v1/gw//records", None),
    ("smartcorr/v1/gw/GW-0001/records", None),
    ("$share/g/smartcorr/v1/gw/gw-0001/records", None),
    ("smartcorr/v1/gw/a/b/records", None),
])
def test_gateway_of_topic(topic: str, gw: str | None) -> None:
    assert gateway_of_topic(topic) == gw


def test_records_on_another_gateways_topic_are_refused() -> None:
    c, data = presence()
    v = Verifier({c.gateway_id: c.registration})
    v.ingest(b"\n".join(data), records_topic("gw-other-0001"))
    v.ingest(b"\n".join(data), "smartcorr/v1/gw/gw-vect-0001/status")
    assert v.summary()["wrong_gateway"] == 4
    assert v.summary()["verified"] == 0
    v.ingest(b"\n".join(data), records_topic(c.gateway_id))
    assert v.summary()["verified"] == 2


def test_the_client_passes_the_topic() -> None:
    source = (Path(__file__).resolve().parents[1] / "central" / "client.py").read_text()
    assert "self.verifier.ingest(bytes(message.payload), message.topic)" in source


# -- order within a delivery class --------------------------------------------------------

def chain_of(n: int) -> tuple[Chain, list[bytes]]:
    c = Chain("gw-order-0001")
    out = [c.start_session(T0).data]
    out += [c.seal("tag.presence", {"n": i}, T0).data for i in range(n)]
    return c, out


def test_a_record_after_a_higher_seq_of_its_class_is_reordered() -> None:
    c, data = chain_of(4)  # seq 1 alarm, 2..5 position
    v = Verifier({c.gateway_id: c.registration})
    for i in (0, 1, 3, 2, 4):
        v.ingest(data[i])
    v.ingest(data[2])  # a duplicate is not reordered again
    summary = v.summary()
    assert (summary["verified"], summary["reordered"], summary["duplicates"]) == (5, 1, 1)
    assert summary["chain_gaps"] == 0


def test_classes_are_ordered_apart() -> None:
    c = Chain("gw-order-0001")
    data = [c.start_session(T0).data, c.seal("tag.presence", {"n": 1}, T0).data,
            c.seal("tag.tamper", {"n": 2}, T0).data]
    v = Verifier({c.gateway_id: c.registration})
    v.ingest(b"\n".join([data[0], data[2], data[1]]))  # alarms first: not reordered
    assert v.summary()["reordered"] == 0


def test_held_records_keep_their_arrival() -> None:
    c, data = chain_of(3)
    v = Verifier({c.gateway_id: c.registration})
    for i in (1, 2, 3, 0):  # in order, the key.session last: held, then accepted in order
        v.ingest(data[i])
    assert v.summary()["reordered"] == 0
    v2 = Verifier({c.gateway_id: c.registration})
    v2.ingest(data[3])  # seq 4 held
    v2.ingest(data[0])  # key.session: seq 4 accepted
    v2.ingest(data[1])  # seq 2 after 4
    v2.ingest(data[2])  # seq 3 after 4
    assert v2.summary()["reordered"] == 2
    v3 = Verifier({c.gateway_id: c.registration})
    v3.ingest(data[3])  # seq 4 held (arrived first)
    v3.ingest(data[0])
    assert v3.summary()["reordered"] == 0


def test_a_held_record_accepted_late_flags_those_after_it() -> None:
    c = Chain("gw-order-0001")
    first = c.start_session(T0).data
    a = c.seal("tag.presence", {"n": 1}, T0).data
    second = c.start_session(T0).data
    b = c.seal("tag.presence", {"n": 2}, T0).data
    later = c.seal("tag.presence", {"n": 3}, T0).data
    v = Verifier({c.gateway_id: c.registration})
    v.ingest(first)
    v.ingest(b)  # seq 4, held (second not there yet)
    v.ingest(a)  # seq 2: after seq 4 arrived, accepted before it
    v.ingest(second)  # seq 4 accepted: it shows seq 2 arrived after it
    v.ingest(later)
    assert v.summary()["verified"] == 5
    assert v.summary()["reordered"] == 1


# -- registration ---------------------------------------------------------------------------

def test_a_gateway_with_records_is_not_registered_again_with_another_identity() -> None:
    c, data = presence()
    v = Verifier({c.gateway_id: c.registration})
    v.register(c.registration)  # the same: nothing changes
    other = Chain(c.gateway_id).registration
    v2 = Verifier({c.gateway_id: c.registration})
    v2.register(other)  # no records yet: a correction of the enrolment
    v.ingest(data[0])
    with pytest.raises(ValueError, match="a new identity needs a new gateway id"):
        v.register(other)
    v.register(c.registration)
