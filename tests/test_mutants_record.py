"""The record format, sealing and verification: the faults mutation testing found unseen.

Each test names what it pins down; docs/mutation.md has the run and the equivalent mutants.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from buffer.seal import NoSessionKeyError, Sealer
from central.record import (
    KeyLookup,
    RecordError,
    Registration,
    load_registrations,
    parse_record,
    verify_record,
)
from central.verifier import Verifier
from core import suites
from core.kinds import Priority
from core.record import (
    FORMAT_VERSION,
    GENESIS_PREV,
    JSON,
    LEGACY_FORMAT_VERSION,
    REQUIRED_FIELDS,
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
from core.session import CertificateError, parse_identity, rotation_body
from core.suites import ED25519, SM2, SoftwareKey
from core.suites import Verifier as PublicKey
from lab.chains import Chain

#: Session keys (what records are signed with) and an identity key (what certifies them).
KEY = SoftwareKey(ED25519, bytes(range(32)))
NEW_KEY = SoftwareKey(ED25519, bytes(range(32, 64)))
IDENTITY = SoftwareKey(ED25519, bytes(range(64, 96)))
SRC = Source("tag_receiver", "TR-0001", "1.0.0")
TS = Timestamp(1_700_000_000_000, "ntp", 5)
GW = "gw-test-0001"


def trusting(*keys: SoftwareKey, key_class: str = "file") -> KeyLookup:
    """verify_record's lookup that knows *keys* (by kid) and nothing else."""
    known = {k.kid: PublicKey(k.alg, k.public_raw) for k in keys}

    def key_for(rec: dict[str, JSON]) -> tuple[PublicKey, str] | None:
        key = known.get(str(rec["kid"]))
        return None if key is None else (key, key_class)
    return key_for


KEYS = trusting(KEY)


def sealer(key: SoftwareKey | None = KEY, boot: int = 1) -> Sealer:
    return Sealer(GW, key, last_seq=0, last_digest=GENESIS_PREV, boot=boot)


def presence(n: int = 1) -> Reading:
    return Reading("tag.presence", SRC, {"tag": "T00001001", "counter": n}, n)


def shaped(**changes: object) -> bytes:
    """A record of the right shape (not signed): verification fails after the shape check."""
    rec: dict[str, object] = {
        "alg": ED25519, "v": 2, "gw": GW, "seq": 1, "prev": b64u(GENESIS_PREV), "boot": 1,
        "t": 1, "tq": "ntp", "mono": 1, "src": SRC.to_json(), "kind": "tag.presence",
        "prio": "position", "body": {}, "kid": KEY.kid, "sig": "AAAA",
    }
    rec.update(changes)
    # canonical but for what canonical() cannot encode (a lone surrogate, as \\ud800)
    return json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()


def legacy(key: Ed25519PrivateKey, **changes: object) -> bytes:
    """A format-1 record (no alg, v 1), signed as format 1 was: Ed25519 by *key* itself."""
    rec: dict[str, JSON] = {
        "v": 1, "gw": GW, "seq": 1, "prev": b64u(GENESIS_PREV), "boot": 1, "t": 1,
        "tq": "ntp", "mono": 1, "src": SRC.to_json(), "kind": "tag.presence",
        "prio": "position", "body": {"n": 1}, "kid": key_id(key.public_key()),
    }
    rec.update(changes)
    rec["sig"] = b64u(key.sign(canonical(rec)))
    return canonical(rec)


def refused(data: bytes, key_for: KeyLookup = KEYS) -> RecordError:
    with pytest.raises(RecordError) as err:
        verify_record(data, key_for)
    return err.value


