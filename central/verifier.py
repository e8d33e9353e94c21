"""Platform-side verification of what gateways send (sans-IO).

For each registered gateway: every record's signature by a session key its identity
certified (:mod:`core.session`), exact de-duplication by (gateway id, seq), and the hash
chain: record ``n``'s ``prev`` must equal the hash (of ``alg``) of record ``n-1``.
Records arrive out of seq order (alarms first), so a link is checked whenever both ends
have arrived, and seqs still missing are reported as gaps unless a signed ``gap`` record
accounts for them.

A record is bound to its gateway three ways: its ``gw``, the gateway of the MQTT topic it
came on (when :meth:`Verifier.ingest` is given the topic: ``wrong_gateway`` otherwise), and
the gateway its session key was certified for. Records of one delivery class leave a
gateway in seq order; one arriving after a higher seq of its class is counted
``reordered`` (and kept: evidence, not an error).

It also counts, per gateway, the ``uplink.takeover`` alarms: a gateway saying
that another MQTT client took its client id (docs/broker.md).
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from central.record import (
    RecordError,
    Registration,
    VerifiedRecord,
    gateway_of_topic,
    parse_record,
    verify_parsed,
)
from central.rules import (
    HoldError,
    TrustedIdentity,
    check_head,
    check_validity,
    identity_at,
    rotation_certificate,
    session_certificate,
)
from core.deflate import InflateError, inflate_message, is_deflated
from core.head import is_head, parse_head
from core.record import JSON
from core.session import (
    ROTATE_KIND,
    SESSION_KIND,
    SessionCert,
)
from core.suites import Verifier as PublicKey

log = logging.getLogger(__name__)
#: Records waiting for the certificate of their key (a key.session still on its way).
MAX_HELD = 100_000
#: Head statements kept per gateway while their key.session is on its way (one per kid).
MAX_PENDING_HEADS = 16
#: A compressed message inflates to at most this (the ingest's bound on any message).
MAX_INFLATED_BYTES = 1 << 20
#: The kind of a gateway's report that another client took its MQTT client id.
TAKEOVER_KIND = "uplink.takeover"


@dataclass
class VerifierStats:
    messages: int = 0
    received: int = 0  # distinct records, after de-duplication
    verified: int = 0
    bad_signature: int = 0
    malformed: int = 0
    inflate_refused: int = 0  # compressed messages refused (a bomb, no DEFLATE stream)
    non_canonical: int = 0  # bytes that are not the canonical encoding of the record
    unknown_key: int = 0
    unknown_gateway: int = 0  # records of a gateway the platform never registered
    wrong_gateway: int = 0  # a record whose gw is not the gateway of its MQTT topic
    forged_certificate: int = 0  # key.session / key.rotate not signed by the identity
    out_of_validity: int = 0  # signed by a session key outside its boot, seqs or time
    duplicates: int = 0  # the same record again (at-least-once delivery)
    conflicts: int = 0  # another verified record at a (gw, seq) already taken: evidence
    chain_breaks: int = 0  # prev does not match the record before it
    held: int = 0  # waiting for the certificate of their key
    reordered: int = 0  # arrived after a higher seq of its class (verified all the same)
    heads: int = 0  # verified head statements (core/head.py)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Session:
    cert: SessionCert
    key: PublicKey
    key_class: str


@dataclass
class _ClassOrder:
    """The accepted records of one delivery class of one gateway, by arrival."""

    arrivals: list[tuple[int, int]] = field(default_factory=list)  # (arrival, seq), sorted
    max_seq: int = 0
    reordered: set[int] = field(default_factory=set)

    def accept(self, arrival: int, seq: int) -> int:
        """Record (arrival, seq); how many records this shows to have arrived after a
        higher seq of the class (this one, or held ones accepted late that arrived
        after it)."""
        if not self.arrivals or arrival > self.arrivals[-1][0]:  # the usual case
            self.arrivals.append((arrival, seq))
            late = seq < self.max_seq
            self.max_seq = max(self.max_seq, seq)
            if late:
                self.reordered.add(seq)
            return int(late)
        # a held record accepted after records that arrived later than it
        index = bisect.bisect_left(self.arrivals, (arrival, seq))
        found = 0
        if any(s > seq for _a, s in self.arrivals[:index]):
            self.reordered.add(seq)
            found += 1
        for _a, s in self.arrivals[index:]:
            if s < seq and s not in self.reordered:
                self.reordered.add(s)
                found += 1
        self.arrivals.insert(index, (arrival, seq))
        self.max_seq = max(self.max_seq, seq)
        return found


@dataclass
class _GatewayChain:
    identities: list[TrustedIdentity]
    sessions: dict[str, _Session] = field(default_factory=dict)
    session_starts: list[int] = field(default_factory=list)  # from_seq of each, sorted
    digests: dict[int, bytes] = field(default_factory=dict)
    prevs: dict[int, bytes] = field(default_factory=dict)
    explained: set[int] = field(default_factory=set)  # seqs a signed gap record accounts for
    by_kind: Counter[str] = field(default_factory=Counter)
    key_classes: Counter[str] = field(default_factory=Counter)
    order: dict[str, _ClassOrder] = field(default_factory=dict)  # by delivery class
    claimed: int = 0  # the highest committed seq a verified head statement announced
    pending_heads: dict[str, bytes] = field(default_factory=dict)  # by session kid

    def identity(self, kid: str, seq: int) -> TrustedIdentity | None:
        """The identity *kid* if it was this gateway's identity at *seq*."""
        return identity_at(self.identities, kid, seq)


