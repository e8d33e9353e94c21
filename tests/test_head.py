"""The head statement that ends every records message (core/head.py)."""

from __future__ import annotations

import json

import pytest

from core.head import is_head, make_head, parse_head
from core.record import Reading, Source, Timestamp
from core.suites import ED25519, SM2, SoftwareKey, Verifier
from core.topics import records_topic
from lab.chains import Chain

TS = Timestamp(1_760_000_000_000, "ntp", 1_000)


@pytest.mark.parametrize("alg", [ED25519, SM2])
def test_a_head_is_signed_by_the_session_key_and_parses_back(alg: str) -> None:
    key = SoftwareKey.generate(alg)
    line = make_head("gw-test-0001", 3, 1234, 5_000, key)
    assert is_head(line)
    head = parse_head(line)
    assert (head.gateway_id, head.boot, head.committed_seq, head.mono) == \
        ("gw-test-0001", 3, 1234, 5_000)
    assert head.kid == key.kid
    assert Verifier(alg, key.public_raw).verify(head.sig, head.signed)
    assert not Verifier(alg, key.public_raw).verify(
        head.sig, head.signed.replace(b"1234", b"1235"))


def test_a_head_and_a_record_can_never_pass_for_each_other() -> None:
    chain = Chain()
    session = chain.start_session(TS)
    record = chain.sealer.seal(Reading("tag.presence", Source("tag_receiver", "TR-1"),
                                       {"type": "head"}, 1), TS)
    assert not is_head(session.data)
    assert not is_head(record.data)  # a body holding "type":"head" is still a record
    with pytest.raises(ValueError, match="fields"):
        parse_head(record.data)
    assert chain.session is not None
    line = make_head(chain.gateway_id, 1, 2, 3, chain.session)
    from central.record import RecordError, parse_record
    with pytest.raises(RecordError):
        parse_record(line)


@pytest.mark.parametrize("change", [
    lambda h: h.replace(b'"type":"head"', b'"type":"tail"'),
    lambda h: h.replace(b'{"alg"', b'{ "alg"'),
    lambda h: json.dumps({**json.loads(h), "extra": 1}).encode(),
    lambda h: h.replace(b'"boot":1', b'"boot":true'),
    lambda h: b"not json",
])
def test_a_malformed_head_is_refused(change: object) -> None:
    line = make_head("gw-test-0001", 1, 2, 3, SoftwareKey.generate(ED25519))
    with pytest.raises(ValueError, match="head"):
        parse_head(change(line))  # type: ignore[operator]


def _chain_with(n: int) -> tuple[Chain, list[bytes]]:
    chain = Chain()
    records = [chain.start_session(TS).data]
    records += [chain.seal("tag.presence", {"n": i}, TS).data for i in range(n)]
    return chain, records


def test_a_dropped_tail_is_a_gap_once_a_head_announced_it() -> None:
    from central.verifier import Verifier

    chain, records = _chain_with(5)  # seqs 1..6
    assert chain.session is not None
    head = make_head(chain.gateway_id, 1, 6, TS.mono_ms, chain.session)
    quiet = Verifier({chain.gateway_id: chain.registration})
    quiet.ingest(b"\n".join(records[:4]))  # the last two never come: nothing says so
    assert quiet.gaps(chain.gateway_id) == []
    told = Verifier({chain.gateway_id: chain.registration})
    told.ingest(b"\n".join([*records[:4], head]), topic=records_topic(chain.gateway_id))
    assert told.summary()["heads"] == 1
    assert told.gaps(chain.gateway_id) == [(5, 6)]
    assert told.summary()["malformed"] == 0


def test_a_head_before_its_session_waits_and_a_forged_one_is_refused() -> None:
    from central.verifier import Verifier

    chain, records = _chain_with(2)
    assert chain.session is not None
    head = make_head(chain.gateway_id, 1, 9, TS.mono_ms, chain.session)
    v = Verifier({chain.gateway_id: chain.registration})
    v.ingest(head)  # its key.session has not arrived
    assert v.summary()["heads"] == 0
    v.ingest(b"\n".join(records))
    assert v.summary()["heads"] == 1
    assert v.gaps(chain.gateway_id) == [(4, 9)]
    forged = make_head(chain.gateway_id, 1, 99, TS.mono_ms, SoftwareKey.generate(ED25519))
    v.ingest(forged)  # a kid no session has: kept aside, never trusted
    assert v.gaps(chain.gateway_id) == [(4, 9)]
    other_boot = make_head(chain.gateway_id, 2, 50, TS.mono_ms, chain.session)
    v.ingest(other_boot)
    assert v.summary()["bad_signature"] == 1
    assert v.gaps(chain.gateway_id) == [(4, 9)]


def test_heads_waiting_for_a_session_are_bounded() -> None:
    """Heads naming kids no key.session certified (anyone can send them) never grow the
    verifier without bound; the newest waiting ones are kept."""
    from central.verifier import MAX_PENDING_HEADS, Verifier

    chain, records = _chain_with(1)
    assert chain.session is not None
    v = Verifier({chain.gateway_id: chain.registration})
    for i in range(MAX_PENDING_HEADS * 3):
        v.ingest(make_head(chain.gateway_id, 1, 100 + i, TS.mono_ms,
                           SoftwareKey.generate(ED25519)))
    real = make_head(chain.gateway_id, 1, 5, TS.mono_ms, chain.session)
    v.ingest(real)  # waits too, and is not pushed out by the ones after it
    assert len(v._chains[chain.gateway_id].pending_heads) == MAX_PENDING_HEADS
    v.ingest(b"\n".join(records))
    assert v.summary()["heads"] == 1
    assert v.gaps(chain.gateway_id) == [(3, 5)]
