"""Sealing: canonical bytes, signatures, the hash chain, as the platform checks them."""

from __future__ import annotations

import json

import pytest

from buffer.seal import Sealer
from central.record import RecordError, verify_record
from central.verifier import Verifier
from core.record import GENESIS_PREV, JSON, Reading, Source, Timestamp, b64u, canonical
from core.suites import ED25519, SoftwareKey
from core.suites import Verifier as PublicKey
from lab.chains import Chain

#: The session key records are signed with (what the gateway signs with), and the
#: identity key that certifies it (what the platform registered).
KEY = SoftwareKey(ED25519, bytes(range(32)))
IDENTITY = SoftwareKey(ED25519, bytes(range(32, 64)))
SRC = Source("tag_receiver", "TR-0001", "1.0.0")
GW = "gw-test-0001"


def key_for(rec: dict[str, JSON]) -> tuple[PublicKey, str] | None:
    """verify_record's key lookup: only KEY is trusted."""
    return (PublicKey(KEY.alg, KEY.public_raw), "file") if rec["kid"] == KEY.kid else None


def sealer() -> Sealer:
    return Sealer(GW, KEY, last_seq=0, last_digest=GENESIS_PREV, boot=1)


def reading(n: int, kind: str = "tag.presence") -> Reading:
    return Reading(kind, SRC, {"tag": "T00001001", "counter": n, "strap_closed": True}, n)


def chain(suite: str = "ed25519") -> Chain:
    if suite == "ed25519":
        return Chain(GW, identity=IDENTITY)
    return Chain(GW, suite=suite)


def seal_many(n: int, suite: str = "ed25519", c: Chain | None = None) -> list[bytes]:
    """*n* records of one start: seq 1 is its key.session (KEY certified by IDENTITY for
    the Ed25519 suite), seq 2..n readings signed by that session key."""
    c = c or chain(suite)
    ts = Timestamp(1_700_000_000_000, "ntp", 0)
    out = [c.start_session(ts, session=KEY if suite == "ed25519" else None).data]
    for i in range(2, n + 1):
        out.append(c.seal("tag.presence", dict(reading(i).body), Timestamp(
            1_700_000_000_000 + i, "ntp", i), SRC).data)
    return out


def verifier(c: Chain | None = None) -> Verifier:
    c = c or chain()
    return Verifier({c.gateway_id: c.registration})


def test_canonical_form_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": "é", "c": [2, {"z": 0, "y": None}]}) == \
        '{"a":"é","b":1,"c":[2,{"y":null,"z":0}]}'.encode()


def test_sealed_record_is_canonical_and_verifies() -> None:
    data = sealer().seal(reading(1), Timestamp(1_700_000_000_001, "ntp", 1)).data
    rec = json.loads(data)
    assert canonical(rec) == data
    assert (rec["v"], rec["alg"], rec["kid"]) == (2, ED25519, KEY.kid)
    assert rec["seq"] == 1
    assert rec["prev"] == b64u(GENESIS_PREV)
    assert rec["prio"] == "position"
    verified = verify_record(data, key_for)
    assert verified.seq == 1
    assert verified.gateway_id == "gw-test-0001"
    assert verified.key_class == "file"


def test_any_changed_byte_breaks_the_record() -> None:
    data = sealer().seal(reading(1), Timestamp(1, "ntp", 1)).data
    index = data.index(b'"counter":1') + len('"counter":')
    forged = data[:index] + b"2" + data[index + 1 :]
    with pytest.raises(RecordError) as err:
        verify_record(forged, key_for)
    assert err.value.reason == "bad_signature"


def test_unknown_key_is_refused() -> None:
    other = SoftwareKey.generate(ED25519)
    s = Sealer("gw-test-0001", other, last_seq=0, last_digest=GENESIS_PREV, boot=1)
    data = s.seal(reading(1), Timestamp(1, "unsynced", 1)).data
    with pytest.raises(RecordError) as err:
        verify_record(data, key_for)
    assert err.value.reason == "unknown_key"
    # and the platform, which trusts only session keys its gateways certified: the
    # record waits for a key.session that never comes
    v = verifier()
    v.ingest_record(data)
    assert v.summary()["unknown_key"] == 1
    assert v.summary()["verified"] == 0


def test_floats_are_refused_at_sealing() -> None:
    with pytest.raises(TypeError, match="float"):
        sealer().seal(Reading("gnss.fix", SRC, {"lat": 46.8}, 1), Timestamp(1, "gnss", 1))


@pytest.mark.parametrize("suite", ["ed25519", "sm"])
def test_chain_links_each_record_to_the_one_before(suite: str) -> None:
    c = chain(suite)
    records = seal_many(5, suite, c)
    v = verifier(c)
    for data in records:
        v.ingest_record(data)
    assert v.summary()["chain_gaps"] == 0
    assert v.summary()["verified"] == 5


def test_a_removed_record_shows_as_a_chain_gap() -> None:
    records = seal_many(5)
    v = verifier()
    for data in records[:2] + records[3:]:
        v.ingest_record(data)
    assert v.gaps("gw-test-0001") == [(3, 3)]
    assert v.summary()["chain_gaps"] == 1


def test_out_of_order_arrival_still_checks_every_link() -> None:
    records = seal_many(6)
    v = verifier()
    for data in reversed(records):  # the key.session last: the others wait for it
        v.ingest_record(data)
    assert v.summary()["chain_gaps"] == 0
    assert v.summary()["verified"] == 6
    assert v.stats.chain_breaks == 0


def test_a_record_from_another_chain_breaks_the_link() -> None:
    a = seal_many(3)
    # a second, different history for the same gateway: same seqs, other content (the
    # same key.session at seq 1, then another record at seq 2)
    other = chain()
    fork = seal_many(1, c=other)
    assert fork[0] == a[0]
    forked = other.seal("tag.presence", dict(reading(99).body), Timestamp(5, "ntp", 5),
                        SRC).data
    v = verifier()
    v.ingest_record(a[0])  # the key.session both share
    v.ingest_record(forked)  # seq 2 of the fork
    v.ingest_record(a[2])  # seq 3 of the real chain
    assert v.summary()["verified"] == 3
    assert v.stats.chain_breaks == 1


def test_duplicates_are_counted_once() -> None:
    records = seal_many(3)
    v = verifier()
    v.ingest(b"\n".join(records))
    v.ingest(b"\n".join(records[1:]))
    assert v.stats.received == 3
    assert v.stats.duplicates == 2


def test_malformed_input_is_counted_not_raised() -> None:
    v = verifier()
    v.ingest(b"not json\n{}\n[1,2]\n" + b'{"v":1.5}')
    assert v.stats.malformed == 4
    assert v.stats.received == 0


def test_the_spliced_encoding_is_the_canonical_one() -> None:
    s = sealer()
    bodies = [{"tag": "é\u2028\"q\\", "n": -1, "nested": {"b": [1, None, True], "a": "x"}},
              {"sig": "a body key named sig", "src": {"seq": 1}}, {"alg": "a body key"}, {}]
    for body in bodies:
        data = s.seal(Reading("tag.presence", SRC, body, 1), Timestamp(1, "ntp", 1)).data
        assert canonical(json.loads(data)) == data
        verify_record(data, key_for)


def test_a_kind_missing_from_the_table_is_an_error_not_a_default_class() -> None:
    from core.kinds import UnknownKindError

    with pytest.raises(UnknownKindError, match=r"core\.kinds"):
        Reading("tag.tamperd", Source("tag_receiver", "TR-1"), {}, 0)
