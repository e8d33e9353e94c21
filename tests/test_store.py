"""The durable store: state across reopen, encryption at rest, delivery order, failures."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from buffer.seal import Sealer
from buffer.store import (
    MIN_QUOTA_BYTES,
    ROW_COMPRESS_GROUP,
    ROW_COMPRESS_MIN,
    Store,
    StoreError,
    StoreReader,
)
from buffer.writer import StoreWriter
from core.clock import Clock
from core.kinds import Priority
from core.record import GENESIS_PREV, Reading, Source
from core.suites import ED25519, SoftwareKey

#: The session key the records are signed with (as the gateway's; its identity is IDENTITY).
KEY = SoftwareKey.generate(ED25519)
IDENTITY = SoftwareKey.generate(ED25519)
STORAGE = bytes(range(32))
SRC = Source("tag_receiver", "TR-0001")


def open_store(path: Path) -> tuple[Store, Sealer]:
    store = Store(path, STORAGE)
    return store, store.sealer("gw-test-0001", KEY)


def presence(n: int, kind: str = "tag.presence") -> Reading:
    return Reading(kind, SRC, {"tag": "T0000CAFE", "counter": n, "lat_e7": 468123456}, n)


def test_seq_chain_and_boot_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    assert (store.state.last_seq, store.state.last_digest, store.state.boot) == \
        (0, GENESIS_PREV, 1)
    clock = Clock()
    recs = [sealer.seal(presence(i), clock.timestamp(time.monotonic_ns())) for i in range(3)]
    store.commit(recs, device_events={"TR-0001": 7})
    store.close()
    store, _ = open_store(db)
    assert store.state.last_seq == 3
    assert store.state.last_digest == recs[-1].digest
    assert store.state.boot == 2
    assert store.device_ledger() == {"TR-0001": 7}


def test_payloads_are_encrypted_at_rest(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    store.commit([sealer.seal(presence(1), Clock().timestamp(0))])
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"T0000CAFE" not in raw
    assert b"468123456" not in raw
    reader = StoreReader(db, STORAGE)
    batch = reader.next_batch({}, 10, 1 << 20)
    assert batch is not None
    assert b"T0000CAFE" in batch[1][0][1]


def test_reader_serves_the_highest_class_first_in_seq_order(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    clock = Clock()
    kinds = ["tag.presence", "gateway.health", "tag.tamper", "tag.presence", "tag.tamper"]
    store.commit([sealer.seal(presence(i, k), clock.timestamp(0)) for i, k in enumerate(kinds)])
    reader = StoreReader(db, STORAGE)
    batch = reader.next_batch({}, 10, 1 << 20)
    assert batch is not None
    assert batch[0] is Priority.ALARM
    assert [seq for seq, _ in batch[1]] == [3, 5]
    batch = reader.next_batch({Priority.ALARM: 5}, 10, 1 << 20)
    assert batch is not None
    assert (batch[0], [s for s, _ in batch[1]]) == (Priority.POSITION, [1, 4])


def test_a_row_moved_to_another_seq_does_not_decrypt(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    # (a class the state file never holds: the rows go to the table at once)
    store.commit([sealer.seal(presence(i, "tag.absent"), Clock().timestamp(0))
                  for i in range(2)])
    conn = sqlite3.connect(db)
    blob = conn.execute("SELECT blob FROM records WHERE seq=1").fetchone()[0]
    reader = StoreReader(db, STORAGE)
    with pytest.raises(InvalidTag):
        reader.open_row(int(Priority.POSITION), 2, blob)
    conn.close()


def test_wrong_key_size_is_a_clear_error(tmp_path: Path) -> None:
    # the key's length says its cipher: 32 bytes AES-256-GCM, 16 bytes SM4-GCM
    with pytest.raises(StoreError, match="32 or 16 bytes, not 5"):
        Store(tmp_path / "r.db", b"short")


def kinds_in(db: Path) -> list[str]:
    """The kinds of the queued records, in seq order."""
    reader = StoreReader(db, STORAGE)
    records = sorted((json.loads(data) for data in reader.queued()), key=lambda r: r["seq"])
    reader.close()
    return [r["kind"] for r in records]


def test_writer_acks_only_after_commit_and_rolls_back_on_failure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    committed: list[int] = []
    writer.submit(presence(1), lambda rec: committed.append(rec.seq))
    assert writer.flush()
    assert committed == [1]
    # a full disk: every commit fails; the reading stays unacknowledged, no seq is burnt
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")
    # incompressible enough that it needs new pages even stored compressed
    writer.submit(Reading("tag.presence", SRC, {"pad": os.urandom(10000).hex()}, 2),
                  lambda rec: committed.append(rec.seq))
    writer.submit(Reading("tag.presence", SRC, {"n": 3}, 3, ("TR-0001", 3)),
                  lambda rec: committed.append(rec.seq))
    assert not writer.flush(timeout=1.5)
    assert committed == [1]
    assert writer.stats.commit_failures >= 1
    assert writer.last_committed_event("TR-0001") is None
    store._db.execute("PRAGMA max_page_count=1000000")  # space freed
    assert writer.flush(timeout=10)
    assert committed == [1, 3, 4]  # seq 2: the storage.full record
    assert writer.last_committed_event("TR-0001") == 3
    writer.stop()
    assert kinds_in(db) == ["tag.presence", "storage.full", "tag.presence", "tag.presence",
                            "storage.recovered"]
    # classified and said once, not at every retry; the cause is not hidden by the rollback
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("disk full")
    assert "database or disk is full" in errors[0]
    assert not any("cannot rollback" in r.getMessage() for r in caplog.records)


def test_tiny_quota_evicts_lowest_class_oldest_first_with_a_signed_gap(tmp_path: Path) -> None:
    from central.record import Registration, verify_record
    from central.verifier import Verifier
    from core.session import SESSION_KIND, SESSION_LIFETIME_MS, session_body
    from core.suites import Verifier as PublicKey

    db = tmp_path / "r.db"
    quota = 2 * MIN_QUOTA_BYTES
    store = Store(db, STORAGE, quota_bytes=quota)
    writer = StoreWriter(store, store.sealer("gw-test-0001"), Clock())
    writer.start()
    # as the gateway at each start: KEY certified by the identity, then records signed by it
    writer.key_record(SESSION_KIND, lambda seq, boot: session_body(
        gateway_id="gw-test-0001", session=KEY, boot=boot, from_seq=seq,
        until_mono=SESSION_LIFETIME_MS, identity=IDENTITY, identity_class="file"),
        session=KEY, mono_ns=0)
    kinds = {0: "tag.tamper", 1: "checkin", 2: "gateway.health"}
    wal = db.with_name(db.name + "-wal")
    wal_sizes = []
    for i in range(1200):
        writer.submit(Reading(kinds.get(i % 20, "tag.presence"), SRC,
                              {"tag": "T0000CAFE", "counter": i, "pad": "p" * 200}, i))
        if i % 50 == 0:
            assert writer.flush()
            wal_sizes.append(wal.stat().st_size)
            assert store.used_bytes <= quota  # every file counted: pages, WAL, reserve
    assert writer.flush()
    writer.stop()
    # the WAL stays within its bound; the store's files within the quota
    assert max(wal_sizes) <= store.limits.wal
    assert store.has_reserve
    assert store.used_bytes <= quota

    reader = StoreReader(db, STORAGE)
    left: dict[str, list[int]] = {}
    records = []
    cursors: dict[Priority, int] = {}
    while (batch := reader.next_batch(cursors, 1000, 1 << 30)) is not None:
        prio, rows = batch
        cursors[prio] = rows[-1][0]
        left.setdefault(prio.label, []).extend(seq for seq, _ in rows)
        records.extend(data for _, data in rows)
    # every alarm and check-in is still there; heartbeats went before positions
    assert len(left["alarm"]) >= 60
    assert len(left["checkin"]) == 60
    assert "heartbeat" not in left
    assert writer.stats.evicted["heartbeat"] == 60
    assert writer.stats.evicted["position"] > 0
    # the positions left are the newest ones
    assert left["position"] == sorted(left["position"])
    assert min(left["position"]) > 600
    # the platform sees every missing seq accounted for by a signed gap record
    v = Verifier({"gw-test-0001": Registration("gw-test-0001", IDENTITY.alg,
                                               IDENTITY.public_raw, IDENTITY.kid, "file",
                                               "ed25519")})
    for data in records:
        v.ingest_record(data)
    session = PublicKey(KEY.alg, KEY.public_raw)
    gaps = [verify_record(d, lambda _r: (session, "file")) for d in records
            if b'"kind":"gap"' in d]
    assert gaps
    assert all(g.record["body"]["reason"] == "quota" for g in gaps)
    assert v.gaps("gw-test-0001") == []
    assert v.stats.bad_signature == 0
    assert v.summary()["verified"] == len(records)


def test_health_record_reports_depth_age_and_extra_counters(tmp_path: Path) -> None:
    import json

    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    for i in range(3):
        writer.submit(presence(i))
    writer.submit(presence(9, "tag.tamper"))
    writer.submit_health(lambda: {"uplink": {"connected": False}})
    assert writer.flush()
    writer.stop()
    reader = StoreReader(db, STORAGE)
    batch = reader.next_batch({Priority.ALARM: 10**9, Priority.POSITION: 10**9}, 10, 1 << 20)
    assert batch is not None
    assert batch[0] is Priority.HEARTBEAT
    health = json.loads(batch[1][0][1])
    assert health["kind"] == "gateway.health"
    body = health["body"]
    assert body["buffer"]["position"]["queued"] == 3
    assert body["buffer"]["alarm"]["queued"] == 1
    assert body["buffer"]["position"]["oldest_s"] >= 0
    assert body["uplink"] == {"connected": False}
    assert body["committed"] == 4


def test_an_alarm_does_not_queue_behind_a_backlog_of_deletions(tmp_path: Path) -> None:
    store, sealer = open_store(tmp_path / "r.db")
    writer = StoreWriter(store, sealer, Clock())
    seen: list[int] = []
    for lo in range(1, 50_001, 200):  # the PUBACKs of a drained backlog, batch by batch
        writer.delete_range(3, lo, lo + 199, 200)
    writer.submit(presence(1, "tag.tamper"), lambda _rec: seen.append(writer._deletes_committed))
    writer.start()
    assert writer.flush(30)  # a barrier also waits for the deletions before it
    assert writer._deletes_committed == 50_000
    writer.stop()
    assert seen
    assert seen[0] < 50_000  # committed while deletions were still queued
    assert writer.deletions_waiting == 0


def test_stop_commits_lingering_deletions_and_ends(tmp_path: Path) -> None:
    store, sealer = open_store(tmp_path / "r.db")
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    writer.submit(presence(1))
    assert writer.flush()
    writer.delete_range(3, 1, 1, 1)  # one deletion: it would linger for a second
    writer.stop()
    assert not writer._thread.is_alive()  # it did not block waiting for more work
    assert writer.deletions_waiting == 0
    assert store.usage[Priority.POSITION] == (0, 0)


def test_a_reading_that_cannot_be_sealed_is_recorded_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    store, sealer = open_store(tmp_path / "r.db")
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    try:
        acked: list[int] = []
        bad = Reading("tag.presence", Source("tag_receiver", "TR-1"), {"rssi": -60.5, "n": 1},
                      time.monotonic_ns(), ("TR-1", 7))
        writer.submit(bad, lambda rec: acked.append(rec.seq))
        writer.submit(presence(2))
        assert writer.flush()
        assert writer.is_alive()
        assert acked == [1]  # the device event is acknowledged: its evidence is on disk
        assert writer.last_committed_event("TR-1") == 7
        rows = [json.loads(d) for d in StoreReader(tmp_path / "r.db", STORAGE).queued()]
        error = next(r for r in rows if r["kind"] == "device.error")
        assert error["body"]["error"] == "unsealable"
        assert error["body"]["kind"] == "tag.presence"
        assert error["body"]["body"] == {"rssi": "-60.5", "n": 1}
        assert [r["kind"] for r in rows].count("tag.presence") == 1
    finally:
        writer.stop()
        store.close()


@pytest.mark.parametrize("key", ["tag:T00001000", "kiosk.counter:KI-1", "clock:floor_ms",
                                 "gnss:moved", "actions:recorded", "dev:TR-1"])
def test_a_device_cannot_name_a_ledger_entry_of_the_gateway(tmp_path: Path, key: str) -> None:
    """A device names itself (its HELLO serial, any printable ASCII): a fake device whose
    serial is a tag's counter key must not lower that counter (a replay would pass)."""
    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    writer.submit(Reading("tag.presence", SRC, {"n": 1}, 1, ledger=((key, 50),)))
    writer.submit(Reading("tag.presence", Source("tag_receiver", key), {"n": 2}, 2, (key, 1)))
    assert writer.flush()
    assert writer.ledger_value(key) == 50
    assert writer.last_committed_event(key) == 1
    writer.stop()
    store.close()
    store, sealer = open_store(db)  # and after a restart
    again = StoreWriter(store, sealer, Clock())
    assert again.ledger_value(key) == 50
    assert again.last_committed_event(key) == 1
    store.close()


