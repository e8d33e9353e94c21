"""The record format, sealing and verification: the faults mutation testing found unseen.

Each test names what it pins down; docs/mutation.md has the run and the equivalent mutants.
"""

from __future__ import annotations

import hashlib
import json
from types import MappingProxyType

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from buffer.seal import Sealer, rotation_body
from central.record import RecordError, announced_key, verify_record
from core.kinds import Priority
from core.record import (
    GENESIS_PREV,
    Reading,
    Source,
    Timestamp,
    b64u,
    canonical,
    check_no_float,
    has_float,
    key_id,
    unb64u,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NEW_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
SRC = Source("tag_receiver", "TR-0001", "1.0.0")
TS = Timestamp(1_700_000_000_000, "ntp", 5)
GW = "gw-test-0001"


def sealer() -> Sealer:
    return Sealer(GW, KEY, last_seq=0, last_digest=GENESIS_PREV, boot=1)


def presence(n: int = 1) -> Reading:
    return Reading("tag.presence", SRC, {"tag": "T00001001", "counter": n}, n)


def raw_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def shaped(**changes: object) -> bytes:
    """A record of the right shape (not signed): verification fails after the shape check."""
    rec: dict[str, object] = {
        "v": 1, "gw": GW, "seq": 1, "prev": b64u(GENESIS_PREV), "boot": 1, "t": 1, "tq": "ntp",
        "mono": 1, "src": SRC.to_json(), "kind": "tag.presence", "prio": "position",
        "body": {}, "kid": key_id(KEY.public_key()), "sig": "AAAA",
    }
    rec.update(changes)
    return json.dumps(rec).encode()


def refused(data: bytes) -> RecordError:
    with pytest.raises(RecordError) as err:
        verify_record(data, KEYS)
    return err.value


# -- base64url -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"", ""),
        (b"a", "YQ"),  # two padding characters dropped
        (b"ab", "YWI"),  # one dropped
        (b"abc", "YWJj"),
        (bytes.fromhex("00 00 17"), "AAAX"),  # ends in X: only "=" is stripped
        (bytes.fromhex("fb ff"), "-_8"),  # the URL-safe alphabet
    ],
)
def test_b64u_is_unpadded_urlsafe_and_round_trips(raw: bytes, text: str) -> None:
    assert b64u(raw) == text
    assert unb64u(text) == raw


# -- no floats -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        {"a": 1.5},
        {"a": 1.5, "b": 1},  # the int is looked at first
        {"a": 1, "b": 1.5},
        {"a": [1, 2.5]},  # nested in a list
        {"a": (1, {"b": [2.5]})},
        {"a": MappingProxyType({"b": 2.5})},  # a Mapping that is not a dict
        {"a": 1, "b": {"c": True, "d": None, "e": [1, "x", 2.5]}},
    ],
)
def test_has_float_finds_a_float_wherever_it_is(value: dict[str, object]) -> None:
    assert has_float(value) is True


@pytest.mark.parametrize(
    "value", [{}, {"a": 1}, {"a": [1, "x", None, True]}, {"a": MappingProxyType({"b": 2})}]
)
def test_has_float_is_false_without_floats(value: dict[str, object]) -> None:
    assert has_float(value) is False


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"lat": 46.8}, "body.lat"),
        ({"fix": {"lat": 46.8}}, "body.fix.lat"),
        ({"path": [1, 2, 46.8]}, r"body.path\[2\]"),
        ({"path": [1, {"lat": 46.8}]}, r"body.path\[1\].lat"),
    ],
)
def test_check_no_float_names_the_place(value: dict[str, object], where: str) -> None:
    with pytest.raises(TypeError, match=rf"^float at {where}: records carry integers"):
        check_no_float(value, "body")


def test_sealing_a_float_names_the_place_in_the_body() -> None:
    # `match="float"` alone would also match Python's own "'float' object is not iterable"
    reading = Reading("gnss.fix", SRC, {"fix": {"alt": [1, 46.8]}}, 1)
    with pytest.raises(TypeError, match=r"^float at body\.fix\.alt\[1\]: records carry"):
        sealer().seal(reading, TS)


def test_canonical_refuses_nan_and_keeps_non_ascii_as_utf8() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        canonical({"x": float("nan")})
    assert canonical({"a": "é€"}) == '{"a":"é€"}'.encode()


def test_source_to_json_has_class_id_and_fw_only_when_known() -> None:
    assert Source("kiosk", "KS-1", "2.1").to_json() == {"class": "kiosk", "id": "KS-1", "fw": "2.1"}
    assert Source("kiosk", "KS-1").to_json() == {"class": "kiosk", "id": "KS-1"}