def sm3(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


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


# -- key ids ---------------------------------------------------------------------------
def test_the_format_1_key_id_is_the_suites_ed25519_key_id() -> None:
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert key_id(private.public_key()) == suites.key_id(ED25519, KEY.public_raw) == KEY.kid
    assert KEY.kid == b64u(hashlib.sha256(KEY.public_raw).digest()[:12])
    assert len(KEY.kid) == 16


# -- sealing ---------------------------------------------------------------------------
def test_a_sealed_record_has_exactly_the_fields_of_format_2() -> None:
    ts = Timestamp(1_700_000_000_123, "gnss", 4567)
    data = sealer(boot=3).seal(Reading("tag.presence", SRC, {"n": 1}, 9), ts).data
    rec = json.loads(data)
    sig = rec.pop("sig")
    assert rec == {
        "alg": ED25519, "v": FORMAT_VERSION, "gw": GW, "seq": 1, "prev": b64u(GENESIS_PREV),
        "boot": 3, "t": 1_700_000_000_123, "tq": "gnss", "mono": 4567,
        "src": {"class": "tag_receiver", "id": "TR-0001", "fw": "1.0.0"},
        "kind": "tag.presence", "prio": "position", "body": {"n": 1}, "kid": KEY.kid,
    }
    assert (FORMAT_VERSION, LEGACY_FORMAT_VERSION) == (2, 1)
    assert set(REQUIRED_FIELDS) == {*rec, "sig"}
    assert PublicKey(ED25519, KEY.public_raw).verify(unb64u(sig), canonical(rec))
    rec["sig"] = sig
    assert canonical(rec) == data  # the spliced encoding is the canonical one


def test_sealed_record_carries_seq_priority_kind_and_digest() -> None:
    s = sealer()
    first = s.seal(presence(1), TS)
    alarm = s.seal(Reading("tag.tamper", SRC, {"tag": "T00001001"}, 2), TS)
    assert (first.seq, first.priority, first.kind) == (1, Priority.POSITION, "tag.presence")
    assert (alarm.seq, alarm.priority, alarm.kind) == (2, Priority.ALARM, "tag.tamper")
    assert first.digest == hashlib.sha256(first.data).digest()
    assert json.loads(alarm.data)["prev"] == b64u(first.digest)
    assert (s.last_seq, s.last_digest) == (2, alarm.digest)


def test_an_sm2_chain_is_hashed_with_sm3() -> None:
    key = SoftwareKey.generate(SM2)
    s = sealer(key)
    first = s.seal(presence(1), TS)
    second = s.seal(presence(2), TS)
    assert json.loads(first.data)["alg"] == SM2
    assert first.digest == sm3(first.data) != hashlib.sha256(first.data).digest()
    assert json.loads(second.data)["prev"] == b64u(first.digest)
    verified = verify_record(second.data, trusting(key))
    assert verified.digest == sm3(second.data)
    assert verified.prev == first.digest


def test_sealing_without_a_session_key_is_refused() -> None:
    s = sealer(None)
    assert s.signing_key is None
    assert s.kid == ""
    draft = s.draft()
    assert (draft.key, draft.kid, draft.alg) == (None, "", "")
    with pytest.raises(NoSessionKeyError, match=r"^no session key yet: a key.session record"):
        s.seal(presence(1), TS)
    assert (s.last_seq, s.last_digest) == (0, GENESIS_PREV)


def test_a_sealer_given_a_key_names_it() -> None:
    s = sealer()
    assert s.signing_key is KEY
    assert s.kid == KEY.kid
    draft = s.draft()
    assert (draft.key, draft.kid, draft.alg) == (KEY, KEY.kid, ED25519)
    assert (draft.base_seq, draft.last_seq, draft.boot) == (0, 0, 1)


def test_interleaved_drafts_are_refused_with_a_reason() -> None:
    s = sealer()
    one, two = s.draft(), s.draft()
    one.seal(presence(1), TS)
    two.seal(presence(2), TS)
    s.advance(one)
    with pytest.raises(RuntimeError, match=r"after seq 0, but the chain is at 1: two drafts"):
        s.advance(two)


def test_a_new_session_key_signs_the_next_records() -> None:
    """What a key.session does to the draft: the record and all after it are signed by the
    new key, and the sealer keeps it once the draft is committed."""
    s = sealer()
    draft = s.draft()
    before = draft.seal(presence(1), TS)
    draft.use_key(NEW_KEY)
    after = draft.seal(presence(2), TS)
    assert (s.kid, s.signing_key) == (KEY.kid, KEY)  # nothing moves before the commit
    s.advance(draft)
    assert json.loads(before.data)["kid"] == KEY.kid
    assert json.loads(after.data)["kid"] == NEW_KEY.kid
    assert s.kid == NEW_KEY.kid
    assert s.signing_key is NEW_KEY
    assert s.draft().kid == NEW_KEY.kid
    assert verify_record(before.data, KEYS).seq == 1
    assert refused(after.data).reason == "unknown_key"  # the old key does not sign it
    assert verify_record(after.data, trusting(NEW_KEY)).seq == 2


def test_the_first_session_key_of_a_keyless_sealer() -> None:
    s = sealer(None)
    draft = s.draft()
    draft.use_key(KEY)
    rec = draft.seal(presence(1), TS)
    s.advance(draft)
    assert (s.signing_key, s.kid) == (KEY, KEY.kid)
    assert verify_record(rec.data, KEYS).seq == 1
    assert verify_record(s.seal(presence(2), TS).data, KEYS).prev == rec.digest


# -- key.rotate: the next identity certified by the current one --------------------------
def test_a_rotation_body_certifies_the_new_identity_with_the_current_one() -> None:
    body = rotation_body(gateway_id=GW, new=NEW_KEY, new_class="tpm", from_seq=7,
                         current=IDENTITY, current_class="file")
    assert set(body) == {"cert", "cert_sig"}
    assert body["cert"] == {
        "type": "identity", "gw": GW, "alg": ED25519, "key": b64u(NEW_KEY.public_raw),
        "kid": NEW_KEY.kid, "class": "tpm", "from_seq": 7,
        "by": {"kid": IDENTITY.kid, "alg": ED25519, "class": "file"},
    }
    assert PublicKey(ED25519, IDENTITY.public_raw).verify(unb64u(body["cert_sig"]),
                                                         canonical(body["cert"]))
    cert, sig, signed = parse_identity(body)
    assert (cert.gateway_id, cert.alg, cert.public_raw, cert.kid, cert.key_class,
            cert.from_seq) == (GW, ED25519, NEW_KEY.public_raw, NEW_KEY.kid, "tpm", 7)
    assert (cert.by.kid, cert.by.alg, cert.by.key_class) == (IDENTITY.kid, ED25519, "file")
    assert (sig, signed) == (unb64u(body["cert_sig"]), canonical(body["cert"]))


def _rotation(**claims: object) -> dict[str, object]:
    body = rotation_body(gateway_id=GW, new=NEW_KEY, new_class="file", from_seq=2,
                         current=IDENTITY, current_class="file")
    cert = dict(body["cert"])
    for name, value in claims.items():
        if value is None:
            del cert[name]
        else:
            cert[name] = value
    return {"cert": cert, "cert_sig": body["cert_sig"]}


@pytest.mark.parametrize(
    "body",
    [
        "not a dict",
        {},  # no certificate
        {"cert": "not a dict", "cert_sig": "AAAA"},
        _rotation(type="session"),  # a session certificate does not pass for an identity
        _rotation(key=None),  # no key
        _rotation(key=b64u(b"short")),  # not a key of its algorithm
        _rotation(key="A"),  # not base64url
        _rotation(kid=IDENTITY.kid),  # a key id that is not the key's
        _rotation(kid=None),  # no key id
        _rotation(alg="rsa-sha1"),
        _rotation(**{"class": "hsm"}),
        _rotation(from_seq="2"),
        _rotation(gw=None),
        _rotation(by={"kid": IDENTITY.kid, "alg": ED25519}),  # the signer's class missing
        _rotation(by="someone"),
        {"cert": _rotation()["cert"]},  # no signature
    ],
)
def test_a_malformed_rotation_certificate_is_refused(body: object) -> None:
    with pytest.raises(CertificateError) as err:
        parse_identity(body)
    assert err.value.reason == "malformed"


def rotation_chain(body_of_rotation: object) -> tuple[Verifier, Chain]:
    """A chain whose key.rotate has *body_of_rotation*, then a session certified by the
    would-be new identity, then a record; all given to a verifier of the old identity."""
    gw = Chain(GW, identity=IDENTITY)
    v = Verifier({GW: gw.registration})
    records = [gw.start_session(TS), gw.seal("key.rotate", body_of_rotation, TS),  # type: ignore[arg-type]
               gw.start_session(TS, certifier=NEW_KEY), gw.seal("tag.presence", {"n": 1}, TS)]
    v.ingest(b"\n".join(r.data for r in records))
    return v, gw


def test_a_verified_rotation_makes_the_new_identity_trusted() -> None:
    v, _ = rotation_chain(rotation_body(gateway_id=GW, new=NEW_KEY, new_class="file",
                                        from_seq=2, current=IDENTITY, current_class="file"))
    assert v.summary()["verified"] == 4
    assert v.summary()["unknown_key"] == v.summary()["malformed"] == 0


@pytest.mark.parametrize(("body", "counter"), [
    (_rotation(kid=IDENTITY.kid), "malformed"),  # the certificate's kid is not its key's
    (_rotation(type="session"), "malformed"),
    (rotation_body(gateway_id=GW, new=NEW_KEY, new_class="file", from_seq=2,
                   current=NEW_KEY, current_class="file"), "forged_certificate"),  # self-signed
    (rotation_body(gateway_id="gw-other-0001", new=NEW_KEY, new_class="file", from_seq=2,
                   current=IDENTITY, current_class="file"), "forged_certificate"),
    (rotation_body(gateway_id=GW, new=NEW_KEY, new_class="file", from_seq=3,
                   current=IDENTITY, current_class="file"), "forged_certificate"),
])
def test_a_rotation_that_does_not_certify_is_not_followed(body: object, counter: str) -> None:
    v, _ = rotation_chain(body)
    summary = v.summary()
    assert summary[counter] == 1
    assert summary["verified"] == 2  # the first session and the key.rotate record itself
    assert summary["unknown_key"] == 2  # the new identity's session and its record wait


# -- registrations -----------------------------------------------------------------------
def registration_json(**changes: object) -> dict[str, object]:
    obj: dict[str, object] = {"format": 2, "gateway_id": GW, "alg": ED25519,
                              "key": b64u(IDENTITY.public_raw), "kid": IDENTITY.kid,
                              "class": "tpm", "suite": "sm"}
    for name, value in changes.items():
        if value is None:
            del obj[name]
        else:
            obj[name] = value
    return obj


def test_a_registration_reads_every_field() -> None:
    reg = Registration.from_json(registration_json())
    assert reg == Registration(GW, ED25519, IDENTITY.public_raw, IDENTITY.kid, "tpm", "sm")
    assert Registration.from_json(registration_json(suite=None)).suite == "ed25519"
    verifier = reg.verifier()
    assert (verifier.alg, verifier.public_raw) == (ED25519, IDENTITY.public_raw)
    assert verifier.verify(IDENTITY.sign(b"x"), b"x")


@pytest.mark.parametrize(("changes", "message"), [
    ({"alg": None}, r"^not a gateway registration \('alg'\)$"),
    ({"class": None}, r"^not a gateway registration \('class'\)$"),
    ({"key": None}, r"^not a gateway registration \('key'\)$"),
    ({"gateway_id": None}, r"^not a gateway registration \('gateway_id'\)$"),
    ({"kid": None}, r"^not a gateway registration \('kid'\)$"),
    ({"key": "A"}, r"^not a gateway registration \(Invalid base64"),
    ({"alg": "rsa"}, rf"^registration of {GW}: algorithm 'rsa' or class 'tpm' unknown$"),
    ({"class": "hsm"}, rf"^registration of {GW}: algorithm '{ED25519}' or class 'hsm' unknown$"),
    ({"key": b64u(b"short")}, r"Ed25519 public key is 32 bytes"),  # not a key of its alg
    ({"kid": NEW_KEY.kid}, rf"^registration of {GW}: kid does not match the key$"),
])
def test_a_bad_registration_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Registration.from_json(registration_json(**changes))


def test_registrations_load_by_gateway_id_and_name_a_bad_file(tmp_path: Path) -> None:
    other = registration_json(gateway_id="gw-test-0002", key=b64u(NEW_KEY.public_raw),
                              kid=NEW_KEY.kid)
    paths = []
    for i, obj in enumerate([registration_json(), other]):
        paths.append(tmp_path / f"{i}.pub")
        paths[-1].write_text(json.dumps(obj))
    regs = load_registrations(paths)
    assert list(regs) == [GW, "gw-test-0002"]
    assert regs["gw-test-0002"].kid == NEW_KEY.kid
    assert load_registrations([]) == {}
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\n")  # a format-1 PEM: no registration
    with pytest.raises(ValueError, match=rf"^{bad}: "):
        load_registrations([paths[0], bad])
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'none.pub'}: "):
        load_registrations([tmp_path / "none.pub"])
    bad.write_text(json.dumps(registration_json(kid=NEW_KEY.kid)))
    with pytest.raises(ValueError, match=rf"^{bad}: registration of {GW}: kid does not"):
        load_registrations([bad])


