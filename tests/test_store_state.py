"""The store's state (chain head, per-class usage, device ledger) carried by the newest
record, written to a slot of the state file by a commit of ledger entries alone, and to
the ``state`` row only when needed: what another connection reads, what a reopen after a
kill finds (a torn slot too), that the ledger is sealed on disk, and a store of the first
schema migrated in place."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from buffer.store import (
    DELTA_MAX_ENTRIES,
    STATE_SLOT_BYTES,
    STATE_SUFFIX,
    Evicted,
    Store,
    StoreReader,
    _aad,
    _read_committed,
    committed_state,
    inspect_store,
    undelivered,
)
from core.kinds import Priority
from core.record import GENESIS_PREV, SealedRecord
from core.suites import storage_aead

STORAGE = bytes(range(32))
REPO = Path(__file__).resolve().parents[1]


def record(seq: int, prio: Priority, size: int = 40) -> SealedRecord:
    data = json.dumps({"seq": seq, "pad": "x" * size}).encode()
    return SealedRecord(seq, prio, "tag.presence", data, seq.to_bytes(4, "big") * 8)


def stored_size(rec: SealedRecord) -> int:
    return len(rec.data) + 12 + 16  # nonce, GCM tag


def read_state(db: Path) -> tuple[int, bytes, dict[Priority, tuple[int, int]], dict[str, int]]:
    """The state as a reopen would find it, read from a connection of its own."""
    found = _read_committed(db, storage_aead(STORAGE))
    usage = {p: u for p, u in found.usage.items() if u != (0, 0)}
    return found.last_seq, found.digest, usage, found.ledger


class StoreStateMachine(RuleBasedStateMachine):
    """Random commits (inserts with ledger entries, range deletions alone or riding
    along, evictions, forgotten entries); after each, the state another connection
    loads is the model's."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="store-state-"))
        self.db = self.dir / "r.db"
        self.store = Store(self.db, STORAGE)
        self.seq = 0
        self.digest = GENESIS_PREV
        self.rows: dict[int, tuple[Priority, int]] = {}  # seq -> (class, stored size)
        self.ledger: dict[str, int] = {}
        self.deleted: list[tuple[int, int, int]] = []  # every range deleted so far

    def teardown(self) -> None:
        self.store.close()
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()

    @rule(prios=st.lists(st.sampled_from(list(Priority)), min_size=1, max_size=6),
          events=st.dictionaries(st.sampled_from([f"dev:{i}" for i in range(80)]),
                                 st.integers(0, 10**6), max_size=40),
          delete=st.booleans())
    def insert(self, prios: list[Priority], events: dict[str, int], delete: bool) -> None:
        recs = []
        for prio in prios:
            self.seq += 1
            recs.append(record(self.seq, prio, size=self.seq % 97))
        ranges = self._oldest_ranges() if delete else []
        self.store.commit(recs, device_events=events, delete_ranges=ranges)
        self._deleted(ranges)
        for rec in recs:
            self.rows[rec.seq] = (rec.priority, stored_size(rec))
        self.digest = recs[-1].digest
        self.ledger.update(events)

    @rule(events=st.dictionaries(st.sampled_from([f"tag:{i}:ival:n" for i in range(30)]),
                                 st.integers(0, 10**6), min_size=1, max_size=40))
    def ledger_alone(self, events: dict[str, int]) -> None:
        """Ledger entries alone (a beacon that extends an interval): into the state file."""
        slots = self.store.stats.slot_writes
        self.store.commit([], device_events=events)
        assert self.store.stats.slot_writes == slots + 1
        self.ledger.update(events)

    @rule(data=st.data(), prio=st.sampled_from([Priority.POSITION, Priority.HEARTBEAT]))
    def redelete(self, data: st.DataObject, prio: Priority) -> None:
        """A PUBACK that comes again (a resent message): ranges deleted before, twice in
        one commit, riding a record the state file may hold."""
        if not self.deleted:
            return
        again = data.draw(st.sampled_from(self.deleted))
        self.seq += 1
        rec = record(self.seq, prio, size=self.seq % 97)
        self.store.commit([rec], delete_ranges=[again, again, *self._oldest_ranges()])
        self._deleted(self._oldest_ranges())
        self.rows[rec.seq] = (rec.priority, stored_size(rec))
        self.digest = rec.digest

    @rule(newest=st.booleans())
    def delete_alone(self, newest: bool) -> None:
        """Deletions with no record: the newest (the state's carrier) or the oldest."""
        if not self.rows:
            return
        if newest:
            seq = max(self.rows)
            ranges = [(int(self.rows[seq][0]), seq, seq)]
        else:
            ranges = self._oldest_ranges()
        self.store.commit([], delete_ranges=ranges)
        self._deleted(ranges)

    @rule(count=st.integers(1, 4))
    def evict(self, count: int) -> None:
        victims = sorted(self.rows)[:count]
        evicted = [Evicted(int(self.rows[s][0]), s, self.rows[s][1] + 16) for s in victims]
        self.seq += 1
        gap = record(self.seq, Priority.STATUS)
        self.store.commit([gap], evict=evicted)
        for s in victims:
            del self.rows[s]
        self.rows[gap.seq] = (gap.priority, stored_size(gap))
        self.digest = gap.digest

    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        if not self.ledger:
            return
        key = data.draw(st.sampled_from(sorted(self.ledger)))
        self.store.commit([], forget=[key])
        del self.ledger[key]

    def _oldest_ranges(self) -> list[tuple[int, int, int]]:
        if not self.rows:
            return []
        oldest = min(self.rows)
        prio = self.rows[oldest][0]
        hi = oldest
        for seq in sorted(self.rows):
            if self.rows[seq][0] != prio:
                break
            hi = seq
        return [(int(prio), oldest, hi)]

    def _deleted(self, ranges: list[tuple[int, int, int]]) -> None:
        self.deleted.extend(ranges)
        for prio, lo, hi in ranges:
            for seq in [s for s, (p, _) in self.rows.items() if p == prio and lo <= s <= hi]:
                del self.rows[seq]

    def model(self) -> tuple[int, bytes, dict[Priority, tuple[int, int]], dict[str, int]]:
        usage: dict[Priority, tuple[int, int]] = {}
        for prio, size in self.rows.values():
            count, total = usage.get(prio, (0, 0))
            usage[prio] = (count + 1, total + size)
        return self.seq, self.digest, usage, self.ledger

    @invariant()
    def another_connection_loads_the_same_state(self) -> None:
        assert read_state(self.db) == self.model()
        assert self.store.device_ledger() == self.ledger
        assert {p: u for p, u in self.store.usage.items() if u != (0, 0)} == self.model()[2]

    @invariant()
    def undelivered_agrees(self) -> None:
        found = undelivered(self.db)
        assert found.last_seq == self.seq
        assert found.count == len(self.rows)
        assert found.lowest_seq == (min(self.rows) if self.rows else None)
        if self.rows:  # a count up to a seq: the table's rows, less owed, plus held ones
            middle = sorted(self.rows)[len(self.rows) // 2]
            assert undelivered(self.db, through=middle).count == sum(
                1 for seq in self.rows if seq <= middle)

    @invariant()
    def readers_see_the_queued_records(self) -> None:
        """Whether a record waits in the table or in the state file (held), and whether
        its table row still waits for an owed deletion, a reader sees the queue: the
        forwarder's (the store open in its process: the held rows from memory) and one
        of another process (from the state file: simulated by not finding the store)."""
        want = {p.label: sum(1 for q, _ in self.rows.values() if q == p) for p in Priority}
        want = {k: n for k, n in want.items() if n}
        for outside in (False, True):
            reader = StoreReader(self.db, STORAGE)
            if outside:
                reader._real = ""  # not the open store's path: what another process reads
            try:
                seqs = [json.loads(data)["seq"] for data in reader.queued(batch=3)]
                assert sorted(seqs) == sorted(self.rows)
                assert reader.lowest_seq() == (min(self.rows) if self.rows else None)
                assert reader.depth() == want
            finally:
                reader.close()


TestStoreState = StoreStateMachine.TestCase
TestStoreState.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


def test_a_commit_writes_the_state_row_only_when_the_newest_record_cannot_carry_it(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "r.db", STORAGE)
    written = store.stats.table_writes  # the boot
    # (a class the state file never holds: every record goes to the table)
    store.commit([record(1, Priority.STATUS)], device_events={"TR-1": 1})
    store.commit([record(2, Priority.STATUS)], device_events={"TR-1": 2},
                 delete_ranges=[(int(Priority.STATUS), 1, 1)])
    store.commit([], delete_ranges=[(int(Priority.STATUS), 0, 0)])  # the carrier stays
    assert store.stats.table_writes == written
    store.commit([], delete_ranges=[(int(Priority.STATUS), 2, 2)])  # the carrier goes
    assert store.stats.table_writes == written + 1
    many = {f"dev:{i}": i for i in range(DELTA_MAX_ENTRIES + 1)}
    store.commit([record(3, Priority.STATUS)], device_events=many)  # too many to carry
    assert store.stats.table_writes == written + 2
    store.commit([], device_events={"TR-1": 3})  # ledger entries alone: the state file
    store.commit([], device_events={"TR-1": 4})
    assert (store.stats.table_writes, store.stats.slot_writes) == (written + 2, 2)
    store.close()


def test_the_ledger_is_sealed_on_disk_and_read_back_with_the_key(tmp_path: Path) -> None:
    """The ledger holds when and how each tag was heard: nothing of it in clear in any of
    the store's files, whichever place holds it (state row, newest record, state file);
    the chain's own entries stay readable without the key (decommissioning reads them)."""
    db = tmp_path / "r.db"
    store = Store(db, STORAGE)
    secret = {"tag:T0000CAFE:ival:first_ms": 1_764_561_600_000, "TR-SECRET-01": 77}
    store.commit([record(1, Priority.HEARTBEAT)], device_events=secret)  # the carrier
    store.commit([], device_events={**secret, "tag:T0000CAFE": 5})  # the state file
    store.commit([], delete_ranges=[(int(Priority.HEARTBEAT), 1, 1)],  # the state row
                 device_events={"chain:final_seq": 1})
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for needle in (b"T0000CAFE", b"TR-SECRET-01", b"ival"):
        assert needle not in raw
    store.close()
    state, ledger = committed_state(db, STORAGE)
    assert ledger == {**secret, "tag:T0000CAFE": 5, "chain:final_seq": 1}
    assert state.last_seq == 1
    assert undelivered(db, ledger_key="chain:final_seq").ledger == 1
    with pytest.raises(ValueError, match="sealed with the storage key"):
        undelivered(db, ledger_key="TR-SECRET-01")


def test_a_torn_slot_leaves_the_other_and_the_carried_delta_its_base(tmp_path: Path) -> None:
    """Two slots, written alternately: damage the newer one (a write torn by a power cut)
    and the older one stands, with the record whose delta was carried on top of it."""
    db = tmp_path / "r.db"
    store = Store(db, STORAGE)
    store.commit([], device_events={"TR-1": 1})  # slot a
    store.commit([record(1, Priority.HEARTBEAT)], device_events={"TR-1": 2})  # on a
    store.commit([], device_events={"TR-1": 3})  # slot b
    newest = store._slots._newest
    assert newest is not None  # the store is left as a kill would leave it (no close)
    state_file = db.with_name(db.name + STATE_SUFFIX)
    with state_file.open("r+b") as f:  # tear slot b: its sealed bytes half overwritten
        f.seek(newest * STATE_SLOT_BYTES + 200)
        f.write(b"\xff" * 64)
    reopened = Store(db, STORAGE)
    try:
        assert reopened.device_ledger() == {"TR-1": 2}  # the record's, on top of slot a
        assert reopened.state.last_seq == 1
    finally:
        reopened.close()


# -- a real kill at each step ----------------------------------------------------------

CHILD = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from buffer.store import Store, StoreReader
from core.kinds import Priority
from tests.test_store_state import STORAGE, record
H = int(Priority.HEARTBEAT)
steps = [
    lambda s: s.commit([record(1, Priority.HEARTBEAT)], device_events={{"TR-1": 1}}),
    lambda s: s.commit([record(2, Priority.ALARM)], device_events={{"TR-1": 2, "tag:A": 5}},
                       delete_ranges=[(H, 1, 1)]),
    lambda s: s.commit([], delete_ranges=[(0, 2, 2)]),
    lambda s: s.commit([record(3, Priority.HEARTBEAT), record(4, Priority.STATUS)],
                       device_events={{"TR-1": 4}}),
    lambda s: s.commit([], forget=["tag:A"]),
    lambda s: s.commit([], delete_ranges=[(H, 3, 3)]),
    lambda s: s.commit([record(5, Priority.HEARTBEAT)], device_events={{"TR-2": 1}}),
    lambda s: s.commit([], device_events={{"TR-2": 2, "chain:final_seq": 5}}),
    lambda s: s.commit([], device_events={{"TR-2": 3, "tag:B:ival:n": 1}}),
    lambda s: s.commit([record(6, Priority.STATUS)], device_events={{"TR-1": 6}}),
    lambda s: s.commit([], device_events={{"tag:B:ival:n": 2}}),
    lambda s: s.commit([], delete_ranges=[(H, 5, 5)]),
    # held in the state file, the table's record 4 delivered (its deletion owed)
    lambda s: s.commit([record(7, Priority.HEARTBEAT)], delete_ranges=[(2, 4, 4)]),
    lambda s: s.commit([record(8, Priority.POSITION)], delete_ranges=[(H, 7, 7)]),
    lambda s: s.commit([], device_events={{"TR-3": 1}}),
]
store = Store(Path(sys.argv[1]), STORAGE)
for step in steps[: int(sys.argv[2])]:
    step(store)
st = store._st
queued = sorted(json.loads(d)["seq"] for d in StoreReader(Path(sys.argv[1]), STORAGE).queued())
print(json.dumps({{"seq": st.last_seq, "digest": st.digest.hex(), "ledger": st.ledger,
                  "usage": {{p.label: list(u) for p, u in st.usage.items()}},
                  "queued": queued}}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("steps", range(16))
def test_a_store_killed_after_each_step_reopens_with_the_same_state(
    tmp_path: Path, steps: int,
) -> None:
    db = tmp_path / "r.db"
    child = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(db),
                            str(steps)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    before = json.loads(child.stdout)
    store = Store(db, STORAGE)
    try:
        st = store._st
        assert st.last_seq == before["seq"]
        assert st.digest.hex() == before["digest"]
        assert st.ledger == before["ledger"]
        assert {p.label: list(u) for p, u in st.usage.items()} == before["usage"]
        assert store.state.boot == 2
        found = undelivered(db, ledger_key="chain:final_seq")
        assert found.last_seq == before["seq"]
        assert found.ledger == before["ledger"].get("chain:final_seq")
        assert found.count == sum(c for c, _ in before["usage"].values())
        reader = StoreReader(db, STORAGE)  # the held rows joined the table, owed ones left
        try:
            assert sorted(json.loads(d)["seq"] for d in reader.queued()) == before["queued"]
        finally:
            reader.close()
    finally:
        store.close()


# -- a store of the first schema (a gateway upgraded in the field) ----------------------

#: The schema before this change, as gateways in the field have it.
FIRST_SCHEMA = """
CREATE TABLE records (prio INTEGER NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL,
    blob BLOB NOT NULL, PRIMARY KEY (prio, seq)) WITHOUT ROWID;
CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE device_events (serial TEXT PRIMARY KEY, last_event INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE usage (prio INTEGER PRIMARY KEY, count INTEGER NOT NULL,
    bytes INTEGER NOT NULL);
INSERT INTO usage VALUES (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0);
CREATE TRIGGER records_in AFTER INSERT ON records BEGIN
    UPDATE usage SET count = count + 1, bytes = bytes + length(NEW.blob) WHERE prio = NEW.prio;
END;
CREATE TRIGGER records_out AFTER DELETE ON records BEGIN
    UPDATE usage SET count = count - 1, bytes = bytes - length(OLD.blob) WHERE prio = OLD.prio;
END;
"""


def first_schema_store(db: Path, recs: list[SealedRecord]) -> sqlite3.Connection:
    """A store as the previous code left it: WAL, triggers, meta rows, a ledger; the
    connection is returned open (its WAL not checkpointed: as after a power cut)."""
    aead = storage_aead(STORAGE)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.executescript(FIRST_SCHEMA)
    conn.execute("BEGIN")
    for rec in recs:
        nonce = os.urandom(12)
        blob = nonce + aead.encrypt(nonce, rec.data, _aad(int(rec.priority), rec.seq))
        conn.execute("INSERT INTO records VALUES (?, ?, ?, ?)",
                     (int(rec.priority), rec.seq, 1_700_000_000, blob))
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("last_seq", str(recs[-1].seq).encode()), ("last_digest", recs[-1].digest),
        ("boot", b"7")])
    conn.executemany("INSERT INTO device_events VALUES (?, ?)",
                     [("TR-0001", 41), ("chain:final_seq", 0)])
    conn.execute("COMMIT")
    # one more commit of the old code: a delivered alarm (its trigger counts it)
    conn.execute("DELETE FROM records WHERE prio=? AND seq=?", (int(Priority.ALARM), 2))
    return conn


@pytest.mark.parametrize("clean_stop", [True, False])
def test_a_store_of_the_first_schema_keeps_its_queue_and_state(
    tmp_path: Path, clean_stop: bool,
) -> None:
    db = tmp_path / "records.db"
    recs = [record(s, p) for s, p in ((1, Priority.HEARTBEAT), (2, Priority.ALARM),
                                      (3, Priority.POSITION), (4, Priority.HEARTBEAT))]
    old = first_schema_store(db, recs)
    del recs[1]
    if clean_stop:
        old.close()  # checkpointed, the WAL removed
    else:
        assert db.with_name(db.name + "-wal").stat().st_size > 0
    before = inspect_store(db)  # the tools read an old store too
    assert before["last_seq"] == 4
    store = Store(db, STORAGE)
    try:
        assert store.state.last_seq == 4
        assert store.state.last_digest == recs[-1].digest
        assert store.state.boot == 8
        assert store.device_ledger() == {"TR-0001": 41, "chain:final_seq": 0}
        want = {r.priority: (sum(1 for x in recs if x.priority == r.priority),
                             sum(stored_size(x) for x in recs if x.priority == r.priority))
                for r in recs}
        assert {p: u for p, u in store.usage.items() if u != (0, 0)} == want
        reader = StoreReader(db, STORAGE)
        try:
            queued = list(reader.queued())
        finally:
            reader.close()
        by_class = sorted(recs, key=lambda r: (int(r.priority), r.seq))
        assert queued == [r.data for r in by_class]
        # the chain and the counts go on under the new schema
        store.commit([record(5, Priority.HEARTBEAT)], device_events={"TR-0001": 42},
                     delete_ranges=[(int(Priority.HEARTBEAT), 1, 1)])
        triggers = sqlite3.connect(db).execute(
            "SELECT name FROM sqlite_master WHERE type='trigger'").fetchall()
        assert triggers == []
    finally:
        store.close()
        if not clean_stop:
            old.close()
    found = undelivered(db, ledger_key="chain:final_seq")
    assert (found.last_seq, found.ledger, found.count) == (5, 0, len(recs))
    assert committed_state(db, STORAGE)[1] == {"TR-0001": 42, "chain:final_seq": 0}
    assert inspect_store(db)["boot"] == 8
    # the tables of before held the ledger in clear: emptied at the first open
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM device_events").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_delta_that_would_overflow_the_carriers_page_goes_to_the_state_row(
    tmp_path: Path,
) -> None:
    """The carrier's row stays within what its page keeps (no overflow page: at home that
    was 5 WAL frames a commit instead of 1 or 2): a large delta is written whole to the
    state row in the same transaction; a small one rides the carrier."""
    db = tmp_path / "r.db"
    store = Store(db, STORAGE)
    rows = store._row_local_bytes
    written = store.stats.table_writes
    def incompressible(seq: int) -> SealedRecord:  # stored as it is, ~530 bytes
        data = json.dumps({"seq": seq, "pad": os.urandom(250).hex()}).encode()
        return SealedRecord(seq, Priority.STATUS, "tag.absent", data, bytes(32))

    store.commit([incompressible(1)], device_events={"TR-1": 1})
    assert store.stats.table_writes == written  # a small delta: carried
    noisy = {f"tag:T{i:08d}:ival:rssi_sum": int.from_bytes(os.urandom(6), "big")
             for i in range(DELTA_MAX_ENTRIES - 4)}  # incompressible, under the count bound
    store.commit([incompressible(2)], device_events=noisy)
    assert store.stats.table_writes == written + 1  # the state row took it
    conn = sqlite3.connect(db)
    try:
        lengths = conn.execute("SELECT length(blob) + length(st) FROM records "
                               "WHERE st IS NOT NULL").fetchall()
    finally:
        conn.close()
    assert all(n <= rows for (n,) in lengths)
    store.close()
    assert read_state(db)[3] == {"TR-1": 1, **noisy}