def test_ledger_entries_without_a_record_ride_along_and_commit_on_their_own_when_due(
        tmp_path: Path) -> None:
    """``submit_ledger`` (a beacon that only extends its tag's interval): no record sealed;
    entries wait up to *within_s* for a transaction, in submission order with readings."""
    import threading

    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    done: list[str] = []
    # five beacons' entries, due in 30 s: they wait for company ...
    for n in range(1, 6):
        writer.submit_ledger((("tag:T1", n), ("dev:TR-1", n)), lambda n=n: done.append(f"l{n}"),
                             within_s=30.0)
    before = writer.stats.transactions
    assert writer.backlog == 5  # waiting: the ports' backpressure counts them
    # ... and the next reading takes them in its transaction, in order: its own ledger
    # entry is set after theirs
    writer.submit(Reading("tag.tamper", SRC, {"n": 6}, 6, ("TR-1", 6), (("tag:T1", 6),)),
                  lambda _rec: done.append("r6"))
    assert writer.flush()
    assert writer.stats.transactions == before + 1  # one fsync for the six
    assert done == ["l1", "l2", "l3", "l4", "l5", "r6"]  # acknowledged in order
    assert writer.ledger_value("tag:T1") == 6
    assert writer.last_committed_event("TR-1") == 6
    assert writer.last_seq == 1  # one record: the entries alone sealed none
    assert writer.backlog == 0
    # alone, entries are committed once due, without any other item to wake the writer
    committed = threading.Event()
    writer.submit_ledger((("tag:T1", 7),), committed.set, within_s=0.2)
    assert committed.wait(10)
    assert writer.ledger_value("tag:T1") == 7
    # a reading then entries on the same key: the entries win (submission order)
    writer.submit(Reading("tag.tamper", SRC, {"n": 8}, 8, ledger=(("tag:T1", 8),)))
    writer.submit_ledger((("tag:T1", 9),))  # within_s None: as soon as a reading would be
    writer.submit_ledger((("tag:T1", 10),), within_s=30.0)
    writer.stop()  # a clean stop commits the entries still waiting
    assert writer.ledger_value("tag:T1") == 10
    store.close()
    store, sealer = open_store(db)
    again = StoreWriter(store, sealer, Clock())
    assert again.ledger_value("tag:T1") == 10  # durable
    assert again.last_seq == 2
    store.close()