# -- verify_record: each refusal with its reason and detail ------------------------------
def test_verified_record_is_the_whole_record_signature_included() -> None:
    sealed = sealer().seal(presence(7), TS)
    verified = verify_record(sealed.data, trusting(KEY, key_class="tpm"))
    assert verified.record == json.loads(sealed.data)
    assert verified.record["sig"] == json.loads(sealed.data)["sig"]
    assert (verified.gateway_id, verified.seq, verified.kind) == (GW, 1, "tag.presence")
    assert (verified.prev, verified.digest) == (GENESIS_PREV, sealed.digest)
    assert verified.key_class == "tpm"


def test_the_key_lookup_is_given_the_parsed_record() -> None:
    sealed = sealer().seal(presence(7), TS)
    seen: list[dict[str, JSON]] = []

    def key_for(rec: dict[str, JSON]) -> tuple[PublicKey, str] | None:
        seen.append(dict(rec))
        return KEYS(rec)

    verify_record(sealed.data, key_for)
    assert seen == [json.loads(sealed.data)]
    assert parse_record(sealed.data) == json.loads(sealed.data)


def test_a_format_1_record_still_verifies_with_ed25519_and_sha256() -> None:
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
    data = legacy(private)
    rec = parse_record(data)
    assert "alg" not in rec
    assert rec["v"] == 1
    verified = verify_record(data, trusting(IDENTITY))
    assert verified.digest == hashlib.sha256(data).digest()
    assert verified.record == json.loads(data)
    # an Ed25519 key and nothing else verifies it
    err = refused(data, lambda _r: (PublicKey(SM2, SoftwareKey.generate(SM2).public_raw),
                                    "file"))
    assert str(err) == f"bad_signature: seq 1 of {GW}: alg '{ED25519}' but key " \
                       f"'{IDENTITY.kid}' is {SM2}"
    assert refused(data, trusting(NEW_KEY)).reason == "unknown_key"


