"""The platform's ingest: what :mod:`central.verifier` checks, with its state in a database.

:class:`Ingest` takes one MQTT message (topic, payload) at a time and stores each verified
record once under (gateway, seq), in one transaction per message. The trust rules are
exactly those of docs/records.md and :class:`central.verifier.Verifier` (the registered
identity, identities certified by ``key.rotate``, session keys certified by
``key.session`` for one gateway, boot, seqs and monotonic time, until the next
``key.session``), but the state lives in the database (:mod:`central.db`), so any number
of consumer processes share it: a record held by one consumer for want of its session
certificate is released by whichever consumer stores that certificate.

Nothing a gateway (or anyone) sends makes :meth:`Ingest.ingest_message` raise: every bad
input is counted and kept in ``quarantine`` with its reason. Only the database failing
raises (:class:`central.db.StorageError`): then nothing of the message was committed and
the consumer does not acknowledge it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from central.db import Database, Param, Row, Transaction
from central.record import (
    RecordError,
    Registration,
    VerifiedRecord,
    covered_record,
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
from core.head import covered_prefix, is_head, parse_head
from core.record import JSON, b64u
from core.session import (
    ROTATE_KIND,
    SESSION_KIND,
)
from core.suites import Verifier as PublicKey
from core.topics import TOPIC_ROOT

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Bounds on what one message and one record may be; beyond, quarantined ``oversized``.
MAX_MESSAGE_BYTES = 1 << 20
MAX_RECORD_BYTES = 64 << 10
#: How much of a quarantined payload is kept (its size and SHA-256 always are).
QUARANTINE_KEEP_BYTES = 64 << 10
#: Records of one gateway waiting for their session certificate; beyond, ``unknown_key``.
MAX_HELD_PER_GATEWAY = 10_000
ALARM_CLASS = "alarm"
#: The share of the records a verified head covers whose own signature is checked too
#: (a random sample): the head's signature signs their bytes already, so a record whose
#: own signature fails was made so by the holder of the session key; the sample finds a
#: gateway that does (quarantined ``bad_signature``), and an export checks every one.
SIG_AUDIT = 1 / 32
TAKEOVER_KIND = "uplink.takeover"
#: The chain's last record (``provision decommission``: docs/records.md).
FINAL_KIND = "gateway.decommissioned"


@dataclass(frozen=True, slots=True)
class Alarm:
    """An alarm-class record as stored. ``latency_ms`` is the platform's store time minus
    the record's ``t`` (the gateway's clock when it sealed the record): it includes the
    gateway clock's error, and a gateway whose clock runs ahead shows less."""

    id: int
    gateway_id: str
    seq: int
    kind: str
    t: int
    stored_at: int

    @property
    def latency_ms(self) -> int:
        return self.stored_at - self.t

    def to_json(self) -> dict[str, JSON]:
        return {"id": self.id, "gw": self.gateway_id, "seq": self.seq, "kind": self.kind,
                "t": self.t, "stored_at": self.stored_at, "latency_ms": self.latency_ms}


