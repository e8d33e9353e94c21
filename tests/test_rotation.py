"""Identity rotation and session keys: the platform follows only what the registered
identity certified (core/session.py, docs/records.md)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from app.assembly import Gateway
from app.config import Config
from buffer.store import store_path
from central.verifier import Verifier
from core.record import Reading, Timestamp
from core.suites import SoftwareKey, key_id
from lab.chains import Chain
from lab.site import NOWHERE, registrations
from provisioning.identity import Identity, load_identity, stage_next_key
from tests.helpers import stored_records

TS = Timestamp(1_760_000_000_000, "ntp", 1_000)


def run_gateway(tmp_path: Path, identity: Identity) -> list[bytes]:
    """Start and stop the real gateway (no broker: records stay queued); its records."""
    gateway = Gateway(Config(tmp_path / "data", NOWHERE), identity)
    gateway.start()
    assert gateway.writer.flush()
    gateway.stop(drain_s=0.1)
    return stored_records(store_path(tmp_path / "data"), identity.storage_key)


def test_every_start_certifies_a_new_session_key(tmp_path: Path, identity: Identity) -> None:
    run_gateway(tmp_path, identity)
    stored = run_gateway(tmp_path, load_identity(identity.directory))  # the store keeps both
    records = [json.loads(r) for r in stored]
    sessions = sorted((r for r in records if r["kind"] == "key.session"), key=lambda r: r["seq"])
    assert len(sessions) == 2
    assert sessions[0]["kid"] != sessions[1]["kid"]  # a new key per start
    assert {r["kid"] for r in records} == {s["kid"] for s in sessions}  # none signed by identity
    assert identity.kid not in {r["kid"] for r in records}
    for s in sessions:
        assert s["body"]["cert"]["identity"] == {"kid": identity.kid, "alg": identity.key.alg,
                                                 "class": "file"}
        assert s["body"]["cert"]["from_seq"] == s["seq"]
    v = Verifier(registrations(identity))
    v.ingest(b"\n".join(stored))
    summary = v.summary()
    assert summary["verified"] == len(records)
    assert summary["chain_gaps"] == 0
    assert v.key_classes(identity.gateway_id) == {"file": len(records)}


def test_a_staged_identity_is_certified_at_start_and_promoted(
    tmp_path: Path, identity: Identity
) -> None:
    old = registrations(identity)  # the platform knows only the old identity
    new = stage_next_key(identity.directory)
    records = run_gateway(tmp_path, identity)
    promoted = load_identity(identity.directory)
    assert promoted.kid == key_id(new.alg, new.public_raw)
    assert promoted.next_key is None
    assert not (identity.directory / "signing.next.key").exists()
    kinds = [json.loads(r)["kind"] for r in records]
    assert kinds.count("key.rotate") == 1
    assert kinds.count("key.session") == 2  # one by the old identity, one by the new
    records = run_gateway(tmp_path, promoted)  # the next start: certified by the new one
    for order in (records, list(reversed(records)), random.Random(7).sample(records,
                                                                            len(records))):
        v = Verifier(old)
        v.ingest(b"\n".join(order))
        summary = v.summary()
        assert summary["verified"] == len(records), summary
        assert summary["unknown_key"] == summary["forged_certificate"] == 0
        assert summary["chain_gaps"] == 0


class Impostor:
    """Claims to be *registered* (its public key, so its key id) but signs with *other*."""

    def __init__(self, registered: SoftwareKey, other: SoftwareKey) -> None:
        self.alg, self.public_raw, self._other = registered.alg, registered.public_raw, other

    def sign(self, data: bytes) -> bytes:
        return self._other.sign(data)


def test_a_session_certified_by_anything_but_the_registered_identity_is_refused() -> None:
    gw = Chain()
    assert gw.identity is not None
    v = Verifier({gw.gateway_id: gw.registration})
    forged = gw.start_session(TS, certifier=Impostor(gw.identity,
                                                     SoftwareKey.generate("ed25519-sha256")))
    after = gw.seal("tag.presence", {"n": 1}, TS)
    v.ingest(forged.data + b"\n" + after.data)
    summary = v.summary()
    assert summary["forged_certificate"] == 1
    assert summary["verified"] == 0
    assert summary["unknown_key"] == 1  # the record waits for a certificate that never comes
    # certified by an identity the platform never heard of: nothing verifies either
    other = Chain()
    v2 = Verifier({other.gateway_id: other.registration})
    v2.ingest(other.start_session(TS, certifier=SoftwareKey.generate("ed25519-sha256")).data)
    assert v2.summary()["verified"] == 0
    assert v2.summary()["unknown_key"] == 1


def test_a_session_key_signs_only_for_its_gateway() -> None:
    a, b = Chain("gw-aaaa-0001"), Chain("gw-bbbb-0001")
    v = Verifier({a.gateway_id: a.registration, b.gateway_id: b.registration})
    v.ingest(a.start_session(TS).data)
    # a record of B's chain, signed with A's (certified) session key
    assert a.session is not None
    v.ingest(b.forge(a.session, "tag.presence", {"n": 1}, TS).data)
    assert v.summary()["verified"] == 1  # A's key.session only
    assert v.kinds(b.gateway_id) == {}


def test_a_superseded_or_expired_session_key_is_refused() -> None:
    gw = Chain()
    v = Verifier({gw.gateway_id: gw.registration})
    first = gw.start_session(TS, lifetime_ms=10_000)
    old_key = gw.session
    late = gw.seal("tag.presence", {"n": 1}, Timestamp(TS.utc_ms + 20_000, "ntp",
                                                       TS.mono_ms + 20_000))
    second = gw.start_session(TS)
    # the old key signs a record after the new session began
    assert old_key is not None
    stale = gw.forge(old_key, "tag.presence", {"n": 2}, TS)
    v.ingest(b"\n".join([first.data, late.data, second.data, stale.data]))
    summary = v.summary()
    assert summary["out_of_validity"] == 2  # past its time; past the next key.session
    assert summary["verified"] == 2


@pytest.mark.parametrize("suite", ["ed25519", "sm"])
def test_identity_rotation_by_record(suite: str) -> None:
    gw = Chain(suite=suite)
    v = Verifier({gw.gateway_id: gw.registration})
    records = [gw.start_session(TS), gw.seal("tag.presence", {"n": 1}, TS)]
    new = SoftwareKey.generate(gw.registration.alg)
    records.append(gw.rotate_identity(TS, new))
    records.append(gw.start_session(TS))
    records.append(gw.seal("tag.presence", {"n": 2}, TS))
    v.ingest(b"\n".join(r.data for r in reversed(records)))
    assert v.summary()["verified"] == 5
    assert v.summary()["chain_gaps"] == 0


def test_a_renewal_the_tpm_cannot_certify_keeps_the_current_session(
    tmp_path: Path, identity: Identity
) -> None:
    """The identity key stops answering (a TPM gone) at a daily renewal: counted, logged,
    and records go on under the current session key; nothing is lost or unverifiable."""
    import time as _time

    from buffer.store import Store
    from buffer.writer import StoreWriter
    from core.clock import Clock
    from core.record import Reading, Source
    from core.session import SESSION_KIND, session_body

    db = tmp_path / "r.db"
    store = Store(db, identity.storage_key)
    writer = StoreWriter(store, store.sealer(identity.gateway_id), Clock())
    writer.start()
    first = identity.session_key()

    def certify(seq: int, boot: int) -> dict[str, object]:
        return session_body(gateway_id=identity.gateway_id, session=first, boot=boot,
                            from_seq=seq, until_mono=10**15, identity=identity.key,
                            identity_class="file")

    def broken(_seq: int, _boot: int) -> dict[str, object]:
        raise OSError("the TPM does not answer")

    src = Source("tag_receiver", "TR-0001")
    writer.key_record(SESSION_KIND, certify, session=first, mono_ns=_time.monotonic_ns())
    writer.submit(Reading("tag.presence", src, {"n": 1}, _time.monotonic_ns()))
    writer.key_record(SESSION_KIND, broken, session=identity.session_key(),
                      mono_ns=_time.monotonic_ns())
    writer.submit(Reading("tag.presence", src, {"n": 2}, _time.monotonic_ns()))
    assert writer.flush()
    assert writer.stats.key_failures == 1
    writer.stop()
    records = stored_records(db, identity.storage_key)
    assert len(records) == 3  # one key.session, two readings, no half-made key record
    v = Verifier(registrations(identity))
    v.ingest(b"\n".join(records))
    assert v.summary()["verified"] == 3
    assert {json.loads(r)["kid"] for r in records} == {first.kid}


def test_a_second_history_for_a_seq_is_a_conflict_not_a_duplicate() -> None:
    gw = Chain()
    v = Verifier({gw.gateway_id: gw.registration})
    session = gw.start_session(TS)
    draft = gw.sealer.draft()
    first = draft.seal(Reading("tag.presence", gw.source, {"n": 1}, 1), TS)
    fork = gw.sealer.draft().seal(Reading("tag.presence", gw.source, {"n": 2}, 1), TS)
    assert first.seq == fork.seq
    v.ingest(b"\n".join([session.data, first.data, first.data, fork.data]))
    summary = v.summary()
    assert (summary["verified"], summary["duplicates"], summary["conflicts"]) == (2, 1, 1)