# -- sealing ---------------------------------------------------------------------------
def test_sealed_record_carries_seq_priority_kind_and_digest() -> None:
    s = sealer()
    first = s.seal(presence(1), TS)
    alarm = s.seal(Reading("tag.tamper", SRC, {"tag": "T00001001"}, 2), TS)
    assert (first.seq, first.priority, first.kind) == (1, Priority.POSITION, "tag.presence")
    assert (alarm.seq, alarm.priority, alarm.kind) == (2, Priority.ALARM, "tag.tamper")
    assert first.digest == hashlib.sha256(first.data).digest()
    assert json.loads(alarm.data)["prev"] == b64u(first.digest)
    assert (s.last_seq, s.last_digest) == (2, alarm.digest)


def test_interleaved_drafts_are_refused_with_a_reason() -> None:
    s = sealer()
    one, two = s.draft(), s.draft()
    one.seal(presence(1), TS)
    two.seal(presence(2), TS)
    s.advance(one)
    with pytest.raises(RuntimeError, match=r"after seq 0, but the chain is at 1: two drafts"):
        s.advance(two)


def test_key_rotation_signs_the_next_records_with_the_new_key() -> None:
    s = sealer()
    draft = s.draft()
    rotate = draft.seal(Reading("key.rotate", SRC, rotation_body(NEW_KEY.public_key()), 1), TS)
    draft.use_key(NEW_KEY)
    after = draft.seal(presence(2), TS)
    s.advance(draft)
    new_kid = key_id(NEW_KEY.public_key())
    assert json.loads(rotate.data)["kid"] == key_id(KEY.public_key())
    assert json.loads(after.data)["kid"] == new_kid
    assert s.kid == new_kid
    assert s.signing_key is NEW_KEY
    verified = verify_record(rotate.data, KEYS)
    announced = announced_key(verified.record)
    assert announced is not None
    assert announced.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw_bytes(NEW_KEY)
    assert verify_record(after.data, {new_kid: announced}).seq == 2


def test_rotation_body_names_the_new_key_and_its_id() -> None:
    body = rotation_body(NEW_KEY.public_key())
    assert body == {"new_kid": key_id(NEW_KEY.public_key()), "new_key": b64u(raw_bytes(NEW_KEY))}


# -- announced_key ---------------------------------------------------------------------
def _rotate(**body: object) -> dict[str, object]:
    return {"kind": "key.rotate", "body": body}


@pytest.mark.parametrize(
    "record",
    [
        {"kind": "tag.presence", "body": rotation_body(NEW_KEY.public_key())},
        {"kind": "key.rotate", "body": "not a dict"},
        {"kind": "key.rotate"},
        _rotate(new_kid=key_id(NEW_KEY.public_key())),  # no key
        _rotate(new_kid=key_id(NEW_KEY.public_key()), new_key=b64u(b"short")),
        # a key whose id does not match the announced id
        _rotate(new_kid=key_id(KEY.public_key()), new_key=b64u(raw_bytes(NEW_KEY))),
        _rotate(new_key=b64u(raw_bytes(NEW_KEY))),  # no id
    ],
)
def test_announced_key_is_none_for_anything_but_a_consistent_rotation(
    record: dict[str, object],
) -> None:
    assert announced_key(record) is None


def test_announced_key_of_a_consistent_rotation() -> None:
    key = announced_key({"kind": "key.rotate", "body": rotation_body(NEW_KEY.public_key())})
    assert key is not None
    assert key.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw_bytes(NEW_KEY)


# -- verify_record: each refusal with its reason and detail ------------------------------
def test_verified_record_is_the_whole_record_signature_included() -> None:
    sealed = sealer().seal(presence(7), TS)
    verified = verify_record(sealed.data, KEYS)
    assert verified.record == json.loads(sealed.data)
    assert verified.record["sig"] == json.loads(sealed.data)["sig"]
    assert (verified.gateway_id, verified.seq, verified.kind) == (GW, 1, "tag.presence")
    assert (verified.prev, verified.digest) == (GENESIS_PREV, sealed.digest)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "malformed: not JSON: "),
        (b"{", "malformed: not JSON: "),
        (b"[1, 2]", "malformed: not a JSON object"),
        (shaped(seq="1"), "malformed: field 'seq' missing or not <class 'int'>"),
        (shaped(boot=True), "malformed: field 'boot' missing or not <class 'int'>"),
        (shaped(v=2), "version: format version 2 not supported"),
        (shaped(body={"lat": 46.8}), "malformed: float at record.body.lat: "),
        (shaped(body={"p": [1, 2.5]}), r"malformed: float at record.body.p[1]: "),
        (shaped(kid="nobody"), "unknown_key: key id 'nobody' is not trusted"),
        (shaped(), f"bad_signature: seq 1 of {GW}"),
    ],
)
def test_refusals_say_why(data: bytes, message: str) -> None:
    err = refused(data)
    assert err.reason == message.partition(":")[0]
    assert str(err).startswith(message)


def test_missing_field_is_malformed() -> None:
    rec = json.loads(shaped())
    del rec["tq"]
    err = refused(json.dumps(rec).encode())
    assert (err.reason, str(err)) == ("malformed", "malformed: field 'tq' missing or not "
                                                   "<class 'str'>")
