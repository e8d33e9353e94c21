"""Sealing: canonical bytes, signatures, the hash chain, as the platform checks them."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from buffer.seal import Sealer
from central.record import RecordError, verify_record
from central.verifier import Verifier
from core.record import GENESIS_PREV, Reading, Source, Timestamp, b64u, canonical, key_id

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
SRC = Source("tag_receiver", "TR-0001", "1.0.0")


def sealer() -> Sealer:
    return Sealer("gw-test-0001", KEY, last_seq=0, last_digest=GENESIS_PREV, boot=1)


def reading(n: int, kind: str = "tag.presence") -> Reading:
    return Reading(kind, SRC, {"tag": "T00001001", "counter": n, "strap_closed": True}, n)


def seal_many(n: int) -> list[bytes]:
    s = sealer()
    return [s.seal(reading(i), Timestamp(1_700_000_000_000 + i, "ntp", i)).data
            for i in range(1, n + 1)]


def test_canonical_form_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": "é", "c": [2, {"z": 0, "y": None}]}) == \
        '{"a":"é","b":1,"c":[2,{"y":null,"z":0}]}'.encode()


def test_sealed_record_is_canonical_and_verifies() -> None:
    data = seal_many(1)[0]
    rec = json.loads(data)
    assert canonical(rec) == data
    assert rec["seq"] == 1
    assert rec["prev"] == b64u(GENESIS_PREV)
    assert rec["prio"] == "position"
    verified = verify_record(data, KEYS)
    assert verified.seq == 1
    assert verified.gateway_id == "gw-test-0001"


def test_any_changed_byte_breaks_the_record() -> None:
    data = seal_many(1)[0]
    index = data.index(b'"counter":1') + len('"counter":')
    forged = data[:index] + b"2" + data[index + 1 :]
    with pytest.raises(RecordError) as err:
        verify_record(forged, KEYS)
    assert err.value.reason == "bad_signature"


def test_unknown_key_is_refused() -> None:
    other = Ed25519PrivateKey.generate()
    s = Sealer("gw-test-0001", other, last_seq=0, last_digest=GENESIS_PREV, boot=1)
    data = s.seal(reading(1), Timestamp(1, "unsynced", 1)).data
    with pytest.raises(RecordError) as err:
        verify_record(data, KEYS)
    assert err.value.reason == "unknown_key"


def test_floats_are_refused_at_sealing() -> None:
    with pytest.raises(TypeError, match="float"):
        sealer().seal(Reading("gnss.fix", SRC, {"lat": 46.8}, 1), Timestamp(1, "gnss", 1))


def test_chain_links_each_record_to_the_one_before() -> None:
    records = seal_many(5)
    v = Verifier(KEYS)
    for data in records:
        v.ingest_record(data)
    assert v.summary()["chain_gaps"] == 0
    assert v.summary()["verified"] == 5


def test_a_removed_record_shows_as_a_chain_gap() -> None:
    records = seal_many(5)
    v = Verifier(KEYS)
    for data in records[:2] + records[3:]:
        v.ingest_record(data)
    assert v.gaps("gw-test-0001") == [(3, 3)]
    assert v.summary()["chain_gaps"] == 1


def test_out_of_order_arrival_still_checks_every_link() -> None:
    records = seal_many(6)
    v = Verifier(KEYS)
    for data in reversed(records):
        v.ingest_record(data)
    assert v.summary()["chain_gaps"] == 0
    assert v.stats.chain_breaks == 0


def test_a_record_from_another_chain_breaks_the_link() -> None:
    a = seal_many(3)
    # a second, different history for the same gateway: same seqs, other content
    other = sealer()
    forked = other.seal(reading(99), Timestamp(5, "ntp", 5)).data
    v = Verifier(KEYS)
    v.ingest_record(forked)  # seq 1 of the fork
    v.ingest_record(a[1])  # seq 2 of the real chain
    assert v.stats.chain_breaks == 1


def test_duplicates_are_counted_once() -> None:
    records = seal_many(3)
    v = Verifier(KEYS)
    v.ingest(b"\n".join(records))
    v.ingest(b"\n".join(records[1:]))
    assert v.stats.received == 3
    assert v.stats.duplicates == 2


def test_malformed_input_is_counted_not_raised() -> None:
    v = Verifier(KEYS)
    v.ingest(b"not json\n{}\n[1,2]\n" + b'{"v":1.5}')
    assert v.stats.malformed == 4
    assert v.stats.received == 0


def test_the_spliced_encoding_is_the_canonical_one() -> None:
    s = sealer()
    bodies = [{"tag": "é\u2028\"q\\", "n": -1, "nested": {"b": [1, None, True], "a": "x"}},
              {"sig": "a body key named sig", "src": {"seq": 1}}, {}]
    for body in bodies:
        data = s.seal(Reading("tag.presence", SRC, body, 1), Timestamp(1, "ntp", 1)).data
        assert canonical(json.loads(data)) == data
        verify_record(data, KEYS)


def test_a_kind_missing_from_the_table_is_an_error_not_a_default_class() -> None:
    from core.kinds import UnknownKindError

    with pytest.raises(UnknownKindError, match=r"core\.kinds"):
        Reading("tag.tamperd", Source("tag_receiver", "TR-1"), {}, 0)