def test_a_forged_format_1_record_is_refused() -> None:
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
    data = legacy(private).replace(b'"n":1', b'"n":2')
    assert refused(data, trusting(IDENTITY)).reason == "bad_signature"


def test_a_signed_record_with_an_undecodable_prev_is_refused() -> None:
    rec = json.loads(shaped(prev="A"))
    del rec["sig"]
    rec["sig"] = b64u(KEY.sign(canonical(rec)))
    err = refused(canonical(rec))
    assert str(err).startswith("malformed: field 'prev': Invalid base64url")


def test_a_record_whose_alg_is_not_its_keys_is_refused() -> None:
    sealed = sealer().seal(presence(1), TS)
    rec = json.loads(sealed.data)
    rec["alg"] = SM2
    err = refused(canonical(rec))
    assert str(err) == f"bad_signature: seq 1 of {GW}: alg '{SM2}' but key '{KEY.kid}' is " \
                       f"{ED25519}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "malformed: not JSON: "),
        (b"{", "malformed: not JSON: "),
        (b"[1, 2]", "malformed: not a JSON object"),
        (shaped(seq="1"), "malformed: field 'seq' missing or not <class 'int'>"),
        (shaped(boot=True), "malformed: field 'boot' missing or not <class 'int'>"),
        (shaped(alg=1), "malformed: field 'alg' missing or not <class 'str'>"),
        (shaped(alg="rsa-sha1"), "malformed: unknown algorithm 'rsa-sha1'"),
        (shaped(v=3), "version: format version 3 not supported"),
        (shaped(v=0), "version: format version 0 not supported"),
        (shaped(body={"lat": 46.8}), "malformed: float at record.body.lat: "),
        (shaped(body={"p": [1, 2.5]}), r"malformed: float at record.body.p[1]: "),
        (shaped(kid="nobody"), f"unknown_key: key id 'nobody' is not trusted for gateway '{GW}'"),
        (shaped(), f"bad_signature: seq 1 of {GW}"),
        # a version-1 record that has an alg is no format-1 record: its alg is checked,
        # and then it is refused (format 1 has no alg)
        (shaped(v=1), "malformed: a record of format 1 has no 'alg' (format 2 has)"),
        (shaped(v=1, alg=1), "malformed: field 'alg' missing or not <class 'str'>"),
        (shaped(v=1, alg="rsa-sha1"), "malformed: unknown algorithm 'rsa-sha1'"),
        # JSON, but no canonical bytes: a lone surrogate has no UTF-8
        (shaped(body={"s": "\ud800"}), "malformed: 'utf-8' codec can't encode character"),
    ],
)
def test_refusals_say_why(data: bytes, message: str) -> None:
    err = refused(data)
    assert err.reason == message.partition(":")[0]
    assert str(err).startswith(message)


