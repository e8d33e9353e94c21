"""Key rotation: the old key vouches for the new one; the platform follows."""

from __future__ import annotations

import json
import time
from pathlib import Path

from app.assembly import Gateway
from app.config import Config
from buffer.seal import Sealer
from buffer.store import Store, StoreReader, store_path
from buffer.writer import StoreWriter
from central.verifier import Verifier
from core.clock import Clock
from core.kinds import Priority
from core.record import GENESIS_PREV, Reading, Source, key_id
from lab.site import NOWHERE
from provisioning.identity import Identity, load_identity, stage_next_key

SRC = Source("tag_receiver", "TR-0001")


def drain(db: Path, key: bytes) -> list[bytes]:
    reader = StoreReader(db, key)
    out: list[bytes] = []
    cursors: dict[Priority, int] = {}
    while (batch := reader.next_batch(cursors, 1000, 1 << 30)) is not None:
        cursors[batch[0]] = batch[1][-1][0]
        out.extend(data for _, data in batch[1])
    reader.close()
    return out


def test_rotation_mid_stream_is_followed_in_any_arrival_order(
    tmp_path: Path, identity: Identity
) -> None:
    db = tmp_path / "r.db"
    store = Store(db, identity.storage_key)
    sealer = store.sealer(identity.gateway_id, identity.signing_key)
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    old_kid = identity.kid
    new_key = stage_next_key(identity.directory)
    next_private = load_identity(identity.directory).next_key
    assert next_private is not None
    for i in range(5):
        writer.submit(Reading("tag.presence", SRC, {"n": i}, time.monotonic_ns()))
    writer.rotate_key(next_private)
    for i in range(5, 10):
        writer.submit(Reading("tag.presence", SRC, {"n": i}, time.monotonic_ns()))
    assert writer.flush()
    writer.stop()
    records = drain(db, identity.storage_key)
    kids = [json.loads(r)["kid"] for r in records]
    assert kids.count(old_kid) == 6  # five readings and the announcement
    assert kids.count(key_id(new_key)) == 5
    # in delivery order (the announcement is an alarm: it goes first) and reversed
    for order in (records, list(reversed(records))):
        v = Verifier({old_kid: identity.public_key})
        v.ingest(b"\n".join(order))
        summary = v.summary()
        assert summary["verified"] == 11
        assert summary["unknown_key"] == 0
        assert summary["chain_gaps"] == 0


def test_a_record_under_an_unannounced_key_stays_unverified(identity: Identity) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    rogue = Sealer(identity.gateway_id, Ed25519PrivateKey.generate(), last_seq=0,
                   last_digest=GENESIS_PREV, boot=1)
    data = rogue.seal(Reading("tag.presence", SRC, {"n": 1}, 1), Clock().timestamp(1)).data
    v = Verifier({identity.kid: identity.public_key})
    v.ingest(data)
    assert v.summary()["unknown_key"] == 1
    assert v.summary()["verified"] == 0


def test_the_gateway_announces_a_staged_key_at_start_and_promotes_it(
    tmp_path: Path, identity: Identity
) -> None:
    new_pub = stage_next_key(identity.directory)
    gateway = Gateway(Config(tmp_path / "data", NOWHERE), identity)  # records stay queued
    gateway.start()
    assert gateway.writer.flush()
    gateway.stop(drain_s=0.1)
    promoted = load_identity(identity.directory)
    assert promoted.kid == key_id(new_pub)
    assert promoted.next_key is None
    assert not (identity.directory / "signing.next.key").exists()
    kinds = [json.loads(r)["kind"] for r in drain(store_path(tmp_path / "data"),
                                                  identity.storage_key)]
    assert "key.rotate" in kinds