def test_readings_with_a_deadline_ride_the_next_transaction_and_an_alarm_never_waits(
        tmp_path: Path) -> None:
    """``submit_all(..., within_s)`` (a windowed device, whose ACK may wait): no
    transaction of their own before the deadline; the next one takes them; alone they
    commit once due; an alarm among them commits at once."""
    import threading

    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    try:
        done: list[int] = []
        for n in range(1, 4):
            writer.submit_all([presence(n)], lambda rec: done.append(rec.seq), within_s=30.0)
        before = writer.stats.transactions
        assert writer.backlog == 3  # held: not committed
        assert writer.flush()  # someone waits (a flush): the group commits now
        assert writer.stats.transactions == before + 1
        assert done == [1, 2, 3]
        # alone, they commit once due, with nothing else to wake the writer
        committed = threading.Event()
        writer.submit_all([presence(4)], lambda _rec: committed.set(), within_s=0.2)
        assert committed.wait(10)
        # an alarm with a deadline is still an alarm: committed at once
        alarm = threading.Event()
        writer.submit_all([Reading("tag.tamper", SRC, {"n": 5}, 5)], lambda _r: alarm.set(),
                          within_s=30.0)
        assert alarm.wait(10)  # its deadline is 30 s away: it did not wait for it
        assert writer.backlog == 0
    finally:
        writer.stop()
        store.close()


