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

import binascii

from core.kinds import Priority
from core.record import (
    FORMAT_VERSION,
    Reading,
    SealedRecord,
    Source,
    Timestamp,
    canonical_body,
)
from core.suites import Signer, hash_function, key_id

#: Strings of the record's fields (kind, prio, tq) and sources, as canonical bytes, by
#: value: encoded once, not once per record. Bounded: past the bound a value is encoded
#: each time (the kind table holds ~80 kinds; a gateway has a few devices).
_CACHE_LIMIT = 1024
_texts: dict[str, bytes] = {}
_sources: dict[Source, bytes] = {}
_kinds: dict[str, tuple[Priority, bytes, bytes]] = {}
#: The constant fields of a key's records, by (alg, public key, gateway, boot).
_HEADERS_LIMIT = 16
_headers: dict[tuple[str, bytes, str, int], tuple[str, bytes, bytes]] = {}
#: base64 to base64url (RFC 4648 section 5)
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64u(data: bytes) -> bytes:
    """:func:`core.record.b64u` as ASCII bytes."""
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_URLSAFE)


def _text(value: str) -> bytes:
    """A string's canonical bytes (its JSON string, quotes included)."""
    out = _texts.get(value)
    if out is None:
        out = canonical_body(value)
        if len(_texts) < _CACHE_LIMIT:
            _texts[value] = out
    return out


def _source(source: Source) -> bytes:
    out = _sources.get(source)
    if out is None:
        out = canonical_body(source.to_json(), "src")
        if len(_sources) < _CACHE_LIMIT:
            _sources[source] = out
    return out


def _kind(reading: Reading) -> tuple[Priority, bytes, bytes]:
    """The reading's priority, and its kind and priority label as canonical bytes."""
    out = _kinds.get(reading.kind)
    if out is None:
        priority = reading.priority  # UnknownKindError for a kind not in the table
        out = (priority, _text(reading.kind), _text(priority.label))
        if len(_kinds) < _CACHE_LIMIT:
            _kinds[reading.kind] = out
    return out


class NoSessionKeyError(RuntimeError):
    """A record to seal before any key.session: the pipeline starts a session first."""


class Draft:
    """Seals records after the sealer's last committed one, without moving the sealer."""

    def __init__(self, gateway_id: str, key: Signer | None, *, boot: int,
                 last_seq: int, last_digest: bytes) -> None:
        if type(boot) is not int or type(last_seq) is not int:
            raise TypeError("boot and seq are integers")
        self.gateway_id = gateway_id
        self.boot = boot
        self.key: Signer | None = None
        self.kid = ""
        self.alg = ""
        if key is not None:
            self.use_key(key)
        self.base_seq = last_seq
        self.last_seq = last_seq
        self.last_digest = last_digest
        # the last reading's source and its canonical bytes (by identity: no hash)
        self._last_source: Source | None = None
        self._last_src = b""

    def use_key(self, key: Signer) -> None:
        """Sign from the next record on with *key* (a session key: the chain's algorithm
        does not change within a store)."""
        self.key = key
        self.alg = key.alg
        self._hash = hash_function(key.alg)
        # The fields that do not change within a draft, as canonical bytes, in their
        # sorted places: alg < body < boot < gw < kid < kind (once per key and boot: a
        # draft is taken for every group, and by Sealer.seal for every record).
        ident = (key.alg, key.public_raw, self.gateway_id, self.boot)
        known = _headers.get(ident)
        if known is None:
            kid = key_id(key.alg, key.public_raw)
            known = (kid, b'{"alg":' + _text(key.alg) + b',"body":',
                     b',"boot":%d,"gw":%b,"kid":%b,"kind":'
                     % (self.boot, _text(self.gateway_id), _text(kid)))
            if len(_headers) >= _HEADERS_LIMIT:
                _headers.clear()
            _headers[ident] = known
        self.kid, self._open, self._middle = known

    def seal(self, reading: Reading, ts: Timestamp) -> SealedRecord:
        key = self.key
        if key is None:
            raise NoSessionKeyError("no session key yet: a key.session record comes first")
        if type(ts.utc_ms) is not int or type(ts.mono_ms) is not int:
            raise TypeError(f"a timestamp of integers, not {ts!r}")  # %d would truncate
        body = reading.body
        # the body is the one part encoded for each record (refusing a float: TypeError)
        encoded_body = canonical_body(body if type(body) is dict else dict(body))
        priority, kind, prio = _kind(reading)
        source = reading.source
        if source is not self._last_source:  # a driver's readings share one Source
            self._last_source, self._last_src = source, _source(source)
        seq = self.last_seq + 1
        # The canonical bytes (core.record.canonical of the record as a dict: the same,
        # tests/test_canonical.py), written in the fields' sorted order: alg body boot gw
        # kid kind mono prev prio seq [sig] src t tq v. "sig" is spliced in between "seq"
        # and "src": what it signs is the same bytes without it.
        head = b"%b%b%b%b,\"mono\":%d,\"prev\":\"%b\",\"prio\":%b,\"seq\":%d," % (
            self._open, encoded_body, self._middle, kind, ts.mono_ms,
            _b64u(self.last_digest), prio, seq)
        tail = b'"src":%b,"t":%d,"tq":%b,"v":%d}' % (
            self._last_src, ts.utc_ms, _text(ts.quality), FORMAT_VERSION)
        sig = _b64u(key.sign(head + tail))
        data = b'%b"sig":"%b",%b' % (head, sig, tail)
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
