"""What the platform proves of a tag's presence from its ``tag.interval`` records
(central/presence.py, docs/platform-presence.md): counter ranges merged into continuous
spans, the holes between them explained by a record or not, contradictions flagged; on
SQLite and on PostgreSQL, from records sealed and ingested as a gateway's are."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from central import cli, export, presence
from central.db import Database
from central.ingest import Ingest, report
from central.presence import COUNTER_MAX, Explainer, Interval, prove
from core.kinds import KIND_PRIORITY, Priority
from core.record import JSON, SealedRecord, Timestamp
from core.topics import records_topic
from lab.chains import Chain

T0 = 1_760_000_000_000
TAG, OTHER = "T0000002A", "T0000002B"
BEACON_MS = 2_000


@pytest.fixture(autouse=True)
def _interval_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kinds of the presence-interval contract, with the class it fixes (the gateway
    side adds them to core/kinds.py: the same entries)."""
    monkeypatch.setitem(KIND_PRIORITY, "tag.interval", Priority.POSITION)
    monkeypatch.setitem(KIND_PRIORITY, "presence.unknown", Priority.STATUS)


def ts(mono_ms: int) -> Timestamp:
    return Timestamp(T0 + mono_ms, "ntp", mono_ms)


def mono(counter: int) -> int:
    """The gateway's monotonic ms of the beacon with *counter* (one every 2 s; within a
    session key's validity even for counters near 2^32)."""
    return (counter % 100_000) * BEACON_MS


def interval_body(tag: str, first: int, last: int, beacons: int | None = None,
                  closed: str = "max_age") -> dict[str, JSON]:
    """A ``tag.interval`` body as the contract writes it (a beacon every 2 s)."""
    return {"tag": tag, "first_counter": first, "last_counter": last,
            "beacons": last - first + 1 if beacons is None else beacons,
            "first_mono_ms": mono(first), "last_mono_ms": mono(last),
            "rssi_dbm": {"min": -70, "max": -50, "mean": -60}, "battery_pct": 80,
            "strap_closed": True, "body_contact": True, "dev_events": [first, last],
            "closed": closed}