#: The gateway a record must be of when it came on a topic that names no gateway: none is.
_NO_GATEWAY = ""
#: Refusal reasons that have a counter of their own; any other counts as ``malformed``.
_COUNTED = frozenset({"bad_signature", "unknown_key", "unknown_gateway", "wrong_gateway",
                      "forged_certificate", "out_of_validity", "non_canonical"})


class Verifier:
    """Verifies records of registered gateways. A record is trusted only if signed by a
    session key that the gateway's registered identity (or an identity it certified in a
    ``key.rotate``) certified for that gateway, that boot, from that seq on, up to that
    monotonic time, and not superseded by the gateway's next ``key.session``."""

    def __init__(
        self,
        registrations: Mapping[str, Registration],
        *,
        on_record: Callable[[VerifiedRecord], None] | None = None,
    ) -> None:
        self.registrations = dict(registrations)
        self.stats = VerifierStats()
        self._chains: dict[str, _GatewayChain] = {}
        self._on_record = on_record
        self._held: list[tuple[bytes, int]] = []  # (record, arrival)
        self._arrivals = 0

    def register(self, reg: Registration) -> None:
        """Enrol one more gateway (its identity key). A gateway id whose records have
        been seen is never registered again with another identity (:class:`ValueError`):
        a re-provisioned gateway is a new gateway id (docs/records.md, Keys)."""
        known = self.registrations.get(reg.gateway_id)
        if known is not None and known != reg and reg.gateway_id in self._chains:
            raise ValueError(f"gateway {reg.gateway_id!r} has records under identity "
                             f"{known.kid}: a new identity needs a new gateway id")
        self.registrations[reg.gateway_id] = reg

    def _chain(self, gw: str) -> _GatewayChain | None:
        chain = self._chains.get(gw)
        if chain is None:
            reg = self.registrations.get(gw)
            if reg is None:
                return None
            chain = _GatewayChain([TrustedIdentity(0, reg.kid, reg.verifier(), reg.key_class)])
            self._chains[gw] = chain
        return chain

    def ingest(self, payload: bytes, topic: str | None = None) -> list[VerifiedRecord]:
        """One MQTT message: records separated by newlines. With the *topic* it came on,
        every record must be of the gateway the topic names (``wrong_gateway``)."""
        self.stats.messages += 1
        bound = None if topic is None else (gateway_of_topic(topic) or _NO_GATEWAY)
        out: list[VerifiedRecord] = []
        if is_deflated(payload):  # compressed by the gateway (core/deflate.py)
            try:
                payload = inflate_message(payload, MAX_INFLATED_BYTES)
            except InflateError as exc:
                self.stats.inflate_refused += 1
                log.warning("refused a compressed message (%s): %s", exc.reason, exc)
                return out
        for line in payload.split(b"\n"):
            if is_head(line):
                self.ingest_head(line, gateway=bound)
            elif line:
                rec = self.ingest_record(line, gateway=bound)
                if rec is not None:
                    out.append(rec)
        return out

    def ingest_head(self, line: bytes, *, gateway: str | None = None) -> bool:
        """A message's head statement (core/head.py): once verified with a session key
        certified for its gateway and boot, every seq up to its ``committed_seq`` is
        expected, so a tail that never arrives is a gap. True when it was verified."""
        try:
            head = parse_head(line)
        except ValueError as exc:
            self.stats.malformed += 1
            log.warning("head rejected: %s", exc)
            return False
        chain = self._chain(head.gateway_id)
        if chain is None:  # the message's records count as unknown_gateway; not the head
            return False
        if gateway is not None and gateway != head.gateway_id:
            self.stats.wrong_gateway += 1
            return False
        session = chain.sessions.get(head.kid)
        if session is None:  # its key.session is still on its way: keep the latest
            if head.kid not in chain.pending_heads and \
                    len(chain.pending_heads) >= MAX_PENDING_HEADS:
                # unverified, and anyone can send one naming any kid: drop the oldest
                chain.pending_heads.pop(next(iter(chain.pending_heads)))
            chain.pending_heads[head.kid] = line
            return False
        try:
            check_head(head, session.key, session.cert.boot)
        except RecordError as exc:
            self.stats.bad_signature += 1
            log.warning("head rejected: %s", exc)
            return False
        self.stats.heads += 1
        chain.claimed = max(chain.claimed, head.committed_seq)
        return True

    def ingest_record(self, data: bytes, *, gateway: str | None = None) -> VerifiedRecord | None:
        """One record; with *gateway* (the gateway of its topic), it must be of that one."""
        self._arrivals += 1
        return self._ingest(data, gateway, self._arrivals)

    def _ingest(self, data: bytes, gateway: str | None, arrival: int) -> VerifiedRecord | None:
        try:
            rec = self._verify(data, gateway)
        except HoldError:
            if len(self._held) < MAX_HELD:
                self._held.append((data, arrival))
                self.stats.held += 1
            else:
                self.stats.unknown_key += 1
            return None
        except RecordError as exc:
            counter = exc.reason if exc.reason in _COUNTED else "malformed"
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            log.warning("record rejected: %s", exc)
            return None
        return self._accept(rec, arrival)

    def _verify(self, data: bytes, gateway: str | None = None) -> VerifiedRecord:
        rec = parse_record(data)
        gw = str(rec["gw"])
        if gateway is not None and gw != gateway:
            raise RecordError("wrong_gateway", f"a record of gateway {gw!r} on the records "
                              f"topic of {gateway or 'no gateway'!r}")
        chain = self._chain(gw)
        if chain is None:
            raise RecordError("unknown_gateway", f"gateway {gw!r} is not registered")
        seq = int(rec["seq"])
        if "alg" not in rec:  # format 1: signed by the identity key itself
            ident = chain.identity(str(rec["kid"]), seq)
            return verify_parsed(rec, lambda _r: (ident.key, ident.key_class) if ident else None,
                                 data)
        if rec["kind"] == SESSION_KIND:
            return self._verify_session(rec, chain, seq, data)
        session = chain.sessions.get(str(rec["kid"]))
        if session is None:
            raise HoldError
        verified = verify_parsed(rec, lambda _r: (session.key, session.key_class), data)
        cert = session.cert
        later = bisect.bisect_right(chain.session_starts, cert.from_seq)
        check_validity(rec, seq, boot=cert.boot, from_seq=cert.from_seq,
                       until_mono=cert.until_mono,
                       superseded_at=chain.session_starts[later]
                       if later < len(chain.session_starts) else None)
        return verified

    def _verify_session(self, rec: dict[str, JSON], chain: _GatewayChain,
                        seq: int, data: bytes) -> VerifiedRecord:
        cert, ident = session_certificate(rec, seq, chain.identities)
        key = PublicKey(cert.alg, cert.public_raw)
        verified = verify_parsed(rec, lambda _r: (key, ident.key_class), data)
        chain.sessions[cert.kid] = _Session(cert, key, ident.key_class)
        bisect.insort(chain.session_starts, cert.from_seq)
        return verified

    def _trust_rotation(self, rec: VerifiedRecord, chain: _GatewayChain) -> bool:
        try:
            cert = rotation_certificate(rec, chain.identities)
        except RecordError as exc:
            log.warning("%s (the record stands; its key is not trusted)", exc)
            if exc.reason == "malformed":
                self.stats.malformed += 1
            else:
                self.stats.forged_certificate += 1
            return False
        chain.identities.append(TrustedIdentity(cert.from_seq, cert.kid,
                                                PublicKey(cert.alg, cert.public_raw),
                                                cert.key_class))
        chain.identities.sort(key=lambda i: i.from_seq)
        return True

    def _accept(self, rec: VerifiedRecord, arrival: int) -> VerifiedRecord | None:
        chain = self._chains[rec.gateway_id]
        taken = chain.digests.get(rec.seq)
        if taken is not None:
            # the gateway's key signed two histories, or a session key leaked: keep count
            if taken == rec.digest:
                self.stats.duplicates += 1
            else:
                self.stats.conflicts += 1
                log.warning("conflict: a second record for seq %d of %s", rec.seq,
                            rec.gateway_id)
            return None
        self.stats.received += 1
        self.stats.verified += 1
        order = chain.order.setdefault(str(rec.record["prio"]), _ClassOrder())
        self.stats.reordered += order.accept(arrival, rec.seq)
        chain.digests[rec.seq] = rec.digest
        chain.prevs[rec.seq] = rec.prev
        chain.by_kind[rec.kind] += 1
        chain.key_classes[rec.key_class] += 1
        before = chain.digests.get(rec.seq - 1)
        if before is not None and before != rec.prev:
            self.stats.chain_breaks += 1
        after = chain.prevs.get(rec.seq + 1)
        if after is not None and after != rec.digest:
            self.stats.chain_breaks += 1
        if rec.kind == "gap":
            for lo, hi in _ranges(rec.record.get("body")):
                chain.explained.update(range(lo, hi + 1))
        if self._on_record is not None:
            self._on_record(rec)
        trusted = rec.kind == SESSION_KIND or (
            rec.kind == ROTATE_KIND and self._trust_rotation(rec, chain))
        if trusted and self._held:
            held, self._held = self._held, []
            self.stats.held -= len(held)
            for data, arrived in held:
                self._ingest(data, None, arrived)
        if rec.kind == SESSION_KIND:
            waiting = chain.pending_heads.pop(str(rec.record["kid"]), None)
            if waiting is not None:
                self.ingest_head(waiting)
        return rec

    def key_classes(self, gateway_id: str) -> dict[str, int]:
        """Records of *gateway_id* by the class of the identity behind their key."""
        return dict(self._chains[gateway_id].key_classes) if gateway_id in self._chains \
            else {}

    def gaps(self, gateway_id: str, first_seq: int = 1) -> list[tuple[int, int]]:
        """Missing seq ranges from *first_seq* to the highest seen or announced by a verified
        head statement (a dropped tail), not covered by gap records."""
        chain = self._chains.get(gateway_id)
        if chain is None or not (chain.digests or chain.claimed):
            return []
        missing: list[tuple[int, int]] = []
        start: int | None = None
        upper = max(max(chain.digests, default=0), chain.claimed)
        for seq in range(first_seq, upper + 1):
            absent = seq not in chain.digests and seq not in chain.explained
            if absent and start is None:
                start = seq
            elif not absent and start is not None:
                missing.append((start, seq - 1))
                start = None
        if start is not None:  # the tail a head statement announced
            missing.append((start, upper))
        return missing

    def kinds(self, gateway_id: str) -> dict[str, int]:
        chain = self._chains.get(gateway_id)
        return dict(chain.by_kind) if chain else {}

    def takeovers(self) -> dict[str, int]:
        """Per gateway that reported any: its ``uplink.takeover`` records (distinct)."""
        return {gw: chain.by_kind[TAKEOVER_KIND] for gw, chain in self._chains.items()
                if chain.by_kind[TAKEOVER_KIND]}

    def summary(self) -> dict[str, int]:
        out = self.stats.as_dict()
        out["unknown_key"] += len(self._held)
        out["chain_gaps"] = sum(len(self.gaps(gw)) for gw in self._chains) + self.stats.chain_breaks
        takeovers = self.takeovers()
        out["takeovers"] = sum(takeovers.values())  # records, all gateways
        out["gateways_taken_over"] = len(takeovers)
        return out


def _ranges(body: JSON) -> list[tuple[int, int]]:
    if not isinstance(body, dict):
        return []
    out: list[tuple[int, int]] = []
    for item in body.get("evicted", []):
        if isinstance(item, list) and len(item) == 2 and all(isinstance(x, int) for x in item):
            out.append((item[0], item[1]))
    return out