def test_a_large_record_is_stored_compressed_and_reads_back_the_same(tmp_path: Path) -> None:
    """A record of ROW_COMPRESS_MIN bytes or more that compresses by a quarter is stored
    compressed (then encrypted); a small one as it is; both read back byte for byte."""
    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    clock = Clock()
    big = sealer.seal(Reading("gateway.health", SRC, {"ports": ["ttyUSB0"] * 200}, 1),
                      clock.timestamp(1))
    small = sealer.seal(Reading("tag.presence", SRC, {"n": 2}, 2), clock.timestamp(2))
    assert len(big.data) >= ROW_COMPRESS_MIN > len(small.data)
    store.commit([big, small])
    # a full-speed group (more than ROW_COMPRESS_GROUP records) spends no CPU on it
    many = [sealer.seal(Reading("gateway.health", SRC, {"ports": ["ttyUSB0"] * 200}, n),
                        clock.timestamp(n)) for n in range(3, 4 + ROW_COMPRESS_GROUP)]
    store.commit(many)
    sizes = dict(sqlite3.connect(db).execute("SELECT seq, length(blob) FROM records"))
    assert sizes[big.seq] < len(big.data) * 3 // 4  # compressed
    assert sizes[small.seq] == len(small.data) + 28  # nonce and tag only
    assert all(sizes[r.seq] == len(r.data) + 28 for r in many)
    reader = StoreReader(db, STORAGE)
    try:
        assert sorted(reader.queued()) == sorted([big.data, small.data, *(r.data for r in many)])
    finally:
        reader.close()
        store.close()


