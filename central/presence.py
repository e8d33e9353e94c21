"""What the platform proves of a tag's presence, from a gateway's stored, verified records.

A gateway seals a tag's presence as ``tag.interval`` records (docs/records.md): the tag's
rolling counter from ``first_counter`` to ``last_counter`` (inclusive) and how many of
those beacons it accepted. Read in the chain's order (seq, which the signatures and the
hash chain fix), a tag's intervals prove continuous presence wherever one interval's
``first_counter`` is the previous one's ``last_counter + 1``: they are merged into
*spans*. Beacons of a range that were not heard (``last - first + 1 - beacons``) are radio
loss: counted, not a hole.

Where the counter jumps (a *hole*), a record sealed between the two intervals must say
why; it is looked for among the records with a seq between theirs, of the same tag:

* ``tag.absent`` (the tag was away): its ``last_counter`` must be the previous interval's
  ``last_counter`` (the gateway closes the interval before the transition record); a
  higher one means beacons accepted and recorded in no interval: unexplained;
* ``tag.spoof`` (a rejected beacon; the gateway closes the interval at it);
* ``presence.unknown`` covering the hole's counters (the gateway says it cannot account
  for them: explained, and visible as such);
* an authorisation boundary (``authorisation.*``: presence is not recorded outside the
  authorised period);
* a pairing boundary (``local.action`` ``tag.paired``/``tag.unpaired``/``tag.replaced``,
  ``command.applied`` ``pair-tag``/``unpair-tag`` naming the tag);
* a restart: the two intervals were sealed in different boots (the record's ``boot``):
  the gateway was not listening. Explained, and still a stretch with no proof of presence.

Any other hole is **unexplained**: an alarm-worthy finding (``ingest report`` counts them).
When seqs between the two intervals are not (yet) at the platform, the hole stays
unexplained and names them: the explanation may be among them.

Intervals that contradict each other are **flagged, never refused**: they are signed,
verified records, stored as evidence; hiding them would hide what the gateway said. A
counter that does not move forward from one interval to the next (an overlap, or a
regression) is an ``overlap`` anomaly: the gateway refuses a beacon whose counter is not
above the last accepted one (drivers' replay rule), so two intervals of one tag never
share a counter unless the gateway is faulty or compromised. The counter is 32-bit and
does not wrap in service: at one beacon every 2 s, 2^32 beacons take ~272 years, and a
wrapped counter would be refused by the gateway as a replay; so no modular arithmetic is
done here, and a counter going back is an anomaly, not a wrap. An interval whose own
fields are impossible (``first > last``, more beacons than counters, a counter beyond 32
bits) is a ``malformed`` anomaly and takes no part in the spans.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from central.db import Database, Param, Transaction
from core.record import JSON

INTERVAL_KIND = "tag.interval"
UNKNOWN_KIND = "presence.unknown"
#: The tag's rolling counter is a u32 (docs/serial-protocol.md, BEACON).
COUNTER_MAX = 2**32 - 1
#: The kinds whose records may explain a hole (with ``authorisation.*``).
EXPLAINING_KINDS = ("tag.absent", "tag.spoof", UNKNOWN_KIND, "local.action",
                    "command.applied")
_PAIRING_ACTIONS = frozenset({"tag.paired", "tag.unpaired", "tag.replaced"})
_PAIRING_COMMANDS = frozenset({"pair-tag", "unpair-tag"})
_INTERVAL_FIELDS = ("first_counter", "last_counter", "beacons", "first_mono_ms",
                    "last_mono_ms")


@dataclass(frozen=True, slots=True)
class Interval:
    """One ``tag.interval`` record, with the record fields the proof uses."""

    seq: int
    t: int  # the record's UTC ms (sealed when the interval closed)
    mono: int  # the record's monotonic ms
    boot: int
    tag: str
    first_counter: int
    last_counter: int
    beacons: int
    first_mono_ms: int
    last_mono_ms: int
    closed: str

    @property
    def counters(self) -> int:
        return self.last_counter - self.first_counter + 1

    @property
    def missed(self) -> int:
        """Beacons of the range the receiver did not hear (radio loss)."""
        return self.counters - self.beacons

    def utc_of(self, mono_ms: int) -> int:
        """The UTC ms of a monotonic instant of this boot, from the record's (t, mono)."""
        return self.t - (self.mono - mono_ms)