@pytest.mark.parametrize("name", list(REQUIRED_FIELDS))
def test_missing_field_is_malformed(name: str) -> None:
    rec = json.loads(shaped())
    del rec[name]
    err = refused(json.dumps(rec).encode())
    assert (err.reason, str(err)) == ("malformed", f"malformed: field {name!r} missing or not "
                                                   f"{REQUIRED_FIELDS[name]}")


@pytest.mark.parametrize("name", [f for f in REQUIRED_FIELDS if f not in ("alg", "v")])
def test_a_format_1_record_needs_every_field_but_alg(name: str) -> None:
    rec = json.loads(legacy(Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))))
    del rec[name]
    err = refused(json.dumps(rec).encode(), trusting(IDENTITY))
    assert (err.reason, str(err)) == ("malformed", f"malformed: field {name!r} missing or not "
                                                   f"{REQUIRED_FIELDS[name]}")


def test_a_format_2_record_without_alg_is_not_taken_for_format_1() -> None:
    rec = json.loads(legacy(Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96))),
                            v=2))
    assert str(refused(canonical(rec), trusting(IDENTITY))) == \
        "malformed: field 'alg' missing or not <class 'str'>"


@pytest.mark.parametrize("obj", [[], "gw-test-0001", 7, None])
def test_a_registration_that_is_no_json_object_is_refused_by_name(obj: object) -> None:
    with pytest.raises(ValueError, match=r"^not a gateway registration \(not a JSON object\)$"):
        Registration.from_json(obj)
