"""Sealing: numbering, hash chain and signature of each record (docs/records.md).

Sans-IO. A group of readings is sealed on a :class:`Draft` taken from the
:class:`Sealer`; the sealer moves on to the draft's chain state only once the
group is committed (:meth:`Sealer.advance`). A failed commit simply drops the
draft: nothing is rolled back because nothing moved.

``sig`` is over the canonical bytes (:func:`core.record.canonical`) of the record
without ``sig``, by the session key named in ``kid`` with the algorithm named in ``alg``
(:mod:`core.suites`); ``prev`` is the hash of ``alg`` (SHA-256 or SM3) of the complete
canonical bytes of the record with the previous ``seq``. The first record of every start
is a ``key.session`` (:mod:`core.session`), signed by the session key it certifies.
"""

from __future__ import annotations

import json

from core.record import (
    FORMAT_VERSION,
    JSON,
    Reading,
    SealedRecord,
    Timestamp,
    b64u,
    check_no_float,
    has_float,
)
from core.suites import Signer, hash_function, key_id

#: The record's fields that sort after "sig".
_AFTER_SIG = ("src", "t", "tq", "v")
_DUMPS = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


class NoSessionKeyError(RuntimeError):
    """A record to seal before any key.session: the pipeline starts a session first."""


class Draft:
    """Seals records after the sealer's last committed one, without moving the sealer."""

    def __init__(self, gateway_id: str, key: Signer | None, *, boot: int,
                 last_seq: int, last_digest: bytes) -> None:
        self.gateway_id = gateway_id
        self.key: Signer | None = None
        self.kid = ""
        self.alg = ""
        if key is not None:
            self.use_key(key)
        self.boot = boot
        self.base_seq = last_seq
        self.last_seq = last_seq
        self.last_digest = last_digest

    def use_key(self, key: Signer) -> None:
        """Sign from the next record on with *key* (a session key: the chain's algorithm
        does not change within a store)."""
        self.key = key
        self.alg = key.alg
        self.kid = key_id(key.alg, key.public_raw)
        self._hash = hash_function(key.alg)

    def seal(self, reading: Reading, ts: Timestamp) -> SealedRecord:
        key = self.key
        if key is None:
            raise NoSessionKeyError("no session key yet: a key.session record comes first")
        if has_float(reading.body):
            check_no_float(dict(reading.body), "body")  # raises, naming where
        seq = self.last_seq + 1
        priority = reading.priority
        rec: dict[str, JSON] = {
            "alg": self.alg,
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
        head = unsigned[: len(unsigned) - len(tail) + 1]  # '{"alg":…,"seq":N,'
        sig = b64u(key.sign(unsigned.encode("utf-8")))
        data = (head + '"sig":"' + sig + '",' + tail[1:]).encode("utf-8")
        digest = self._hash(data)
        self.last_seq = seq
        self.last_digest = digest
        return SealedRecord(seq, priority, reading.kind, data, digest)


class Sealer:
    """The committed chain state: last seq, its digest, the signing key, the boot count."""

    def __init__(
        self,
        gateway_id: str,
        signing_key: Signer | None = None,
        *,
        last_seq: int,
        last_digest: bytes,
        boot: int,
    ) -> None:
        self.gateway_id = gateway_id
        self._key = signing_key
        self.kid = key_id(signing_key.alg, signing_key.public_raw) if signing_key else ""
        self.last_seq = last_seq
        self.last_digest = last_digest
        self.boot = boot

    @property
    def signing_key(self) -> Signer | None:
        """The session key records are signed with (None before the first key.session)."""
        return self._key

    def draft(self) -> Draft:
        """A draft to seal the next group on."""
        return Draft(self.gateway_id, self._key, boot=self.boot,
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
