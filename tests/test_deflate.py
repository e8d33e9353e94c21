"""Compressed records messages (core/deflate.py): the gateway's opt-in, the platform's
bounded inflation (a bomb is refused with a counted reason), the same records stored."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import pytest

from app.assembly import Gateway
from app.config import Config, UplinkSection
from central.db import Database
from central.ingest import MAX_MESSAGE_BYTES, Ingest, report
from central.verifier import Verifier
from core.deflate import (
    CORRUPT,
    MARK,
    TOO_LARGE,
    InflateError,
    deflate_message,
    inflate_message,
    is_deflated,
)
from core.head import make_head
from core.record import Reading, Source, Timestamp
from core.topics import PLATFORM_CN, records_topic
from lab.chains import Chain
from lab.mosquitto import Mosquitto, Pki, client_config
from lab.site import Platform
from provisioning.identity import Identity
from tests.helpers import wait_for

TS = Timestamp(1_760_000_000_000, "ntp", 1_000)


def _raw(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def test_a_message_inflates_to_its_bytes() -> None:
    message = b'{"a":1}\n{"b":2}\n{"type":"head"}'
    packed = deflate_message(message)
    assert packed.startswith(MARK)
    assert is_deflated(packed)
    assert not is_deflated(message)  # a plain message starts with "{"
    assert inflate_message(packed, len(message)) == message


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (MARK + _raw(b"\0" * (MAX_MESSAGE_BYTES * 50)), TOO_LARGE),  # a bomb: ~50 KB in
        (MARK + _raw(b"x" * 101), TOO_LARGE),  # one byte over the limit
        (MARK + b"not deflate at all", CORRUPT),
        (MARK + _raw(b"x" * 50)[:-3], CORRUPT),  # cut short
        (MARK + _raw(b"x" * 50) + b"more", CORRUPT),  # bytes after its end
        (b'{"a":1}', CORRUPT),  # no mark
    ],
)
def test_what_does_not_inflate_within_the_bound_is_refused(payload: bytes, reason: str) -> None:
    limit = MAX_MESSAGE_BYTES if len(payload) > 1000 else 100
    with pytest.raises(InflateError) as err:
        inflate_message(payload, limit)
    assert err.value.reason == reason
    assert inflate_message(MARK + _raw(b"x" * 100), 100) == b"x" * 100  # at the limit: fine


def _message(chain: Chain, n: int) -> bytes:
    records = [chain.start_session(TS)]
    records += [chain.seal("gnss.fix", {"n": i}, TS) for i in range(n)]
    body = b"\n".join(r.data for r in records) + b"\n"
    assert chain.session is not None
    return body + make_head(chain.gateway_id, 1, records[-1].seq, TS.mono_ms, chain.session,
                            before=body)


def test_the_ingest_stores_a_compressed_message_as_the_plain_one(db: Database) -> None:
    gw = Chain()
    ingest = Ingest(db)
    assert ingest.enrol(gw.registration)
    message = _message(gw, 20)
    packed = deflate_message(message)
    assert len(packed) < len(message) / 2  # what it is for
    result = ingest.ingest_message(records_topic(gw.gateway_id), packed)
    assert result.stored == 21
    assert result.heads == 1
    assert dict(result.quarantined) == {}
    r = report(db, gw.gateway_id)
    assert r["gaps_unexplained"] == []
    with db.transaction() as tx:
        stored = b"\n".join(bytes(row[0]) for row in tx.all(
            "SELECT data FROM records WHERE gw = ? ORDER BY seq", (gw.gateway_id,)))
    assert stored + b"\n" == message[:message.rindex(b"\n") + 1]  # the bytes, inflated


def test_the_ingest_refuses_a_bomb_with_its_reason(db: Database) -> None:
    gw = Chain()
    ingest = Ingest(db)
    assert ingest.enrol(gw.registration)
    topic = records_topic(gw.gateway_id)
    bomb = MARK + _raw(b"{" * (MAX_MESSAGE_BYTES * 20))
    assert len(bomb) < MAX_MESSAGE_BYTES // 40  # 20 MiB from ~20 KB on the wire
    assert dict(ingest.ingest_message(topic, bomb).quarantined) == {TOO_LARGE: 1}
    assert dict(ingest.ingest_message(topic, MARK + b"garbage").quarantined) == {CORRUPT: 1}
    assert report(db, gw.gateway_id)["quarantined"] == {CORRUPT: 1, TOO_LARGE: 1}
    # the gateway's genuine messages still go in
    assert ingest.ingest_message(topic, deflate_message(_message(gw, 3))).stored == 4


def test_the_verifier_inflates_and_counts_what_it_refuses() -> None:
    gw = Chain()
    verifier = Verifier({gw.gateway_id: gw.registration})
    topic = records_topic(gw.gateway_id)
    assert len(verifier.ingest(deflate_message(_message(gw, 5)), topic=topic)) == 6
    assert verifier.ingest(MARK + _raw(b"{" * (1 << 24)), topic=topic) == []
    assert verifier.summary()["inflate_refused"] == 1
    assert verifier.gaps(gw.gateway_id) == []


@pytest.mark.slow
def test_a_gateway_configured_for_it_sends_compressed_messages(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki, identity: Identity
) -> None:
    platform = Platform(client_config(mosquitto, pki, PLATFORM_CN), identity).start()
    config = Config(tmp_path / "data", client_config(mosquitto, pki, identity.gateway_id),
                    uplink=UplinkSection(deflate=True))
    gateway = Gateway(config, identity)
    gateway.start()
    try:
        src = Source("gnss", "GNSS-0001", "1.0.0")
        for i in range(30):
            gateway.writer.submit(Reading("gnss.fix", src, {"lat_e7": i}, time.monotonic_ns()))
        assert gateway.writer.flush()
        committed = gateway.writer.stats.committed
        wait_for(lambda: len(platform.arrived) >= committed, 15, "every record, verified")
    finally:
        gateway.stop(drain_s=10)
        platform.stop()
    assert gateway.forwarder.stats.messages_deflated >= 1
    summary = platform.summary()
    assert summary["chain_gaps"] == 0
    assert summary["bad_signature"] == summary["inflate_refused"] == 0