@dataclass(frozen=True, slots=True)
class Explainer:
    """A record that may explain a hole of its tag's counter."""

    seq: int
    kind: str
    tag: str
    reason: str  # absent, spoof, unknown, authorisation, pairing
    last_counter: int | None = None  # tag.absent
    counters: tuple[int, int] | None = None  # presence.unknown: from, to


@dataclass
class Span:
    """Intervals whose counters follow each other without a hole."""

    first: Interval
    last: Interval
    intervals: int = 1
    beacons: int = 0

    def to_json(self) -> dict[str, JSON]:
        counters = self.last.last_counter - self.first.first_counter + 1
        return {"first_counter": self.first.first_counter,
                "last_counter": self.last.last_counter, "counters": counters,
                "beacons": self.beacons, "radio_loss": counters - self.beacons,
                "intervals": self.intervals, "first_seq": self.first.seq,
                "last_seq": self.last.seq,
                "from_ms": self.first.utc_of(self.first.first_mono_ms),
                "to_ms": self.last.utc_of(self.last.last_mono_ms)}


@dataclass
class Hole:
    after: Interval
    before: Interval
    explained_by: list[dict[str, JSON]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing_seqs: list[list[int]] = field(default_factory=list)

    @property
    def explained(self) -> bool:
        return bool(self.explained_by)

    def to_json(self) -> dict[str, JSON]:
        return {"after_seq": self.after.seq, "before_seq": self.before.seq,
                "first_counter": self.after.last_counter + 1,
                "last_counter": self.before.first_counter - 1,
                "counters": self.before.first_counter - self.after.last_counter - 1,
                "from_ms": self.after.utc_of(self.after.last_mono_ms),
                "to_ms": self.before.utc_of(self.before.first_mono_ms),
                "status": "explained" if self.explained else "unexplained",
                "explained_by": list(self.explained_by), "notes": list(self.notes),
                "missing_seqs": [list(r) for r in self.missing_seqs]}


@dataclass
class Proof:
    """What the intervals of one tag prove."""

    tag: str
    intervals: list[Interval] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    holes: list[Hole] = field(default_factory=list)
    anomalies: list[dict[str, JSON]] = field(default_factory=list)

    @property
    def unexplained(self) -> int:
        return sum(not h.explained for h in self.holes)

    @property
    def radio_loss_share(self) -> float:
        counters = sum(i.counters for i in self.intervals)
        return (counters - sum(i.beacons for i in self.intervals)) / counters if counters \
            else 0.0

    def to_json(self) -> dict[str, JSON]:
        beacons = sum(i.beacons for i in self.intervals)
        counters = sum(i.counters for i in self.intervals)
        return {
            "tag": self.tag, "intervals": len(self.intervals), "beacons": beacons,
            "counters": counters, "radio_loss": counters - beacons,
            "radio_loss_share": round(self.radio_loss_share, 6),
            "spans": [s.to_json() for s in self.spans],
            "holes": [h.to_json() for h in self.holes],
            "holes_explained": len(self.holes) - self.unexplained,
            "holes_unexplained": self.unexplained,
            "anomalies": list(self.anomalies),
        }


# --- parsing (never raises on a body: a bad one is an anomaly) ------------------------


def parse_interval(seq: int, record: dict[str, JSON]) -> Interval | str:
    """The :class:`Interval` of a stored ``tag.interval`` record, or why it is malformed."""
    body = record.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("tag"), str):
        return "no tag in the body"
    values: dict[str, int] = {}
    for name in _INTERVAL_FIELDS:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} is not an integer"
        values[name] = value
    first, last, beacons = values["first_counter"], values["last_counter"], values["beacons"]
    if not 0 <= first <= last <= COUNTER_MAX:
        return f"counters {first}..{last} are not a range of the 32-bit counter"
    if not 1 <= beacons <= last - first + 1:
        return f"{beacons} beacons in {last - first + 1} counters"
    t, mono, boot = record.get("t"), record.get("mono"), record.get("boot")
    if not (isinstance(t, int) and isinstance(mono, int) and isinstance(boot, int)):
        return "the record has no t, mono or boot"
    closed = body.get("closed")
    return Interval(seq, t, mono, boot, str(body["tag"]), first, last, beacons,
                    values["first_mono_ms"], values["last_mono_ms"],
                    closed if isinstance(closed, str) else "")


