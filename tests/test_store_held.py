"""The bounds of the rows the record store holds in its state file (buffer/store.py:
``HELD_MAX_RECORDS``, ``HELD_MAX_BYTES``, ``OWED_MAX_RANGES``), each at its edge: the
last commit within the bound goes to the state file, the next to the database, and no
record is lost, doubled or resurrected on the way, in this process or after a reopen."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from buffer.store import HELD_MAX_BYTES, HELD_MAX_RECORDS, OWED_MAX_RANGES, Store, StoreReader
from core.kinds import Priority
from core.record import SealedRecord

STORAGE = bytes(range(32))
NOISE = [chr(c) for c in range(0x23, 0x7f) if chr(c) != "\\"]


def record(seq: int, prio: Priority = Priority.POSITION, pad: int = 40) -> SealedRecord:
    # printable noise that deflate cannot shrink by a fifth: the row is stored as it is
    # (buffer/store.py compresses only then), so its stored size is known exactly
    noise = "".join(random.Random(seq).choices(NOISE, k=pad))
    data = json.dumps({"seq": seq, "pad": noise}, separators=(",", ":")).encode()
    return SealedRecord(seq, prio, "gnss.fix", data, seq.to_bytes(4, "big") * 8)


def stored(rec: SealedRecord) -> int:
    return len(rec.data) + 12 + 16  # nonce, GCM tag


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "r.db", STORAGE)
    yield s
    s.close()


def table_seqs(store: Store) -> list[int]:
    with sqlite3.connect(store.path) as db:
        return [s for (s,) in db.execute("SELECT seq FROM records WHERE prio >= 0 ORDER BY seq")]


def queued(path: Path) -> list[int]:
    """What another connection's reader sees queued (out of this process's registry)."""
    reader = StoreReader(path, STORAGE)
    reader._real = ""  # not the open store's memory: the state file, as another process
    try:
        return sorted(json.loads(d)["seq"] for d in reader.queued())
    finally:
        reader.close()


def test_the_last_record_within_the_bound_is_held_and_the_next_one_joins_the_table(
    store: Store,
) -> None:
    for seq in range(1, HELD_MAX_RECORDS + 1):
        store.commit([record(seq)])
    held, _ = store.held_and_owed()
    assert [h.seq for h in held] == list(range(1, HELD_MAX_RECORDS + 1))
    assert table_seqs(store) == []
    assert store.stats.slot_writes == HELD_MAX_RECORDS

    store.commit([record(HELD_MAX_RECORDS + 1)])  # one past the bound: the database
    assert store.held_and_owed()[0] == ()
    assert table_seqs(store) == list(range(1, HELD_MAX_RECORDS + 2))
    assert store.stats.slot_writes == HELD_MAX_RECORDS
    assert store.usage[Priority.POSITION][0] == HELD_MAX_RECORDS + 1
    assert queued(store.path) == list(range(1, HELD_MAX_RECORDS + 2))


def test_a_group_larger_than_the_bound_goes_to_the_database_at_once(store: Store) -> None:
    store.commit([record(1)])
    store.commit([record(seq) for seq in range(2, HELD_MAX_RECORDS + 2)])  # 1 + 16 > 16
    assert store.held_and_owed()[0] == ()
    assert table_seqs(store) == list(range(1, HELD_MAX_RECORDS + 2))


def test_held_bytes_past_their_bound_go_to_the_database(store: Store) -> None:
    size = 600
    fit = HELD_MAX_BYTES // stored(record(1, pad=size))
    assert 1 < fit < HELD_MAX_RECORDS  # the byte bound is the one reached
    for seq in range(1, fit + 1):
        store.commit([record(seq, pad=size)])
    held = store.held_and_owed()[0]
    assert [h.seq for h in held] == list(range(1, fit + 1))
    assert sum(len(h.blob) for h in held) == fit * stored(record(1, pad=size)) <= HELD_MAX_BYTES
    store.commit([record(fit + 1, pad=size)])  # one more would pass the bound
    assert store.held_and_owed()[0] == ()
    assert table_seqs(store) == list(range(1, fit + 2))
    assert queued(store.path) == list(range(1, fit + 2))


def test_records_of_other_classes_never_wait_in_the_state_file(store: Store) -> None:
    store.commit([record(1)])
    store.commit([record(2, Priority.STATUS)])  # the held row goes with it
    assert store.held_and_owed()[0] == ()
    assert table_seqs(store) == [1, 2]


def test_owed_ranges_past_their_bound_are_deleted_by_a_database_commit(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = Store(path, STORAGE)
    n = OWED_MAX_RANGES + 1
    # positions at the odd seqs of the table, a status record between each two: n ranges
    table = 2 * n
    store.commit([record(s, Priority.POSITION if s % 2 else Priority.STATUS)
                  for s in range(1, table + 1)])
    assert table_seqs(store) == list(range(1, table + 1))
    pos = int(Priority.POSITION)
    seq = table
    for i in range(OWED_MAX_RANGES):
        # a held record; the one held before it and one table row delivered: the held
        # row leaves at once, the table's is owed (one held row throughout)
        seq += 1
        ranges = [(pos, 2 * i + 1, 2 * i + 1)] + ([(pos, seq - 1, seq - 1)] if i else [])
        store.commit([record(seq)], delete_ranges=ranges)
        held, owed = store.held_and_owed()
        assert ([h.seq for h in held], len(owed)) == ([seq], i + 1)
    assert table_seqs(store) == list(range(1, table + 1))  # owed rows: still in the table
    gone = {2 * i + 1 for i in range(OWED_MAX_RANGES)} | set(range(table + 1, seq))
    expect = sorted(set(range(1, seq + 1)) - gone)
    assert queued(path) == expect
    assert store.usage[Priority.POSITION][0] == sum(1 for s in expect if s % 2 or s > table)

    seq += 1  # one more owed range would pass the bound: the commit goes to the database
    last = 2 * OWED_MAX_RANGES + 1
    store.commit([record(seq)], delete_ranges=[(pos, last, last), (pos, seq - 1, seq - 1)])
    assert store.held_and_owed() == ((), ())
    gone |= {last, seq - 1}
    expect = sorted(set(range(1, seq + 1)) - gone)
    assert table_seqs(store) == expect
    assert queued(path) == expect
    usage = dict(store.usage)
    assert usage[Priority.POSITION][0] == sum(1 for s in expect if s % 2 or s > table)
    store.close()
    reopened = Store(path, STORAGE)
    try:
        assert table_seqs(reopened) == expect
        assert reopened.usage == usage
    finally:
        reopened.close()


def test_a_reopen_moves_held_rows_to_the_table_and_deletes_owed_ones(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = Store(path, STORAGE)
    store.commit([record(1, Priority.STATUS), record(2, Priority.STATUS)])
    store.commit([record(3)], delete_ranges=[(int(Priority.STATUS), 1, 1)])  # owed
    store.commit([record(4)], delete_ranges=[(int(Priority.POSITION), 3, 3)])  # held: gone
    assert [h.seq for h in store.held_and_owed()[0]] == [4]
    assert queued(path) == [2, 4]
    usage = dict(store.usage)
    # no close: a kill leaves the state file as the last commit wrote it
    store._slots.close()
    store._db.close()
    reopened = Store(path, STORAGE)
    try:
        assert reopened.held_and_owed() == ((), ())
        assert table_seqs(reopened) == [2, 4]
        assert reopened.usage == usage
    finally:
        reopened.close()