def test_delivered_rows_waiting_for_their_deletion_are_not_counted_as_queued(
        tmp_path: Path) -> None:
    """Deletions wait for a reading's commit to ride (DELETE_LINGER_S): the rows they
    name are delivered, and the status's queue (queued_by_class) does not count them."""
    from app.snapshot import queued_by_class

    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    writer = StoreWriter(store, sealer, Clock())
    writer.start()
    try:
        for n in range(1, 4):
            writer.submit(presence(n))
        assert writer.flush()
        assert queued_by_class(store, writer)["position"] == 3
        writer.delete_range(int(Priority.POSITION), 1, 2, 2)  # the broker took seqs 1-2
        # ledger entries alone, after it in the writer's inbox: once they are committed
        # (the state file) the writer holds the deletion, waiting for a reading to ride
        committed = threading.Event()
        writer.submit_ledger((("tag:T1", 1),), committed.set)
        assert committed.wait(10)
        assert writer.deletions_waiting_by_class() == {Priority.POSITION: 2}
        assert store.usage[Priority.POSITION][0] == 3  # still on disk
        assert queued_by_class(store, writer)["position"] == 1
        assert writer.flush()  # someone waits: the deletion commits
        assert writer.deletions_waiting_by_class() == {}
        assert queued_by_class(store, writer)["position"] == 1
        assert store.usage[Priority.POSITION][0] == 1
    finally:
        writer.stop()
        store.close()


#: SQLite's unix VFS: the wal-index's "dead man switch" byte (UNIX_SHM_DMS = 120 + 8), which
#: every connection holds with a shared POSIX lock; a process that can lock it exclusively
#: takes the wal-index for abandoned and resets it (truncating the -shm file).
SHM_DMS_BYTE = 128
_TRY_DMS = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]))
except OSError:
    print("held")
else:
    print("free")
"""


def test_an_open_store_keeps_its_wal_index_locked_against_other_processes(
        tmp_path: Path) -> None:
    """The store reads the WAL's frame count from the -shm file after its commits; closing a
    descriptor of that file would release every POSIX lock this process holds on it (SQLite's
    too), and another process opening the store (status, diag, decommission) would then
    reset the wal-index under this one's mapping: SIGBUS, seen in a stress run."""
    import subprocess
    import sys

    db = tmp_path / "r.db"
    store, sealer = open_store(db)
    clock = Clock()
    try:
        for n in range(1, 40):  # commits and the checks after them (frames, checkpoint)
            store.commit([sealer.seal(presence(n), clock.timestamp(time.monotonic_ns()))])
            store.maintain()
        shm = db.with_name(db.name + "-shm")
        probe = subprocess.run([sys.executable, "-c", _TRY_DMS, str(shm), str(SHM_DMS_BYTE)],
                               capture_output=True, text=True, check=True, timeout=30)
        assert probe.stdout.strip() == "held"
        # another process reading the store leaves this one whole
        other = subprocess.run([sys.executable, "-c", (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "print(c.execute('SELECT count(*) FROM records').fetchone()[0]); c.close()"),
            str(db)], capture_output=True, text=True, check=True, timeout=30)
        assert int(other.stdout) >= 1
        store.commit([sealer.seal(presence(40), clock.timestamp(time.monotonic_ns()))])
        store.maintain()
        assert store.state.last_seq == 40
    finally:
        store.close()