def parse_explainer(seq: int, kind: str, body: JSON) -> Explainer | None:
    """The :class:`Explainer` a record of *kind* is, or None (another tag's business,
    another action, an unreadable body)."""
    if not isinstance(body, dict):
        return None
    tag = body.get("tag")
    if kind in ("local.action", "command.applied"):
        what = body.get("action") if kind == "local.action" else body.get("kind")
        details = body.get("details")
        if what not in (_PAIRING_ACTIONS if kind == "local.action" else _PAIRING_COMMANDS) \
                or not isinstance(details, dict):
            return None
        tag = details.get("tag")
        reason = "pairing"
    elif kind.startswith("authorisation."):
        reason = "authorisation"
    else:
        named = {"tag.absent": "absent", "tag.spoof": "spoof", UNKNOWN_KIND: "unknown"}.get(kind)
        if named is None:
            return None
        reason = named
    if not isinstance(tag, str):
        return None
    last = body.get("last_counter")
    counters = None
    if kind == UNKNOWN_KIND:
        lo, hi = body.get("from_counter"), body.get("to_counter")
        if isinstance(lo, int) and isinstance(hi, int):
            counters = (lo, hi)
    return Explainer(seq, kind, tag, reason,
                     last if kind == "tag.absent" and isinstance(last, int) else None, counters)


# --- the proof (pure: fed with parsed records) ----------------------------------------


def prove(tag: str, intervals: Iterable[Interval], explainers: Sequence[Explainer],
          stored: Sequence[tuple[int, int]] = ()) -> Proof:
    """The spans, holes and anomalies of *tag*'s *intervals* (any order: sorted by seq
    here). *explainers*: the records that may explain holes (any tag: filtered here);
    *stored*: the seq ranges the platform holds (to name the seqs missing in a hole)."""
    proof = Proof(tag)
    mine = sorted((e for e in explainers if e.tag == tag), key=lambda e: e.seq)
    prev: Interval | None = None  # the interval with the highest counter so far
    span: Span | None = None  # the span *prev* ends, if it ends one
    for iv in sorted((i for i in intervals if i.tag == tag), key=lambda i: i.seq):
        proof.intervals.append(iv)
        if prev is not None and iv.first_counter <= prev.last_counter:
            proof.anomalies.append({
                "seq": iv.seq, "problem": "overlap", "after_seq": prev.seq,
                "detail": f"counters {iv.first_counter}..{iv.last_counter} do not follow "
                          f"seq {prev.seq}'s last counter {prev.last_counter}: the gateway "
                          "accepted a counter that did not move forward"})
            if iv.last_counter <= prev.last_counter:
                continue  # nothing beyond what was covered: no span of its own
        elif prev is not None and iv.first_counter == prev.last_counter + 1 \
                and span is not None and span.last is prev:
            span.last, span.intervals = iv, span.intervals + 1
            span.beacons += iv.beacons
            prev = iv
            continue
        elif prev is not None:
            proof.holes.append(_hole(prev, iv, mine, stored))
        span = Span(iv, iv, beacons=iv.beacons)
        proof.spans.append(span)
        prev = iv
    return proof