@dataclass
class IngestResult:
    """What one message gave."""

    records: int = 0  # lines in the message
    stored: int = 0  # new records stored (released held ones included)
    duplicates: int = 0  # the same bytes again: nothing written
    conflicts: int = 0  # another verified record at a stored (gw, seq): kept aside
    held: int = 0  # waiting for the certificate of their key
    released: int = 0  # held records verified and stored thanks to this message
    chain_breaks: int = 0
    reorders: int = 0
    heads: int = 0  # verified head statements
    quarantined: Counter[str] = field(default_factory=Counter)  # by reason
    alarms: list[Alarm] = field(default_factory=list)

    def as_dict(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {k: v for k, v in self.__dict__.items()
                                if isinstance(v, int)}
        out["quarantined"] = dict(self.quarantined)
        out["alarms"] = [a.to_json() for a in self.alarms]
        return out


#: Seqs one read-ahead query names at most (within SQLite's 999 parameters).
_READ_AHEAD = 900
_RECORD_COLUMNS = ("gw", "seq", "kind", "prio", "digest", "prev", "boot", "t", "kid",
                   "key_class", "received_at", "data")
_Stored = tuple[bytes, bytes, bytes]  # a stored record's data, digest, prev


@dataclass
class _GwState:
    """What one transaction learnt of one gateway's state. The transaction holds the
    gateway's lock, so that state changes only by this transaction: the caches are exact."""

    #: per class, the highest seq stored (None: none), once read, then kept up to date
    top: dict[str, int | None] = field(default_factory=dict)
    #: records stored by this transaction, written together by :meth:`_Batch.flush`
    pending: dict[int, tuple[_Stored, tuple[Param, ...]]] = field(default_factory=dict)
    #: per session kid, the certificate row last found (with the next certificate's seq)
    sessions: dict[str, Row] = field(default_factory=dict)
    #: per session kid, (alg, pubkey, boot) for heads; None: no such session stored
    head_keys: dict[str, Row | None] = field(default_factory=dict)
    #: the gateway's identities, once read (dropped when one is added)
    identities: list[list[TrustedIdentity]] = field(default_factory=list)
    #: stored records read ahead (see :meth:`Ingest._read_ahead`)
    stored: dict[int, _Stored] = field(default_factory=dict)
    #: the seqs whose stored record (or its absence) ``stored`` knows
    known: set[int] = field(default_factory=set)


@dataclass
class _Batch:
    """One transaction's messages: their shared reads and their writes, made together."""

    tx: Transaction
    now: int
    #: each gateway's status (None: not registered), read for all at once
    status: dict[str, str | None] = field(default_factory=dict)
    #: each gateway's final seq (its verified ``gateway.decommissioned``), if any
    final: dict[str, int] = field(default_factory=dict)
    gateways: dict[str, _GwState] = field(default_factory=dict)
    #: per gateway, the highest verified head: (committed_seq, boot, kid)
    heads: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    #: rows of the reorders table
    reorders: list[tuple[Param, ...]] = field(default_factory=list)

    def state(self, gw: str) -> _GwState:
        if gw not in self.gateways:
            self.gateways[gw] = _GwState()
        return self.gateways[gw]

    def flush(self) -> None:
        """Write what the messages found: records, heads, reorders."""
        rows = [params for st in self.gateways.values() for _, params in st.pending.values()]
        if rows:
            self.tx.insert_rows("records", _RECORD_COLUMNS, rows)
        for st in self.gateways.values():
            st.pending.clear()
        if self.reorders:
            self.tx.execute_many("INSERT INTO reorders (gw, seq, prio, after_seq, found_at) "
                                 "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", self.reorders)
            self.reorders.clear()
        if self.heads:
            self.tx.execute_many(
                "INSERT INTO heads (gw, committed_seq, boot, kid, received_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (gw) DO UPDATE SET "
                "committed_seq = excluded.committed_seq, boot = excluded.boot, "
                "kid = excluded.kid, received_at = excluded.received_at "
                "WHERE excluded.committed_seq > heads.committed_seq",
                [(gw, seq, boot, kid, self.now) for gw, (seq, boot, kid) in self.heads.items()])
            self.heads.clear()


@dataclass
class _Msg:
    """One message being ingested: its batch, result, gateway and topic; the gateway's
    state (shared by the batch's messages of that gateway)."""

    batch: _Batch
    result: IngestResult
    gw: str | None
    topic: str
    #: the session kid whose records the message's verified head covers (set once)
    covered: list[str] = field(default_factory=list)
    #: the message's lines and the records parsed of them (by :meth:`Ingest._prepare`)
    lines: list[bytes] = field(default_factory=list)
    parsed: list[tuple[bytes, dict[str, JSON] | None]] = field(default_factory=list)
    #: the index of the last line not yet looked at as a head
    last: int = -1

    @property
    def tx(self) -> Transaction:
        return self.batch.tx

    @property
    def now(self) -> int:
        return self.batch.now

    @property
    def status(self) -> dict[str, str | None]:
        return self.batch.status

    @property
    def st(self) -> _GwState:
        return self.batch.state(self.gw or "")

    @property
    def top(self) -> dict[str, int | None]:
        return self.st.top

    @property
    def pending(self) -> dict[int, tuple[_Stored, tuple[Param, ...]]]:
        return self.st.pending

    @property
    def sessions(self) -> dict[str, Row]:
        return self.st.sessions

    @property
    def identities(self) -> list[list[TrustedIdentity]]:
        return self.st.identities

    @property
    def stored(self) -> dict[int, _Stored]:
        return self.st.stored

    @property
    def known(self) -> set[int]:
        return self.st.known


@functools.lru_cache(maxsize=4096)
def _public_key(alg: str, raw: bytes) -> PublicKey:
    return PublicKey(alg, raw)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class EnrolError(ValueError):
    """An enrolment the registry refuses (another key for an enrolled id, a
    decommissioned id); the message says what to do."""


class Ingest:
    """Verifies and stores messages of registered gateways in *db*."""

    def __init__(self, db: Database, *, now_ms: Callable[[], int] = _now_ms,
                 on_alarm: Callable[[Alarm], None] | None = None,
                 sig_audit: float = SIG_AUDIT) -> None:
        self.db = db
        self._sig_audit = sig_audit
        self._now_ms = now_ms
        self._on_alarm = on_alarm
        #: this instance's totals since it started (duplicates are counted only here)
        self.totals: Counter[str] = Counter()

    # --- the registry -------------------------------------------------------------

    def enrol(self, reg: Registration, *, tls_fingerprint: str | None = None) -> bool:
        """Register *reg* (its identity key at from_seq 0); True if new. Enrolling the
        same key again is a no-op; another key for an enrolled id is refused."""
        registration = json.dumps({
            "gateway_id": reg.gateway_id, "alg": reg.alg, "class": reg.key_class,
            "kid": reg.kid, "suite": reg.suite, "format": 2,
            "key": b64u(reg.public_raw)}, sort_keys=True)
        with self.db.transaction() as tx:
            tx.lock_gateway(reg.gateway_id)
            row = tx.one("SELECT status, registration FROM gateways WHERE gw = ?",
                         (reg.gateway_id,))
            if row is not None:
                if row[0] != "active":  # decommissioned, or revoked (central/ca.py)
                    raise EnrolError(f"gateway {reg.gateway_id} was {row[0]}: a "
                                     "gateway put back in service needs a new gateway id")
                if json.loads(row[1])["kid"] != reg.kid:
                    raise EnrolError(f"gateway {reg.gateway_id} is enrolled with another "
                                     "identity key: a new key comes by a signed key.rotate "
                                     "record, or decommission the gateway first")
                if tls_fingerprint:
                    tx.execute("UPDATE gateways SET tls_fingerprint = ? WHERE gw = ?",
                               (tls_fingerprint, reg.gateway_id))
                return False
            tx.execute("INSERT INTO gateways (gw, status, registration, tls_fingerprint, "
                       "enrolled_at) VALUES (?, 'active', ?, ?, ?)",
                       (reg.gateway_id, registration, tls_fingerprint, self._now_ms()))
            tx.execute("INSERT INTO identities (gw, from_seq, kid, alg, pubkey, key_class) "
                       "VALUES (?, 0, ?, ?, ?, ?)",
                       (reg.gateway_id, reg.kid, reg.alg, reg.public_raw, reg.key_class))
            return True

    def decommission(self, gateway_id: str) -> bool:
        """Refuse *gateway_id*'s records from now on; False if it is not enrolled."""
        with self.db.transaction() as tx:
            tx.lock_gateway(gateway_id)
            tx.execute("UPDATE gateways SET status = 'decommissioned', decommissioned_at = ? "
                       "WHERE gw = ? AND status = 'active'", (self._now_ms(), gateway_id))
            return tx.one("SELECT 1 FROM gateways WHERE gw = ?", (gateway_id,)) is not None

    # --- ingest -------------------------------------------------------------------

    def ingest_message(self, topic: str, payload: bytes) -> IngestResult:
        """One MQTT message: records separated by newlines, all committed together."""
        return self.ingest_messages([(topic, payload)])[0]

    def ingest_messages(self, messages: Sequence[tuple[str, bytes]]) -> list[IngestResult]:
        """Several MQTT messages (topic, payload), committed together, in their order: the
        same outcome as one :meth:`ingest_message` each, one commit (and one disk flush)
        for all. A consumer with a backlog takes what has arrived
        (:data:`central.consumer.MAX_BATCH_MESSAGES`).

        A gateway's messages are ingested under its lock. The locks that are free are
        taken at once and their messages committed; the messages of gateways another
        consumer is ingesting (its batch holds their locks) follow in a second
        transaction that waits for those locks, taken in one order every consumer
        follows, so two batches never wait on each other in a cycle — and a consumer
        never waits for another's batch while it has work it can do."""
        now = self._now_ms()
        results = [IngestResult() for _ in messages]
        gateways = [gateway_of_topic(topic) for topic, _ in messages]
        todo = list(range(len(messages)))
        wait = False
        while todo:
            with self.db.transaction() as tx:
                wanted = {gw for i in todo if (gw := gateways[i]) is not None}
                if wait:
                    tx.lock_gateways(wanted)
                    busy: set[str] = set()
                else:
                    busy = tx.try_lock_gateways(wanted)
                now_ = [i for i in todo if gateways[i] not in busy]
                self._ingest_in(tx, now, [(messages[i], gateways[i], results[i])
                                          for i in now_])
            todo = [i for i in todo if gateways[i] in busy]
            wait = True
        for result in results:
            self._count(result)
            for alarm in result.alarms if self._on_alarm is not None else []:
                try:
                    self._on_alarm(alarm)  # type: ignore[misc]
                except Exception:  # the callback's failure is not the record's
                    log.exception("the alarm callback failed on %s seq %d",
                                  alarm.gateway_id, alarm.seq)
        return results

    def _ingest_in(self, tx: Transaction, now: int,
                   items: list[tuple[tuple[str, bytes], str | None, IngestResult]]) -> None:
        """Ingest *items* (message, its gateway, its result) in *tx*, which holds the
        locks of their gateways."""
        batch = _Batch(tx, now)
        self._read_status(batch, {gw for _, gw, _ in items if gw is not None})
        msgs: list[_Msg] = []
        for (topic, received), gw, result in items:
            msg = _Msg(batch, result, gw, topic)
            payload = received
            if gw is None:
                self._quarantine(msg, "bad_topic",
                                 f"not a records topic ({TOPIC_ROOT}/<gw>/records)", payload)
            elif len(payload) > MAX_MESSAGE_BYTES:
                self._quarantine(msg, "oversized", f"message of {len(payload)} bytes "
                                 f"(at most {MAX_MESSAGE_BYTES})", payload)
            else:
                if is_deflated(payload):  # compressed by the gateway (core/deflate.py)
                    try:
                        payload = inflate_message(payload, MAX_MESSAGE_BYTES)
                    except InflateError as exc:  # a bomb, or no DEFLATE stream
                        self._quarantine(msg, exc.reason, str(exc), payload)
                        continue
                self._prepare(msg, gw, payload)
                msgs.append(msg)
        self._read_sessions(batch, msgs)
        self._read_ahead_all(batch, msgs)
        self._read_tops(batch, msgs)
        for msg in msgs:
            self._finish(msg)
        batch.flush()
        alarms = [alarm for _, _, result in items for alarm in result.alarms]
        if alarms:
            tx.lock_alarms()
            ids = self._number(tx, alarms, now)
            for _, _, result in items:
                result.alarms = [Alarm(ids.get((a.gateway_id, a.seq), 0), a.gateway_id,
                                       a.seq, a.kind, a.t, now) for a in result.alarms]

    @staticmethod
    def _number(tx: Transaction, alarms: list[Alarm], now: int) -> dict[tuple[str, int], int]:
        """Store *alarms* in the alarms table, in their order: their ids (cursors)."""
        ids: dict[tuple[str, int], int] = {}
        for chunk in _chunks([(a.gateway_id, a.seq, a.kind, a.t) for a in alarms],
                             tx.values_max):
            cte, params = tx.values("a", ("gw", "seq", "kind", "t", "n"),
                                    ("text", "bigint", "text", "bigint", "bigint"),
                                    [(*row, n) for n, row in enumerate(chunk)])
            for gw, seq, alarm_id in tx.all(
                    f"WITH {cte} INSERT INTO alarms (gw, seq, kind, t, stored_at) "  # noqa: S608 (placeholders only)
                    "SELECT gw, seq, kind, t, ? FROM a ORDER BY n RETURNING gw, seq, id",
                    [*params, now]):
                ids[(str(gw), int(seq))] = int(alarm_id)
        return ids

    def _count(self, result: IngestResult) -> None:
        self.totals["messages"] += 1
        for name in ("records", "stored", "duplicates", "conflicts", "held", "released",
                     "chain_breaks", "reorders", "heads"):
            self.totals[name] += getattr(result, name)
        self.totals["alarms"] += len(result.alarms)
        for reason, n in result.quarantined.items():
            self.totals[f"quarantined.{reason}"] += n

    @staticmethod
    def _quarantine(msg: _Msg, reason: str, detail: str, payload: bytes) -> None:
        gw, topic, now = msg.gw, msg.topic, msg.now
        log.warning("quarantined (%s) from %s: %s", reason, topic, detail)
        msg.result.quarantined[reason] += 1
        msg.tx.execute("INSERT INTO quarantine (gw, topic, reason, detail, size, sha256, payload, "
                   "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (gw, topic[:1024], reason, detail[:2000], len(payload),
                    hashlib.sha256(payload).digest(), payload[:QUARANTINE_KEEP_BYTES], now))

    def _admit(self, msg: _Msg, gw: str, line: bytes) -> dict[str, JSON] | None:
        """The record's fields if it is one of an active gateway *gw*, on its topic;
        otherwise it is quarantined."""
        if len(line) > MAX_RECORD_BYTES:
            self._quarantine(msg, "oversized", f"record of {len(line)} "
                             f"bytes (at most {MAX_RECORD_BYTES})", line)
            return None
        try:
            rec = parse_record(line)
        except RecordError as exc:
            self._quarantine(msg, exc.reason, str(exc), line)
            return None
        if rec["gw"] != gw:
            self._quarantine(msg, "wrong_topic", f"a record of gateway "
                             f"{rec['gw']!r} on the topic of {gw!r}", line)
            return None
        if gw not in msg.status:
            row = msg.tx.one("SELECT status FROM gateways WHERE gw = ?", (gw,))
            msg.status[gw] = None if row is None else str(row[0])
        status = msg.status[gw]
        if status is None or status != "active":
            # decommissioned, or revoked (its certificate too: central/ca.py)
            reason = "unknown_gateway" if status is None else status
            self._quarantine(msg, reason, f"gateway {gw!r} is "
                             f"{'not registered' if status is None else status}", line)
            return None
        return rec

    @staticmethod
    def _read_status(batch: _Batch, gateways: set[str]) -> None:
        """Every gateway's status at once."""
        batch.status.update(dict.fromkeys(gateways))
        names = sorted(gateways)
        for chunk in _chunks(names, batch.tx.values_max):
            among, params = batch.tx.in_list("gw", chunk)
            for gw, status, final in batch.tx.all(
                    f"SELECT gw, status, final_seq FROM gateways WHERE {among}",  # noqa: S608 (placeholders only)
                    params):
                batch.status[str(gw)] = str(status)
                if final is not None:
                    batch.final[str(gw)] = int(final)

    def _prepare(self, msg: _Msg, gw: str, payload: bytes) -> None:
        """Split one message of *gw* and parse its records (nothing verified yet)."""
        msg.lines = payload.split(b"\n")
        msg.last = len(msg.lines) - 1
        for line in msg.lines:
            if is_head(line) or not line:
                continue
            msg.result.records += 1
            msg.parsed.append((line, self._admit(msg, gw, line)))

    @staticmethod
    def _read_sessions(batch: _Batch, msgs: list[_Msg]) -> None:
        """The session certificates every record and final head of the batch names, at
        once: for each (gateway, kid), the latest row and the key heads are checked with."""
        pairs: set[tuple[str, str]] = set()
        for msg in msgs:
            gw = msg.gw or ""
            pairs.update((gw, str(rec["kid"])) for _, rec in msg.parsed
                         if rec is not None and "alg" in rec)
            if msg.lines and is_head(msg.lines[-1]):
                with contextlib.suppress(ValueError):
                    pairs.add((gw, parse_head(msg.lines[-1]).kid))
        for chunk in _chunks(sorted(pairs), batch.tx.values_max):
            cte, params = batch.tx.values("w", ("gw", "kid"), ("text", "text"), chunk)
            rows = batch.tx.all(
                f"WITH {cte} SELECT s.gw, s.kid, s.from_seq, s.alg, s.pubkey, s.boot, "  # noqa: S608 (placeholders only)
                "s.until_mono, s.key_class, (SELECT n.from_seq FROM sessions n WHERE "
                "n.gw = s.gw AND n.from_seq > s.from_seq ORDER BY n.from_seq LIMIT 1) "
                "FROM sessions s JOIN w ON s.gw = w.gw AND s.kid = w.kid ORDER BY s.from_seq",
                params)
            for gw, kid in chunk:
                batch.state(gw).head_keys[kid] = None
            for row in rows:  # by from_seq: the latest of each kid is kept
                st = batch.state(str(row[0]))
                st.sessions[str(row[1])] = tuple(row[2:])
                st.head_keys[str(row[1])] = (row[3], row[4], row[5])

    def _early_head(self, msg: _Msg) -> None:
        """The head statement ending the message, verified before its records when its
        session key is stored already: if it ``covers`` the message, its one signature
        signs every record of that key in it."""
        last = msg.lines[msg.last] if msg.lines else b""
        if is_head(last) and self._head(msg, msg.gw or "", last, b"\n".join(msg.lines),
                                        early=True):
            msg.last -= 1  # done

    @staticmethod
    def _read_ahead_all(batch: _Batch, msgs: list[_Msg]) -> None:
        """The stored records at, before and after every seq of the batch, at once."""
        want: set[tuple[str, int]] = set()
        for msg in msgs:
            st, gw = msg.st, msg.gw or ""
            want.update((gw, int(rec["seq"]) + d) for _, rec in msg.parsed
                        if rec is not None for d in (-1, 0, 1)
                        if int(rec["seq"]) + d not in st.known)
        for chunk in _chunks(sorted(want), batch.tx.values_max):
            cte, params = batch.tx.values("w", ("gw", "seq"), ("text", "bigint"), chunk)
            for r in batch.tx.all(f"WITH {cte} SELECT r.gw, r.seq, r.data, r.digest, r.prev "  # noqa: S608 (placeholders only)
                                  "FROM records r JOIN w ON r.gw = w.gw AND r.seq = w.seq",
                                  params):
                batch.state(str(r[0])).stored[int(r[1])] = (bytes(r[2]), bytes(r[3]),
                                                             bytes(r[4]))
            for gw, seq in chunk:
                batch.state(gw).known.add(seq)

    @staticmethod
    def _read_tops(batch: _Batch, msgs: list[_Msg]) -> None:
        """The highest stored seq of each class every message's records are of, at once."""
        want = sorted({(msg.gw or "", str(rec["prio"])) for msg in msgs
                       for _, rec in msg.parsed if rec is not None} -
                      {(gw, prio) for gw, st in batch.gateways.items() for prio in st.top})
        for chunk in _chunks(want, batch.tx.values_max):
            cte, params = batch.tx.values("w", ("gw", "prio"), ("text", "text"), chunk)
            for gw, prio, seq in batch.tx.all(
                    f"WITH {cte} SELECT w.gw, w.prio, (SELECT r.seq FROM records r "  # noqa: S608 (placeholders only)
                    "WHERE r.gw = w.gw AND r.prio = w.prio ORDER BY r.seq DESC LIMIT 1) FROM w",
                    params):
                batch.state(str(gw)).top[str(prio)] = None if seq is None else int(seq)

    @staticmethod
    def _read_ahead(msg: _Msg, gw: str, seqs: list[int]) -> None:
        """Read the stored records at, before and after each of *seqs* of *gw*."""
        want = sorted({s + d for s in seqs for d in (-1, 0, 1)} - msg.known)
        for chunk in _chunks(want, _READ_AHEAD):
            among, params = msg.tx.in_list("seq", chunk)
            for r in msg.tx.all(f"SELECT seq, data, digest, prev FROM records WHERE gw = ? "  # noqa: S608 (placeholders only)
                                f"AND {among}", [gw, *params]):
                msg.stored[int(r[0])] = (bytes(r[1]), bytes(r[2]), bytes(r[3]))
            msg.known.update(chunk)

    def _finish(self, msg: _Msg) -> None:
        """The head ending the message first (:meth:`_early_head`), then its records
        verified and stored in order, then its heads not looked at yet (the final one
        when its key came with the message: a ``key.session`` in it)."""
        gw = msg.gw or ""
        self._early_head(msg)  # after the batch's earlier messages: their key.session too
        for line, rec in msg.parsed:
            if rec is not None:
                self._one(msg, gw, line, rec=rec, in_message=True)
        payload = b"\n".join(msg.lines)
        for i, line in enumerate(msg.lines):
            if i <= msg.last and is_head(line):
                self._head(msg, gw, line, payload)

    def _head(self, msg: _Msg, gw: str, line: bytes, payload: bytes, *,
              early: bool = False) -> bool:
        """A message's head statement (core/head.py): verified with a session key certified
        for *gw* and its boot, it raises the gateway's announced committed seq, and if it
        ends *payload* and covers it, the records of its key in the message are signed by
        it. One whose session is not stored yet is left (False; *early*: looked at again
        once the message's records are stored): every message carries a newer one."""
        try:
            head = parse_head(line)
        except ValueError as exc:
            self._quarantine(msg, "malformed", str(exc), line)
            return True
        if head.gateway_id != gw:
            self._quarantine(msg, "wrong_gateway", f"head of {head.gateway_id!r} on the "
                             f"topic of {gw!r}", line)
            return True
        if head.kid in msg.st.head_keys:
            row = msg.st.head_keys[head.kid]
        else:
            row = msg.tx.one("SELECT alg, pubkey, boot FROM sessions WHERE gw = ? AND kid = ? "
                             "LIMIT 1", (gw, head.kid))
        if row is None:
            return False
        try:
            covers = check_head(head, _public_key(str(row[0]), bytes(row[1])), int(row[2]),
                                covered_prefix(payload, line))
        except (RecordError, ValueError) as exc:
            self._quarantine(msg, "bad_signature", str(exc), line)
            return True
        if covers and early:
            msg.covered.append(head.kid)
        msg.result.heads += 1
        known = msg.batch.heads.get(gw)
        if known is None or head.committed_seq > known[0]:
            msg.batch.heads[gw] = (head.committed_seq, head.boot, head.kid)
        return True

    def _one(self, msg: _Msg, gw: str, line: bytes, *, released: bool = False,
             rec: dict[str, JSON] | None = None, in_message: bool = False) -> None:
        """Verify and store one record of *gw* (whose lock the transaction holds): *line*,
        or *rec* that :meth:`_admit` made of it; *in_message*: a line of the message (which
        its head may cover), not a held record of an earlier one."""
        tx, result = msg.tx, msg.result
        if rec is None:
            rec = self._admit(msg, gw, line)
            if rec is None:
                return
        seq = int(rec["seq"])
        final = msg.batch.final.get(gw)
        if final is not None and seq > final:
            self._quarantine(msg, "after_final", f"seq {seq} of {gw} is after its chain's "
                             f"last record (gateway.decommissioned at seq {final})", line)
            return
        near = self._near(msg, gw, seq)
        stored = near.get(seq)
        if stored is not None and stored[0] == line:
            result.duplicates += 1
            return
        try:
            verified = self._verify(msg, rec, line, gw, seq, in_message=in_message)
        except HoldError:
            self._hold(msg, gw, seq, line)
            return
        except RecordError as exc:
            self._quarantine(msg, exc.reason, str(exc), line)
            return
        if stored is not None:
            result.conflicts += 1
            log.error("conflict: %s seq %d stored with another verified record", gw, seq)
            tx.execute("INSERT INTO conflicts (gw, seq, stored_digest, digest, data, "
                       "received_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (gw, seq, stored[1], verified.digest, line, msg.now))
            return
        trusts = self._store(msg, verified, line, near)
        if released:
            result.released += 1
        elif trusts:  # a new key: what waited for it may verify now
            self._release(msg, gw)

    # --- trust (docs/records.md "What the platform checks") -----------------------

    def _near(self, msg: _Msg, gw: str, seq: int) -> dict[int, _Stored]:
        """The records stored at seq - 1, seq and seq + 1 (read ahead, or one query)."""
        if not {seq - 1, seq, seq + 1} <= msg.known:
            self._read_ahead(msg, gw, [seq])
        near = {s: msg.stored[s] for s in (seq - 1, seq, seq + 1) if s in msg.stored}
        for s in (seq - 1, seq, seq + 1):
            if s in msg.pending:
                near[s] = msg.pending[s][0]
        return near

    @staticmethod
    def _identities(msg: _Msg, gw: str) -> list[TrustedIdentity]:
        if not msg.identities:
            msg.identities.append([
                TrustedIdentity(int(r[0]), str(r[1]), _public_key(str(r[2]), bytes(r[3])),
                                str(r[4]))
                for r in msg.tx.all("SELECT from_seq, kid, alg, pubkey, key_class FROM "
                                    "identities WHERE gw = ? ORDER BY from_seq", (gw,))])
        return msg.identities[0]

    def _verify(self, msg: _Msg, rec: dict[str, JSON], data: bytes, gw: str,
                seq: int, *, in_message: bool = False) -> VerifiedRecord:
        tx = msg.tx
        if "alg" not in rec:  # format 1: signed by the identity key itself
            ident = identity_at(self._identities(msg, gw), str(rec["kid"]), seq)
            return verify_parsed(rec, lambda _r: (ident.key, ident.key_class) if ident else None,
                                 data)
        if rec["kind"] == SESSION_KIND:
            return self._verify_session(msg, rec, data, gw, seq)
        kid = str(rec["kid"])
        row = msg.sessions.get(kid)
        # the row found for an earlier seq holds for every seq up to the next certificate
        if row is None or not (int(row[0]) <= seq and (row[6] is None or seq < int(row[6]))):
            row = tx.one("SELECT s.from_seq, s.alg, s.pubkey, s.boot, s.until_mono, "
                         "s.key_class, (SELECT n.from_seq FROM sessions n WHERE n.gw = s.gw "
                         "AND n.from_seq > s.from_seq ORDER BY n.from_seq LIMIT 1) "
                         "FROM sessions s WHERE s.gw = ? AND s.kid = ? AND s.from_seq <= ? "
                         "ORDER BY s.from_seq DESC LIMIT 1", (gw, kid, seq))
            if row is not None:
                msg.sessions[kid] = row
        if row is None:
            later = tx.one("SELECT from_seq FROM sessions WHERE gw = ? AND kid = ? LIMIT 1",
                           (gw, str(rec["kid"])))
            if later is not None:
                raise RecordError("out_of_validity", f"seq {seq} of {gw}: its session key is "
                                  f"certified from seq {later[0]} on")
            raise HoldError
        from_seq, alg, raw, boot, until_mono, key_class, nxt = row
        key = _public_key(str(alg), bytes(raw))
        if in_message and kid in msg.covered and (self._sig_audit <= 0 or
                                   secrets.randbelow(1 << 20) >= self._sig_audit * (1 << 20)):
            verified = covered_record(rec, key, str(key_class), data)
        else:
            verified = verify_parsed(rec, lambda _r: (key, str(key_class)), data)
        check_validity(rec, seq, boot=int(boot), from_seq=int(from_seq),
                       until_mono=int(until_mono),
                       superseded_at=None if nxt is None else int(nxt))
        return verified

    def _verify_session(self, msg: _Msg, rec: dict[str, JSON], data: bytes, gw: str,
                        seq: int) -> VerifiedRecord:
        tx = msg.tx
        cert, ident = session_certificate(rec, seq, self._identities(msg, gw))
        key = _public_key(cert.alg, cert.public_raw)
        verified = verify_parsed(rec, lambda _r: (key, ident.key_class), data)
        if tx.execute("INSERT INTO sessions (gw, from_seq, kid, alg, pubkey, boot, until_mono, "
                      "identity_kid, key_class) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                      "ON CONFLICT DO NOTHING",
                      (gw, seq, cert.kid, cert.alg, cert.public_raw, cert.boot,
                       cert.until_mono, ident.kid, ident.key_class)):
            msg.sessions.clear()  # a new certificate: the rows found may end sooner now
            msg.st.head_keys.pop(cert.kid, None)
        return verified

    def _trust_rotation(self, msg: _Msg, rec: VerifiedRecord, data: bytes) -> bool:
        gw, tx = rec.gateway_id, msg.tx
        try:
            cert = rotation_certificate(rec, self._identities(msg, gw))
        except RecordError as exc:
            self._quarantine(msg, exc.reason, f"{exc} (the record is stored; its key is not "
                             "trusted)", data)
            return False
        tx.execute("INSERT INTO identities (gw, from_seq, kid, alg, pubkey, key_class) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                   (gw, cert.from_seq, cert.kid, cert.alg, cert.public_raw, cert.key_class))
        msg.identities.clear()
        return True

    # --- storing --------------------------------------------------------------------

    def _store(self, msg: _Msg, rec: VerifiedRecord, data: bytes,
               near: dict[int, _Stored]) -> bool:
        """Store *rec* (its neighbours *near*: :meth:`_near` of its seq)."""
        tx, result, now = msg.tx, msg.result, msg.now
        gw, seq, body = rec.gateway_id, rec.seq, rec.record
        prio = str(body["prio"])
        if prio not in msg.top:  # the highest seq of the class: one index probe
            row = tx.one("SELECT seq FROM records WHERE gw = ? AND prio = ? "
                         "ORDER BY seq DESC LIMIT 1", (gw, prio))
            msg.top[prio] = None if row is None else int(row[0])
        higher = msg.top[prio]
        msg.pending[seq] = ((data, rec.digest, rec.prev), (
            gw, seq, rec.kind, prio, rec.digest, rec.prev, int(body["boot"]),
            int(body["t"]), str(body["kid"]), rec.key_class, now, data))
        msg.top[prio] = seq if higher is None else max(higher, seq)
        result.stored += 1
        if higher is not None and higher > seq:
            result.reorders += 1
            msg.batch.reorders.append((gw, seq, prio, higher, now))
        before = near.get(seq - 1)
        if before is not None and before[1] != rec.prev:
            self._break(msg, gw, seq)
        after = near.get(seq + 1)
        if after is not None and after[2] != rec.digest:
            self._break(msg, gw, seq + 1)
        if rec.kind == "gap":
            for lo, hi in _ranges(body.get("body")):
                tx.execute("INSERT INTO gaps_explained (gw, by_seq, first_seq, last_seq) "
                           "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (gw, seq, lo, hi))
        if prio == ALARM_CLASS:
            result.alarms.append(Alarm(0, gw, seq, rec.kind, int(body["t"]), now))
        if rec.kind == FINAL_KIND:  # the records before it may still come, none after
            log.warning("gateway %s decommissioned itself at seq %d: records after it are "
                        "refused", gw, seq)
            msg.batch.final[gw] = seq
            tx.execute("UPDATE gateways SET final_seq = ? WHERE gw = ? AND (final_seq IS NULL "
                       "OR final_seq > ?)", (seq, gw, seq))
        return rec.kind == SESSION_KIND or (
            rec.kind == ROTATE_KIND and self._trust_rotation(msg, rec, data))

    @staticmethod
    def _break(msg: _Msg, gw: str, seq: int) -> None:
        log.error("chain break: %s seq %d does not follow seq %d", gw, seq, seq - 1)
        msg.result.chain_breaks += 1
        now = msg.now
        msg.tx.execute("INSERT INTO chain_breaks (gw, seq, found_at) VALUES (?, ?, ?) "
                   "ON CONFLICT DO NOTHING", (gw, seq, now))

    def _hold(self, msg: _Msg, gw: str, seq: int, line: bytes) -> None:
        tx, result, now = msg.tx, msg.result, msg.now
        sha = hashlib.sha256(line).digest()
        if tx.one("SELECT 1 FROM held WHERE gw = ? AND seq = ? AND sha256 = ?",
                  (gw, seq, sha)) is not None:
            result.duplicates += 1
            return
        count = tx.one("SELECT COUNT(*) FROM held WHERE gw = ?", (gw,))
        if count is not None and int(count[0]) >= MAX_HELD_PER_GATEWAY:
            self._quarantine(msg, "unknown_key", f"seq {seq}: no certificate "
                             f"for its key, and {MAX_HELD_PER_GATEWAY} records of {gw} already "
                             "wait for theirs", line)
            return
        tx.execute("INSERT INTO held (gw, seq, sha256, data, received_at) VALUES (?, ?, ?, ?, ?)",
                   (gw, seq, sha, line, now))
        result.held += 1

    def _release(self, msg: _Msg, gw: str) -> None:
        """Retry the held records of *gw* until none more verifies."""
        tx, result = msg.tx, msg.result
        progress = True
        while progress:
            progress = False
            for seq, sha, data in tx.all("SELECT seq, sha256, data FROM held WHERE gw = ? "
                                         "ORDER BY seq", (gw,)):
                tx.execute("DELETE FROM held WHERE gw = ? AND seq = ? AND sha256 = ?",
                           (gw, seq, bytes(sha)))
                before = result.held
                self._one(msg, gw, bytes(data), released=True)
                if result.held > before:  # still waiting: not new, not counted again
                    result.held -= 1
                else:
                    progress = True

def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _ranges(body: JSON) -> Iterable[tuple[int, int]]:
    if not isinstance(body, dict):
        return []
    out: list[tuple[int, int]] = []
    for item in body.get("evicted", []):
        if isinstance(item, list) and len(item) == 2 and \
                all(isinstance(x, int) and not isinstance(x, bool) for x in item) and \
                0 < item[0] <= item[1]:
            out.append((item[0], item[1]))
    return out


# --- queries -------------------------------------------------------------------------


def _islands(seqs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge sorted (first, last) ranges that touch or overlap."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(seqs):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _minus(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for c_lo, c_hi in cut:
            nxt: list[tuple[int, int]] = []
            for p_lo, p_hi in pieces:
                if c_hi < p_lo or c_lo > p_hi:
                    nxt.append((p_lo, p_hi))
                    continue
                if p_lo < c_lo:
                    nxt.append((p_lo, c_lo - 1))
                if c_hi < p_hi:
                    nxt.append((c_hi + 1, p_hi))
            pieces = nxt
        out.extend(pieces)
    return out


def stored_ranges(db: Database, gw: str) -> list[tuple[int, int]]:
    """The seq ranges of *gw* the platform holds."""
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT seq, LAG(seq, 1, -1) OVER (ORDER BY seq), "
                      "LEAD(seq, 1, -1) OVER (ORDER BY seq) FROM records WHERE gw = ? "
                      "ORDER BY seq", (gw,))
    starts = [int(r[0]) for r in rows if int(r[1]) != int(r[0]) - 1]
    ends = [int(r[0]) for r in rows if int(r[2]) != int(r[0]) + 1]
    return list(zip(starts, ends, strict=True))


def gaps(db: Database, gw: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(explained, unexplained): the seqs of *gw* missing from 1 to the highest stored or
    announced by a verified head statement (a tail that never came), those a signed
    ``gap`` record names, and the others (on their way, or evidence)."""
    held = stored_ranges(db, gw)
    missing: list[tuple[int, int]] = []
    nxt = 1
    for lo, hi in held:
        if lo > nxt:
            missing.append((nxt, lo - 1))
        nxt = hi + 1
    with db.transaction(write=False) as tx:
        head = tx.one("SELECT committed_seq FROM heads WHERE gw = ?", (gw,))
        if head is not None and int(head[0]) >= nxt:
            missing.append((nxt, int(head[0])))
        named = _islands([(int(r[0]), int(r[1])) for r in tx.all(
            "SELECT first_seq, last_seq FROM gaps_explained WHERE gw = ?", (gw,))])
    unexplained = _minus(missing, named)
    explained = _minus(missing, unexplained)
    return explained, unexplained


def alarms(db: Database, since: int = 0, limit: int = 1000) -> list[Alarm]:
    """Alarm-class records stored after the cursor *since* (an :attr:`Alarm.id`), oldest
    first."""
    with db.transaction(write=False) as tx:
        rows = tx.all("SELECT id, gw, seq, kind, t, stored_at FROM alarms WHERE id > ? "
                      "ORDER BY id LIMIT ?", (since, limit))
    return [Alarm(int(r[0]), str(r[1]), int(r[2]), str(r[3]), int(r[4]), int(r[5]))
            for r in rows]


def report(db: Database, gw: str) -> dict[str, JSON]:
    """Everything the platform knows of *gw*'s stream (``python -m central report``)."""
    from central.presence import summary  # it reads the stored records: no cycle at import

    explained, unexplained = gaps(db, gw)
    with db.transaction(write=False) as tx:
        row = tx.one("SELECT status, tls_fingerprint, enrolled_at, decommissioned_at, "
                     "registration, final_seq FROM gateways WHERE gw = ?", (gw,))
        if row is None:
            raise KeyError(gw)
        identities = [{"from_seq": int(r[0]), "kid": r[1], "alg": r[2], "class": r[3]}
                      for r in tx.all("SELECT from_seq, kid, alg, key_class FROM identities "
                                      "WHERE gw = ? ORDER BY from_seq", (gw,))]
        sessions = [{"from_seq": int(r[0]), "kid": r[1], "alg": r[2], "boot": int(r[3]),
                     "until_mono": int(r[4]), "identity": r[5], "class": r[6]}
                    for r in tx.all("SELECT from_seq, kid, alg, boot, until_mono, "
                                    "identity_kid, key_class FROM sessions WHERE gw = ? "
                                    "ORDER BY from_seq", (gw,))]
        conflicts = [{"seq": int(r[0]), "stored_digest": b64u(bytes(r[1])),
                      "digest": b64u(bytes(r[2])), "received_at": int(r[3])}
                     for r in tx.all("SELECT seq, stored_digest, digest, received_at FROM "
                                     "conflicts WHERE gw = ? ORDER BY seq, id", (gw,))]
        quarantined = {str(r[0]): int(r[1]) for r in tx.all(
            "SELECT reason, COUNT(*) FROM quarantine WHERE gw = ? GROUP BY reason "
            "ORDER BY reason", (gw,))}
        reorders = [{"seq": int(r[0]), "prio": r[1], "after_seq": int(r[2])}
                    for r in tx.all("SELECT seq, prio, after_seq FROM reorders WHERE gw = ? "
                                    "ORDER BY seq", (gw,))]
        breaks = [int(r[0]) for r in tx.all("SELECT seq FROM chain_breaks WHERE gw = ? "
                                            "ORDER BY seq", (gw,))]
        counts = tx.one("SELECT COUNT(*), MAX(seq) FROM records WHERE gw = ?", (gw,))
        kinds = {str(r[0]): int(r[1]) for r in tx.all(
            "SELECT kind, COUNT(*) FROM records WHERE gw = ? GROUP BY kind ORDER BY kind",
            (gw,))}
        classes = {str(r[0]): int(r[1]) for r in tx.all(
            "SELECT key_class, COUNT(*) FROM records WHERE gw = ? GROUP BY key_class "
            "ORDER BY key_class", (gw,))}
        held = tx.one("SELECT COUNT(*) FROM held WHERE gw = ?", (gw,))
        head = tx.one("SELECT committed_seq, boot, received_at FROM heads WHERE gw = ?", (gw,))
    presence = summary(db, gw)
    return {
        "head": None if head is None else {"committed_seq": int(head[0]),
                                           "boot": int(head[1]), "received_at": int(head[2])},
        "gw": gw, "status": row[0], "tls_fingerprint": row[1], "enrolled_at": int(row[2]),
        "decommissioned_at": None if row[3] is None else int(row[3]),
        "final_seq": None if row[5] is None else int(row[5]),
        "records": int(counts[0]) if counts else 0,
        "highest_seq": int(counts[1]) if counts and counts[1] is not None else None,
        "stored_ranges": [list(r) for r in stored_ranges(db, gw)],
        "gaps_explained": [list(r) for r in explained],
        "gaps_unexplained": [list(r) for r in unexplained],
        "held_for_key": int(held[0]) if held else 0,
        "identities": identities, "sessions": sessions, "conflicts": conflicts,
        "quarantined": quarantined, "reorders": reorders, "chain_breaks": breaks,
        "kinds": kinds, "key_classes": classes, "takeovers": kinds.get(TAKEOVER_KIND, 0),
        # what the tag.interval records prove (central/presence.py): the counter holes no
        # record explains, and the intervals that contradict each other
        "presence_holes_unexplained": presence["holes_unexplained"],
        "presence_anomalies": presence["anomalies"],
    }