def test_rows_the_broker_took_are_not_sent_again_after_a_kill(tmp_path: Path) -> None:
    """Deletions wait to ride a reading's commit; a commit of ledger entries alone (the
    state file) keeps their ranges, so the store opened after a kill deletes them instead
    of sending them again. Ranges of a class merge only where their seqs touch."""
    from buffer.writer import _Delete, _merged

    db = tmp_path / "r.db"
    store = Store(db, STORAGE)
    store.commit([record(s, Priority.POSITION) for s in (1, 2, 3)]
                 + [record(4, Priority.STATUS), record(5, Priority.POSITION)])
    delivered = _merged([_Delete(int(Priority.POSITION), 2, 3, 2),
                         _Delete(int(Priority.POSITION), 1, 1, 1),
                         _Delete(int(Priority.STATUS), 4, 4, 1)])
    assert delivered == [(int(Priority.STATUS), 4, 4), (int(Priority.POSITION), 1, 3)]
    store.commit([], device_events={"TR-1": 9}, delivered=delivered)  # into the state file
    assert store.stats.slot_writes == 1
    # killed here: no close, the rows still on disk
    reopened = Store(db, STORAGE)
    try:
        reader = StoreReader(db, STORAGE)
        try:
            assert [json.loads(d)["seq"] for d in reader.queued()] == [5]
        finally:
            reader.close()
        assert reopened.device_ledger()["TR-1"] == 9
        assert reopened.usage[Priority.POSITION][0] == 1
        assert reopened.usage[Priority.STATUS][0] == 0
    finally:
        reopened.close()
    # and once deleted, a later open has nothing to do again
    again = Store(db, STORAGE)
    again.close()
    assert read_state(db)[2] == {Priority.POSITION: (1, stored_size(record(5, Priority.POSITION)))}
