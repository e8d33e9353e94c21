"""Platform-side verification of what gateways send (sans-IO).

For each gateway: every record's signature on its own, exact de-duplication by
(gateway id, seq), and the hash chain: record ``n``'s ``prev`` must equal the
SHA-256 of record ``n-1``. Records arrive out of seq order (alarms first), so a
link is checked whenever both ends have arrived, and seqs still missing are
reported as gaps unless a signed ``gap`` record accounts for them.

It also counts, per gateway, the ``uplink.takeover`` alarms: a gateway saying
that another MQTT client took its client id (docs/broker.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from central.record import RecordError, VerifiedRecord, announced_key, verify_record
from core.record import JSON

log = logging.getLogger(__name__)
#: Records signed by a key not yet announced, held until a key.rotate names it.
MAX_HELD = 100_000
#: The kind of a gateway's report that another client took its MQTT client id.
TAKEOVER_KIND = "uplink.takeover"


@dataclass
class VerifierStats:
    messages: int = 0
    received: int = 0  # distinct records, after de-duplication
    verified: int = 0
    bad_signature: int = 0
    malformed: int = 0
    unknown_key: int = 0
    duplicates: int = 0
    chain_breaks: int = 0  # prev does not match the record before it
    held: int = 0  # waiting for the announcement of their key

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _GatewayChain:
    digests: dict[int, bytes] = field(default_factory=dict)
    prevs: dict[int, bytes] = field(default_factory=dict)
    explained: set[int] = field(default_factory=set)  # seqs a signed gap record accounts for
    by_kind: Counter[str] = field(default_factory=Counter)


class Verifier:
    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey],
        *,
        on_record: Callable[[VerifiedRecord], None] | None = None,
    ) -> None:
        self.keys = dict(keys)
        self.stats = VerifierStats()
        self._chains: dict[str, _GatewayChain] = {}
        self._on_record = on_record
        self._held: list[bytes] = []

    def _trust(self, rec: VerifiedRecord) -> None:
        key = announced_key(rec.record)
        if key is None:
            self.stats.malformed += 1
            return
        self.keys[str(rec.record["body"]["new_kid"])] = key
        held, self._held = self._held, []
        self.stats.held -= len(held)
        for data in held:
            self.ingest_record(data)

    def ingest(self, payload: bytes) -> list[VerifiedRecord]:
        """One MQTT message: records separated by newlines."""
        self.stats.messages += 1
        out: list[VerifiedRecord] = []
        for line in payload.split(b"\n"):
            if line:
                rec = self.ingest_record(line)
                if rec is not None:
                    out.append(rec)
        return out

    def ingest_record(self, data: bytes) -> VerifiedRecord | None:
        try:
            rec = verify_record(data, self.keys)
        except RecordError as exc:
            if exc.reason == "unknown_key" and len(self._held) < MAX_HELD:
                # perhaps signed by a new key whose announcement is still on its way
                self._held.append(data)
                self.stats.held += 1
                return None
            if exc.reason == "bad_signature":
                self.stats.bad_signature += 1
            elif exc.reason == "unknown_key":
                self.stats.unknown_key += 1
            else:
                self.stats.malformed += 1
            log.warning("record rejected: %s", exc)
            return None
        chain = self._chains.setdefault(rec.gateway_id, _GatewayChain())
        if rec.seq in chain.digests:
            self.stats.duplicates += 1
            return None
        self.stats.received += 1
        self.stats.verified += 1
        chain.digests[rec.seq] = rec.digest
        chain.prevs[rec.seq] = rec.prev
        chain.by_kind[rec.kind] += 1
        before = chain.digests.get(rec.seq - 1)
        if before is not None and before != rec.prev:
            self.stats.chain_breaks += 1
        after = chain.prevs.get(rec.seq + 1)
        if after is not None and after != rec.digest:
            self.stats.chain_breaks += 1
        if rec.kind == "key.rotate":
            self._trust(rec)
        if rec.kind == "gap":
            for lo, hi in _ranges(rec.record.get("body")):
                chain.explained.update(range(lo, hi + 1))
        if self._on_record is not None:
            self._on_record(rec)
        return rec

    def gaps(self, gateway_id: str, first_seq: int = 1) -> list[tuple[int, int]]:
        """Missing seq ranges from *first_seq* to the highest seen, not covered by gap records."""
        chain = self._chains.get(gateway_id)
        if chain is None or not chain.digests:
            return []
        missing: list[tuple[int, int]] = []
        start: int | None = None
        for seq in range(first_seq, max(chain.digests) + 1):
            absent = seq not in chain.digests and seq not in chain.explained
            if absent and start is None:
                start = seq
            elif not absent and start is not None:
                missing.append((start, seq - 1))
                start = None
        return missing

    def kinds(self, gateway_id: str) -> dict[str, int]:
        return dict(self._chains.get(gateway_id, _GatewayChain()).by_kind)

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
