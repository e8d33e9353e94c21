"""A head statement that ``covers`` its message (core/head.py): its one signature signs
every record line of the message, so the ingest need not check each record's own
signature (central/ingest.py), and what it cannot vouch for is still checked one by one.
On SQLite and on PostgreSQL (the ``db`` fixture)."""

from __future__ import annotations

import json

import pytest

from central.db import Database
from central.ingest import Ingest, report
from central.record import parse_record
from core.head import covered_prefix, make_head, parse_head
from core.record import b64u, canonical
from core.suites import ED25519, SoftwareKey
from core.topics import records_topic
from lab.chains import Chain
from tests.test_ingest import TS, count

TOPIC_GW = "gw-test-0001"


def started(db: Database, *, sig_audit: float) -> tuple[Chain, Ingest]:
    """An enrolled gateway whose key.session the platform stored already (so the heads
    of the next messages are verified before their records)."""
    chain = Chain(TOPIC_GW)
    ingest = Ingest(db, sig_audit=sig_audit)
    ingest.enrol(chain.registration)
    first = chain.message([chain.start_session(TS).data])
    assert ingest.ingest_message(records_topic(TOPIC_GW), first).stored == 1
    return chain, ingest


def bad_own_signature(data: bytes) -> bytes:
    """*data* with a signature that is no signature of it (what only the holder of the
    session key could put under a head it signs)."""
    rec = parse_record(data)
    rec["sig"] = b64u(bytes(64))
    return canonical(rec)


def test_the_forwarder_s_head_covers_the_bytes_before_it() -> None:
    chain = Chain(TOPIC_GW)
    lines = [chain.start_session(TS).data, chain.seal("tag.presence", {"n": 1}, TS).data]
    payload = chain.message(lines)
    head_line = payload.rsplit(b"\n", 1)[1]
    head = parse_head(head_line)
    before = covered_prefix(payload, head_line)
    assert before == b"\n".join(lines) + b"\n"
    assert head.covers is not None
    assert len(head.covers) == 32
    assert covered_prefix(payload + b"\n", head_line) is None  # not its last line


@pytest.mark.parametrize("audit", [0.0, 1.0])
def test_a_covered_message_is_verified_by_its_head(db: Database, audit: float) -> None:
    """Under a verified covering head a record's own signature is not what verifies it:
    a record whose own signature is wrong (made so by the key's holder) is stored when
    no audit samples it, and refused ``bad_signature`` when the audit checks every one."""
    chain, ingest = started(db, sig_audit=audit)
    good = [chain.seal("tag.presence", {"n": i}, TS).data for i in range(5)]
    odd = bad_own_signature(chain.seal("tag.presence", {"n": 5}, TS).data)
    result = ingest.ingest_message(records_topic(TOPIC_GW), chain.message([*good, odd]))
    assert result.heads == 1
    if audit == 0.0:
        assert result.stored == 6
        assert dict(result.quarantined) == {}
    else:
        assert result.stored == 5
        assert dict(result.quarantined) == {"bad_signature": 1}


def test_a_head_over_other_bytes_verifies_nothing(db: Database) -> None:
    """Lines moved, changed or removed under a head: the head is refused, every record is
    checked on its own signature (the genuine ones stored, a changed one refused)."""
    chain, ingest = started(db, sig_audit=0.0)
    lines = [chain.seal("tag.presence", {"n": i}, TS).data for i in range(4)]
    payload = chain.message(lines)
    head_line = payload.rsplit(b"\n", 1)[1]
    swapped = b"\n".join([lines[1], lines[0], lines[2], lines[3], head_line])
    result = ingest.ingest_message(records_topic(TOPIC_GW), swapped)
    assert dict(result.quarantined) == {"bad_signature": 1}  # the head
    assert result.heads == 0
    assert result.stored == 4

    more = [chain.seal("tag.presence", {"n": 10 + i}, TS).data for i in range(3)]
    payload = chain.message(more)
    head_line = payload.rsplit(b"\n", 1)[1]
    changed = json.loads(more[1])
    changed["body"]["n"] = 99  # the content changed, its own signature left as it was
    tampered = b"\n".join([more[0], canonical(changed), more[2], head_line])
    result = ingest.ingest_message(records_topic(TOPIC_GW), tampered)
    assert dict(result.quarantined) == {"bad_signature": 2}  # the head and the record
    assert result.stored == 2


def test_a_head_covers_only_the_records_of_its_own_key(db: Database) -> None:
    """A record signed by another session key in a message whose head is signed by the
    current one is checked on its own signature: a stolen old session key's records
    cannot ride under a new head."""
    chain, ingest = started(db, sig_audit=0.0)
    old = bad_own_signature(chain.seal("tag.presence", {"n": 0}, TS).data)
    assert ingest.ingest_message(records_topic(TOPIC_GW),
                                 chain.message([chain.start_session(TS).data])).stored == 1
    new = [chain.seal("tag.presence", {"n": i}, TS).data for i in range(1, 3)]
    result = ingest.ingest_message(records_topic(TOPIC_GW), chain.message([old, *new]))
    assert result.heads == 1
    assert dict(result.quarantined) == {"bad_signature": 1}
    assert result.stored == 2


def test_a_head_signed_by_another_key_covers_nothing(db: Database) -> None:
    chain, ingest = started(db, sig_audit=0.0)
    lines = [bad_own_signature(chain.seal("tag.presence", {"n": 0}, TS).data)]
    before = lines[0] + b"\n"
    forged = make_head(TOPIC_GW, chain.boot, chain.sealer.last_seq, 0,
                       SoftwareKey.generate(ED25519), before=before)
    result = ingest.ingest_message(records_topic(TOPIC_GW), before + forged)
    assert result.heads == 0
    assert dict(result.quarantined) == {"bad_signature": 1}  # the record, checked alone
    assert result.stored == 0


def test_a_message_that_brings_its_own_key_session_is_checked_record_by_record(
        db: Database) -> None:
    """The first message after a start carries the key.session the head is signed with:
    the head is verified after the records (it still announces its committed seq), and no
    record of that message is taken on the head's word."""
    chain = Chain(TOPIC_GW)
    ingest = Ingest(db, sig_audit=0.0)
    ingest.enrol(chain.registration)
    lines = [chain.start_session(TS).data,
             bad_own_signature(chain.seal("tag.presence", {"n": 0}, TS).data)]
    result = ingest.ingest_message(records_topic(TOPIC_GW), chain.message(lines))
    assert result.heads == 1
    assert dict(result.quarantined) == {"bad_signature": 1}
    assert result.stored == 1
    assert report(db, TOPIC_GW)["head"]["committed_seq"] == 2  # type: ignore[index]
    assert count(db, "records", TOPIC_GW) == 1
