"""The store writer seals the next group while the commit thread commits the one before.

A group sealed ahead continues the chain of a group not yet on disk: if that commit
fails, nothing of either is acknowledged, the group sealed ahead is dropped, and both
are sealed again with the same seqs (no gap, no duplicate, the chain unbroken).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from buffer.store import Store
from buffer.writer import MAX_GROUP, StoreWriter
from core.clock import Clock
from core.record import SealedRecord, Timestamp, b64u
from tests.helpers import stored_records, wait_for
from tests.test_store import KEY, STORAGE, presence


class FailingOnceStore(Store):
    """The real store, whose first commit of records waits for the test's gate and then
    fails as an I/O error does (SQLite's error, nothing written); later commits are the
    store's own."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, STORAGE)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.failed = False

    def commit(self, records: Iterable[SealedRecord], **kwargs: Any) -> None:
        records = list(records)
        if records and not self.failed:
            self.failed = True
            self.entered.set()
            if not self.gate.wait(30):
                raise AssertionError("the test never opened the gate")
            raise sqlite3.OperationalError("disk I/O error")
        super().commit(records, **kwargs)


class CountingClock(Clock):
    """The real clock, counting the timestamps the writer takes (one per record sealed)."""

    def __init__(self) -> None:
        super().__init__()
        self.stamped = 0

    def timestamp(self, mono_ns: int) -> Timestamp:
        self.stamped += 1
        return super().timestamp(mono_ns)


def test_a_failed_commit_drops_the_group_sealed_after_it_and_both_are_sealed_again(
    tmp_path: Path,
) -> None:
    db = tmp_path / "r.db"
    store = FailingOnceStore(db)
    clock = CountingClock()
    writer = StoreWriter(store, store.sealer("gw-test-0001", KEY), clock)
    acked: list[int] = []
    lock = threading.Lock()

    def ack(rec: SealedRecord) -> None:
        with lock:
            acked.append(rec.seq)

    count = MAX_GROUP + 4  # a full group, and four readings sealed while it commits
    for i in range(count):
        writer.submit(presence(i + 1), ack)
    writer.start()
    try:
        assert store.entered.wait(30)  # the first group is in flight
        # the four after it are sealed on its draft meanwhile, then the writer waits
        wait_for(lambda: clock.stamped >= count, 30, "the group after it sealed")
        assert clock.stamped == count
        with lock:
            assert acked == []  # nothing acknowledged that is not on disk
        store.gate.set()  # the first group's commit fails
        assert writer.flush(30)
        assert writer.stats.commit_failures == 1
        assert clock.stamped == 2 * count  # both groups sealed again
    finally:
        writer.stop()
    assert acked == list(range(1, count + 1))
    assert writer.last_seq == count
    records = [json.loads(data) for data in stored_records(db, STORAGE)]
    assert [r["seq"] for r in records] == list(range(1, count + 1))
    datas = stored_records(db, STORAGE)
    for before, rec in zip(datas, records[1:], strict=False):
        assert rec["prev"] == b64u(hashlib.sha256(before).digest())
    assert [r["body"]["counter"] for r in records] == list(range(1, count + 1))
