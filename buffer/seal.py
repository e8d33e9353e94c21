"""Sealing: numbering, hash chain and Ed25519 signature of each record (docs/records.md).

Sans-IO. A group of readings is sealed on a :class:`Draft` taken from the
:class:`Sealer`; the sealer moves on to the draft's chain state only once the
group is committed (:meth:`Sealer.advance`). A failed commit simply drops the
draft: nothing is rolled back because nothing moved.

``sig`` is over the canonical bytes (:func:`core.record.canonical`) of the record
without ``sig``; ``prev`` is the SHA-256 of the complete canonical bytes of the
record with the previous ``seq``.
"""

from __future__ import annotations

import hashlib
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from core.record import (
    FORMAT_VERSION,
    JSON,
    Reading,
    SealedRecord,
    Timestamp,
    b64u,
    check_no_float,
    has_float,
    key_id,
)

#: The record's fields that sort after "sig".
_AFTER_SIG = ("src", "t", "tq", "v")
_DUMPS = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def rotation_body(new_key: Ed25519PublicKey) -> dict[str, JSON]:
    """Body of a ``key.rotate`` record: signed by the old key, it vouches for the new one."""
    return {"new_kid": key_id(new_key),
            "new_key": b64u(new_key.public_bytes(Encoding.Raw, PublicFormat.Raw))}


class Draft:
    """Seals records after the sealer's last committed one, without moving the sealer."""

    def __init__(self, gateway_id: str, key: Ed25519PrivateKey, kid: str, *, boot: int,
                 last_seq: int, last_digest: bytes) -> None:
        self.gateway_id = gateway_id
        self.key = key
        self.kid = kid
        self.boot = boot
        self.base_seq = last_seq
        self.last_seq = last_seq
        self.last_digest = last_digest

    def use_key(self, key: Ed25519PrivateKey) -> None:
        """Sign from the next record on with *key*."""
        self.key = key
        self.kid = key_id(key.public_key())

    def seal(self, reading: Reading, ts: Timestamp) -> SealedRecord:
        if has_float(reading.body):
            check_no_float(dict(reading.body), "body")  # raises, naming where
        seq = self.last_seq + 1
        priority = reading.priority
        rec: dict[str, JSON] = {
            "v": FORMAT_VERSION,
            "gw": self.gateway_id,
            "seq": seq,
            "prev": b64u(self.last_digest),
            "boot": self.boot,
            "t": ts.utc_ms,
            "tq": ts.quality,
            "mono": ts.mono_ms,
            "src": reading.source.to_json(),
            "kind": reading.kind,
            "prio": priority.label,
            "body": dict(reading.body),
            "kid": self.kid,
        }
        # Encode once, then splice "sig" in at its sorted place: between "seq" and the
        # fields after it (src, t, tq, v), whose encoding is the tail of the whole.
        # canonical() of the signed dict gives the same bytes (tested).
        unsigned = _DUMPS(rec)
        tail = _DUMPS({k: rec[k] for k in _AFTER_SIG})  # '{"src":…,"v":1}'
        head = unsigned[: len(unsigned) - len(tail) + 1]  # '{"body":…,"seq":N,'
        sig = b64u(self.key.sign(unsigned.encode("utf-8")))
        data = (head + '"sig":"' + sig + '",' + tail[1:]).encode("utf-8")
        digest = hashlib.sha256(data).digest()
        self.last_seq = seq
        self.last_digest = digest
        return SealedRecord(seq, priority, reading.kind, data, digest)


class Sealer:
    """The committed chain state: last seq, its digest, the signing key, the boot count."""

    def __init__(
        self,
        gateway_id: str,
        signing_key: Ed25519PrivateKey,
        *,
        last_seq: int,
        last_digest: bytes,
        boot: int,
    ) -> None:
        self.gateway_id = gateway_id
        self._key = signing_key
        self.kid = key_id(signing_key.public_key())
        self.last_seq = last_seq
        self.last_digest = last_digest
        self.boot = boot

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return self._key

    def draft(self) -> Draft:
        """A draft to seal the next group on."""
        return Draft(self.gateway_id, self._key, self.kid, boot=self.boot,
                     last_seq=self.last_seq, last_digest=self.last_digest)

    def advance(self, draft: Draft) -> None:
        """The draft's records are committed: continue the chain after them."""
        if draft.base_seq != self.last_seq:
            raise RuntimeError(f"draft sealed after seq {draft.base_seq}, but the chain is at "
                               f"{self.last_seq}: two drafts were interleaved")
        self.last_seq, self.last_digest = draft.last_seq, draft.last_digest
        self._key, self.kid = draft.key, draft.kid

    def seal(self, reading: Reading, ts: Timestamp) -> SealedRecord:
        """Seal one record and move on at once (tests, tools; the writer uses drafts)."""
        draft = self.draft()
        record = draft.seal(reading, ts)
        self.advance(draft)
        return record