def _hole(prev: Interval, nxt: Interval, explainers: Sequence[Explainer],
          stored: Sequence[tuple[int, int]]) -> Hole:
    """The hole between *prev* and *nxt*; *explainers*: the tag's, sorted by seq."""
    hole = Hole(prev, nxt)
    first, last = prev.last_counter + 1, nxt.first_counter - 1
    if prev.boot != nxt.boot:
        hole.explained_by.append({"reason": "restart", "boots": [prev.boot, nxt.boot]})
    lo = bisect.bisect_right(explainers, prev.seq, key=lambda e: e.seq)
    hi = bisect.bisect_left(explainers, nxt.seq, key=lambda e: e.seq)
    for e in explainers[lo:hi]:
        if e.reason == "absent" and e.last_counter is not None \
                and e.last_counter != prev.last_counter:
            hole.notes.append(
                f"tag.absent seq {e.seq} names last counter {e.last_counter}, not "
                f"{prev.last_counter} (the interval before it): " + (
                    f"counters {prev.last_counter + 1}..{e.last_counter} were accepted and "
                    "are in no interval" if e.last_counter > prev.last_counter else
                    "it contradicts the interval"))
            continue
        if e.reason == "unknown" and (e.counters is None or e.counters[0] > first
                                      or e.counters[1] < last):
            hole.notes.append(f"presence.unknown seq {e.seq} covers {e.counters}, not the "
                              f"hole's {first}..{last}")
            continue
        hole.explained_by.append({"seq": e.seq, "kind": e.kind, "reason": e.reason})
    hole.missing_seqs = _missing(prev.seq + 1, nxt.seq - 1, stored)
    return hole


def _missing(lo: int, hi: int, stored: Sequence[tuple[int, int]]) -> list[list[int]]:
    """The seqs of [lo, hi] not in the *stored* ranges (sorted, disjoint)."""
    out: list[list[int]] = []
    nxt = lo
    for a, b in stored:
        if b < nxt or a > hi:
            continue
        if a > nxt:
            out.append([nxt, a - 1])
        nxt = max(nxt, b + 1)
    if nxt <= hi:
        out.append([nxt, hi])
    return out


# --- reading the database -------------------------------------------------------------


@dataclass
class Loaded:
    intervals: list[Interval]
    explainers: list[Explainer]
    stored: list[tuple[int, int]]
    malformed: list[dict[str, JSON]]


def load(db: Database, gw: str, *, from_ms: int | None = None, to_ms: int | None = None,
         tag: str | None = None) -> Loaded:
    """The ``tag.interval`` records of *gw* (sealed in [from_ms, to_ms] if given; of *tag*
    if given), the records between them that may explain holes, and the seq ranges
    stored over their span."""
    intervals: list[Interval] = []
    malformed: list[dict[str, JSON]] = []
    with db.transaction(write=False) as tx:
        sql = "SELECT seq, data FROM records WHERE gw = ? AND kind = ?"
        params: list[Param] = [gw, INTERVAL_KIND]
        if from_ms is not None:
            sql, params = sql + " AND t >= ?", [*params, from_ms]
        if to_ms is not None:
            sql, params = sql + " AND t <= ?", [*params, to_ms]
        for seq, data in tx.all(sql + " ORDER BY seq", params):
            record = _json(bytes(data))
            parsed = parse_interval(int(seq), record) if record is not None else \
                "the stored bytes are not a JSON object"
            if isinstance(parsed, str):
                body = record.get("body") if record is not None else None
                of = body.get("tag") if isinstance(body, dict) else None
                if tag is None or of == tag:
                    malformed.append({"seq": int(seq), "problem": "malformed",
                                      "tag": of if isinstance(of, str) else None,
                                      "detail": parsed})
            elif tag is None or parsed.tag == tag:
                intervals.append(parsed)
        if not intervals:
            return Loaded([], [], [], malformed)
        lo, hi = intervals[0].seq, intervals[-1].seq
        explainers = _explainers(tx, gw, lo, hi)
        rows = tx.all("SELECT seq, LAG(seq, 1, -1) OVER (ORDER BY seq), "
                      "LEAD(seq, 1, -1) OVER (ORDER BY seq) FROM records WHERE gw = ? "
                      "AND seq >= ? AND seq <= ? ORDER BY seq", (gw, lo, hi))
    starts = [int(r[0]) for r in rows if int(r[1]) != int(r[0]) - 1]
    ends = [int(r[0]) for r in rows if int(r[2]) != int(r[0]) + 1]
    return Loaded(intervals, explainers, list(zip(starts, ends, strict=True)), malformed)