class Home:
    """One gateway's chain, enrolled at the platform; records sealed then sent."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.chain = Chain()
        self.ingest = Ingest(db)
        assert self.ingest.enrol(self.chain.registration)
        self.records: list[SealedRecord] = [self.chain.start_session(ts(0))]

    @property
    def gw(self) -> str:
        return self.chain.gateway_id

    def interval(self, tag: str, first: int, last: int, beacons: int | None = None,
                 closed: str = "max_age") -> SealedRecord:
        rec = self.chain.seal("tag.interval", interval_body(tag, first, last, beacons, closed),
                              ts(mono(last) + 1))
        self.records.append(rec)
        return rec

    def seal(self, kind: str, body: dict[str, JSON], counter: int) -> SealedRecord:
        rec = self.chain.seal(kind, body, ts(mono(counter) + 2))
        self.records.append(rec)
        return rec

    def send(self, records: list[SealedRecord] | None = None) -> None:
        for rec in self.records if records is None else records:
            result = self.ingest.ingest_message(records_topic(self.gw), rec.data).as_dict()
            assert result["quarantined"] == {}, result

    def proof(self, tag: str = TAG) -> dict[str, JSON]:
        return presence.presence(self.db, self.gw, tag).to_json()


def holes(proof: dict[str, JSON]) -> list[dict[str, JSON]]:
    out = proof["holes"]
    assert isinstance(out, list)
    return out  # type: ignore[return-value]


# --- on both databases --------------------------------------------------------------


def test_consecutive_intervals_are_one_span_radio_loss_counted(db: Database) -> None:
    home = Home(db)
    home.interval(TAG, 1, 150, beacons=148)  # two beacons of the range not heard
    home.interval(OTHER, 7, 156)
    home.interval(TAG, 151, 300)
    home.interval(TAG, 301, 301, closed="stop")
    home.send()
    proof = home.proof()
    assert proof["intervals"] == 3
    assert proof["spans"] == [{
        "first_counter": 1, "last_counter": 301, "counters": 301, "beacons": 299,
        "radio_loss": 2, "intervals": 3, "first_seq": 2, "last_seq": 5,
        "from_ms": T0 + 1 * BEACON_MS, "to_ms": T0 + 301 * BEACON_MS}]
    assert proof["radio_loss"] == 2
    assert proof["radio_loss_share"] == round(2 / 301, 6)
    assert holes(proof) == []
    assert proof["anomalies"] == []
    r = report(db, home.gw)
    assert r["presence_holes_unexplained"] == r["presence_anomalies"] == 0


def test_a_hole_explained_by_tag_absent_and_one_unexplained(db: Database) -> None:
    home = Home(db)
    home.interval(TAG, 1, 100, closed="state_change")
    away = home.seal("tag.absent", {"tag": TAG, "silent_s": 120, "last_counter": 100}, 160)
    home.seal("tag.present", {"tag": TAG, "counter": 230}, 230)
    home.interval(TAG, 228, 400)
    home.interval(OTHER, 1, 400)  # another tag's records explain nothing of this one
    home.seal("tag.absent", {"tag": OTHER, "silent_s": 120, "last_counter": 400}, 400)
    home.interval(TAG, 411, 500)  # ten counters nobody accounts for
    home.send()
    proof = home.proof()
    explained, unexplained = holes(proof)
    assert explained["status"] == "explained"
    assert (explained["first_counter"], explained["last_counter"]) == (101, 227)
    assert explained["explained_by"] == [{"seq": away.seq, "kind": "tag.absent",
                                          "reason": "absent"}]
    assert unexplained["status"] == "unexplained"
    assert (unexplained["first_counter"], unexplained["last_counter"]) == (401, 410)
    assert unexplained["explained_by"] == []
    assert unexplained["missing_seqs"] == []
    assert proof["holes_explained"] == proof["holes_unexplained"] == 1
    assert len(proof["spans"]) == 3  # type: ignore[arg-type]
    assert report(db, home.gw)["presence_holes_unexplained"] == 1


def test_tag_absent_naming_beacons_no_interval_holds_does_not_explain(db: Database) -> None:
    home = Home(db)
    home.interval(TAG, 1, 100, closed="state_change")
    home.seal("tag.absent", {"tag": TAG, "silent_s": 120, "last_counter": 120}, 180)
    home.interval(TAG, 240, 300)
    home.send()
    (hole,) = holes(home.proof())
    assert hole["status"] == "unexplained"
    assert "counters 101..120 were accepted and are in no interval" in str(hole["notes"])


def test_overlapping_and_out_of_order_intervals_are_flagged_not_refused(db: Database) -> None:
    home = Home(db)
    home.interval(TAG, 1, 100)
    home.interval(TAG, 101, 200)
    back = home.interval(TAG, 150, 160)  # counters already covered: the gateway replayed
    home.interval(TAG, 201, 300)
    order = home.records[:]
    random.Random(7).shuffle(order)  # the platform's arrival order does not matter: seq does
    home.send(order)
    proof = home.proof()
    assert proof["intervals"] == 4  # stored and shown, never dropped
    assert [(a["seq"], a["problem"]) for a in proof["anomalies"]] == [  # type: ignore[index, union-attr]
        (back.seq, "overlap")]
    assert holes(proof) == []
    assert [(s["first_counter"], s["last_counter"]) for s in proof["spans"]] == [  # type: ignore[index, union-attr]
        (1, 300)]
    assert report(db, home.gw)["presence_anomalies"] == 1


def test_the_32_bit_counter_does_not_wrap(db: Database) -> None:
    """Counters up to 2^32 - 1 are a range like any other; a counter going back to 0 is
    not a wrap (the gateway refuses it as a replay) but an overlap; a counter beyond 32
    bits is malformed."""
    home = Home(db)
    top = COUNTER_MAX
    home.interval(TAG, top - 299, top - 150)
    home.interval(TAG, top - 149, top)
    wrapped = home.interval(TAG, 0, 10)
    beyond = home.interval(TAG, top + 1, top + 5)
    home.send()
    proof = home.proof()
    assert [(s["first_counter"], s["last_counter"]) for s in proof["spans"]] == [  # type: ignore[index, union-attr]
        (top - 299, top)]
    assert [(a["seq"], a["problem"]) for a in proof["anomalies"]] == [  # type: ignore[index, union-attr]
        (beyond.seq, "malformed"), (wrapped.seq, "overlap")]


def test_a_hole_whose_records_have_not_arrived_names_them(db: Database) -> None:
    home = Home(db)
    home.interval(TAG, 1, 100, closed="state_change")
    away = home.seal("tag.absent", {"tag": TAG, "silent_s": 120, "last_counter": 100}, 160)
    home.interval(TAG, 200, 300)
    home.send([r for r in home.records if r is not away])
    (hole,) = holes(home.proof())
    assert hole["status"] == "unexplained"
    assert hole["missing_seqs"] == [[away.seq, away.seq]]
    home.send([away])
    (hole,) = holes(home.proof())
    assert hole["status"] == "explained"


def test_the_command_line_and_the_period(db: Database, db_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    home = Home(db)
    home.interval(TAG, 1, 100)
    home.interval(TAG, 111, 200)
    home.interval(TAG, 201, 300)
    home.send()
    args = ["presence", "--db", db_url, "--gw", home.gw, "--tag", TAG]
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["holes_unexplained"] == 1
    assert out["intervals"] == 3
    late = export.iso(T0 + 150 * BEACON_MS)
    assert cli.main([*args, "--json", "--from", late]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["intervals"], out["holes_unexplained"]) == (2, 0)
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "1 UNEXPLAINED" in text
    assert "counters 101..110 (10)" in text
    assert cli.main(["presence", "--db", db_url, "--gw", home.gw, "--tag", "t1"]) == 2
    assert "--tag" in capsys.readouterr().err
    assert cli.main(["presence", "--db", db_url, "--gw", "gw-none", "--tag", TAG]) == 2
    assert "not enrolled" in capsys.readouterr().err


def test_the_court_export_carries_the_intervals_as_they_are(db: Database,
                                                            tmp_path: Path) -> None:
    home = Home(db)
    sealed = [home.interval(TAG, 1, 100, closed="state_change")]
    home.seal("tag.absent", {"tag": TAG, "silent_s": 120, "last_counter": 100}, 160)
    sealed.append(home.interval(TAG, 200, 300))
    home.send()
    out = tmp_path / "export.zip"
    export.export(db, home.gw, T0, T0 + 10**9, out, by="test")
    with zipfile.ZipFile(out) as zf:
        lines = zf.read(export.RECORDS).splitlines()
        manifest = json.loads(zf.read(export.MANIFEST))
    assert [rec.data for rec in sealed] == [line for line in lines
                                            if b'"kind":"tag.interval"' in line]
    assert manifest["period"]["kinds"]["tag.interval"] == 2
    assert export.check_export(out).problems == []


# --- the proof itself, without a database ---------------------------------------------


def iv(seq: int, first: int, last: int, *, boot: int = 1, tag: str = TAG) -> Interval:
    return Interval(seq, T0 + last * BEACON_MS, last * BEACON_MS, boot, tag, first, last,
                    last - first + 1, first * BEACON_MS, last * BEACON_MS, "max_age")


@pytest.mark.parametrize(("explainer", "reason"), [
    (Explainer(2, "tag.spoof", TAG, "spoof"), "spoof"),
    (Explainer(2, "presence.unknown", TAG, "unknown", counters=(11, 19)), "unknown"),
    (Explainer(2, "authorisation.expired", TAG, "authorisation"), "authorisation"),
    (Explainer(2, "local.action", TAG, "pairing"), "pairing"),
])
def test_each_kind_of_explanation(explainer: Explainer, reason: str) -> None:
    proof = prove(TAG, [iv(1, 1, 10), iv(3, 20, 30)], [explainer])
    (hole,) = proof.holes
    assert hole.explained
    assert [e["reason"] for e in hole.explained_by] == [reason]


def test_what_does_not_explain() -> None:
    """A record of another tag, one outside the two intervals' seqs, a presence.unknown
    that covers only part of the hole: none explains it."""
    proof = prove(TAG, [iv(1, 1, 10), iv(5, 20, 30)], [
        Explainer(2, "tag.spoof", OTHER, "spoof"),
        Explainer(6, "tag.absent", TAG, "absent", last_counter=10),
        Explainer(3, "presence.unknown", TAG, "unknown", counters=(11, 15)),
    ], stored=[(1, 6)])
    (hole,) = proof.holes
    assert not hole.explained
    assert "covers (11, 15)" in hole.notes[0]


def test_a_restart_between_two_intervals_explains_the_hole() -> None:
    (hole,) = prove(TAG, [iv(1, 1, 10, boot=1), iv(9, 16, 30, boot=2)], []).holes
    assert hole.explained_by == [{"reason": "restart", "boots": [1, 2]}]


def test_parsing_never_raises_on_a_bad_body() -> None:
    base = {"t": T0, "mono": 0, "boot": 1}
    assert isinstance(presence.parse_interval(1, {**base, "body": interval_body(TAG, 1, 5)}),
                      Interval)
    for body in ([], {"tag": 5}, {**interval_body(TAG, 5, 1)},
                 {**interval_body(TAG, 1, 5), "beacons": 6},
                 {**interval_body(TAG, 1, 5), "beacons": 0},
                 {**interval_body(TAG, 1, 5), "first_counter": True},
                 {**interval_body(TAG, 1, 5), "last_mono_ms": "x"}):
        assert isinstance(presence.parse_interval(1, {**base, "body": body}), str), body
    assert isinstance(presence.parse_interval(1, {"body": interval_body(TAG, 1, 5)}), str)
    assert presence.parse_explainer(1, "tag.absent", "x") is None
    assert presence.parse_explainer(1, "local.action", {"action": "key.staged",
                                                        "details": {"tag": TAG}}) is None
    assert presence.parse_explainer(1, "command.applied", {
        "kind": "unpair-tag", "details": {"tag": TAG}}) == Explainer(
            1, "command.applied", TAG, "pairing")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 5), st.booleans()),
                min_size=1, max_size=30),
       st.integers(0, COUNTER_MAX - 2_000), st.randoms(use_true_random=False))
def test_holes_and_spans_of_any_stream(parts: list[tuple[int, int, bool]], start: int,
                                       rng: random.Random) -> None:
    """Intervals of *length* counters each, then *jump* counters unheard before the next
    (explained by a tag.absent when the flag says so): one span per run of contiguous
    intervals, one hole per jump, explained exactly when a tag.absent with the right
    counter was sealed between them; nothing lost, whatever order they are given in."""
    intervals: list[Interval] = []
    explainers: list[Explainer] = []
    seq, counter = 1, start
    for length, jump, absent in parts:
        intervals.append(iv(seq, counter, counter + length - 1))
        counter += length + jump
        seq += 1
        if jump and absent:
            explainers.append(Explainer(seq, "tag.absent", TAG, "absent",
                                        last_counter=counter - jump - 1))
        seq += 1
    shuffled = intervals[:]
    rng.shuffle(shuffled)
    proof = prove(TAG, shuffled, explainers, stored=[(1, seq)])
    jumps = [(j, a) for _, j, a in parts[:-1] if j]
    assert len(proof.holes) == len(jumps)
    assert proof.unexplained == sum(not a for _, a in jumps)
    assert len(proof.spans) == len(jumps) + 1
    assert sum(s.beacons for s in proof.spans) == sum(length for length, _, _ in parts)
    assert proof.anomalies == []