def _explainers(tx: Transaction, gw: str, lo: int, hi: int) -> list[Explainer]:
    kinds, params = tx.in_list("kind", list(EXPLAINING_KINDS))
    out: list[Explainer] = []
    for seq, kind, data in tx.all(
            f"SELECT seq, kind, data FROM records WHERE gw = ? AND seq > ? AND seq < ? "  # noqa: S608 (no value in the text)
            f"AND ({kinds} OR kind LIKE ?) ORDER BY seq",
            [gw, lo, hi, *params, "authorisation.%"]):
        record = _json(bytes(data))
        if record is not None and (e := parse_explainer(int(seq), str(kind),
                                                        record.get("body"))) is not None:
            out.append(e)
    return out


def _json(data: bytes) -> dict[str, JSON] | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def presence(db: Database, gw: str, tag: str, *, from_ms: int | None = None,
             to_ms: int | None = None) -> Proof:
    """``ingest presence``: what *gw*'s records prove of *tag* (sealed in the period)."""
    loaded = load(db, gw, from_ms=from_ms, to_ms=to_ms, tag=tag)
    proof = prove(tag, loaded.intervals, loaded.explainers, loaded.stored)
    proof.anomalies = loaded.malformed + proof.anomalies
    return proof


def summary(db: Database, gw: str) -> dict[str, int]:
    """Per gateway (``ingest report``): tags with intervals, intervals, unexplained holes
    and anomalies, over every stored record."""
    loaded = load(db, gw)
    tags = sorted({i.tag for i in loaded.intervals})
    proofs = [prove(t, loaded.intervals, loaded.explainers, loaded.stored) for t in tags]
    return {"tags": len(tags), "intervals": len(loaded.intervals),
            "holes": sum(len(p.holes) for p in proofs),
            "holes_unexplained": sum(p.unexplained for p in proofs),
            "anomalies": len(loaded.malformed) + sum(len(p.anomalies) for p in proofs)}


def _when(ms: int) -> str:
    from central.export import iso  # the one ISO form of the platform's tools

    return iso(ms)


def report_text(gw: str, proof: Proof) -> str:
    """``ingest presence`` without ``--json``: a few lines a person reads."""
    out = proof.to_json()
    lines = [f"{gw} tag {proof.tag}: {out['intervals']} intervals, {out['beacons']} "
             f"beacons over {out['counters']} counters, radio loss {out['radio_loss']} "
             f"({proof.radio_loss_share:.4%})",
             f"continuous spans: {len(proof.spans)}"]
    for s in proof.spans:
        lines.append(f"  counters {s.first.first_counter}..{s.last.last_counter} "
                     f"({s.beacons} beacons, {s.intervals} "
                     f"interval{'s' if s.intervals != 1 else ''}, seqs "
                     f"{s.first.seq}..{s.last.seq}) "
                     f"{_when(s.first.utc_of(s.first.first_mono_ms))} .. "
                     f"{_when(s.last.utc_of(s.last.last_mono_ms))}")
    lines.append(f"holes: {len(proof.holes) - proof.unexplained} explained, "
                 f"{proof.unexplained} {'UNEXPLAINED' if proof.unexplained else 'unexplained'}")
    for h in proof.holes:
        why = ", ".join(str(e.get("kind", e["reason"])) + (f" seq {e['seq']}" if "seq" in e
                                                            else "")
                        for e in h.explained_by) or "nothing explains it"
        first, last = h.after.last_counter + 1, h.before.first_counter - 1
        lines.append(f"  {'explained' if h.explained else 'UNEXPLAINED'}: counters "
                     f"{first}..{last} ({last - first + 1}) between seqs {h.after.seq} and "
                     f"{h.before.seq}, {_when(h.after.utc_of(h.after.last_mono_ms))} .. "
                     f"{_when(h.before.utc_of(h.before.first_mono_ms))}: {why}"
                     + (f"; seqs not at the platform: {h.missing_seqs}"
                        if h.missing_seqs else ""))
        lines += [f"    note: {n}" for n in h.notes]
    lines.append(f"anomalies: {len(proof.anomalies)}")
    lines += [f"  seq {a['seq']} {a['problem']}: {a['detail']}" for a in proof.anomalies]
    return "\n".join(lines)
