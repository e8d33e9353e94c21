"""The writer's linger: readings close together share a transaction, an alarm never
waits for company, and no group is held open past the ACK budget (the writer's own
record of what it planned, not wall time)."""

from __future__ import annotations

import threading
from pathlib import Path

from buffer.store import Store
from buffer.writer import ACK_BUDGET_S, LINGER_MAX_RECORDS, StoreWriter
from core.clock import Clock
from core.record import Reading, SealedRecord, Source
from core.suites import ED25519, SoftwareKey

KEY = SoftwareKey.generate(ED25519)
STORAGE = bytes(range(32))
SRC = Source("tag_receiver", "TR-0001")


def writer_for(tmp_path: Path, linger_s: float = ACK_BUDGET_S) -> tuple[Store, StoreWriter]:
    store = Store(tmp_path / "r.db", STORAGE)
    writer = StoreWriter(store, store.sealer("gw-test-0001", KEY), Clock(), linger_s=linger_s)
    writer.start()
    return store, writer


def reading(kind: str, n: int) -> Reading:
    body = {"tag": "T0000CAFE", "counter": n, "battery_pct": 90, "strap_closed": True,
            "body_contact": True, "rssi_dbm": -60, "dev_event": n}
    return Reading(kind, SRC, body, n, (SRC.id, n))


class Acks:
    """on_committed callbacks, counted; an event once *want* have come."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.records: list[SealedRecord] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, rec: SealedRecord) -> None:
        with self._lock:
            self.records.append(rec)
            if len(self.records) >= self.want:
                self.done.set()


def test_readings_close_together_share_a_transaction_held_within_the_budget(
    tmp_path: Path,
) -> None:
    store, writer = writer_for(tmp_path)
    acks = Acks(30)
    try:
        for n in range(1, 31):  # microseconds apart: far closer than the linger
            writer.submit(reading("tag.presence", n), acks)
        assert acks.done.wait(10)
        assert writer.stats.lingered >= 1
        assert writer.stats.transactions < 30  # shared fsyncs
        assert 0 < writer.stats.linger_planned_max_s <= ACK_BUDGET_S
        assert writer.stats.urgent_linger_planned_max_s == 0.0
        assert [r.seq for r in acks.records] == list(range(1, 31))
    finally:
        writer.stop()
        store.close()


def test_an_alarm_commits_at_once_even_in_a_lingering_group(tmp_path: Path) -> None:
    store, writer = writer_for(tmp_path)
    acks = Acks(12)
    try:
        for n in range(1, 11):  # the linger is on: readings come microseconds apart
            writer.submit(reading("tag.presence", n), acks)
        writer.submit(reading("tag.tamper", 11), acks)  # an alarm
        writer.submit(reading("tag.presence", 12), acks)
        assert acks.done.wait(10)
        assert writer.stats.urgent_groups >= 1
        # a group holding the alarm was never planned to wait for more readings
        assert writer.stats.urgent_linger_planned_max_s == 0.0
        assert writer.stats.linger_planned_max_s <= ACK_BUDGET_S
        assert [r.kind for r in acks.records].count("tag.tamper") == 1
    finally:
        writer.stop()
        store.close()


def test_a_full_group_and_a_flush_do_not_wait(tmp_path: Path) -> None:
    store, writer = writer_for(tmp_path, linger_s=10.0)  # clamped to the budget
    try:
        assert writer.linger_s == ACK_BUDGET_S
        acks = Acks(1)  # submit_all: one callback, with the last record
        writer.submit_all([reading("tag.presence", n) for n in range(1, 3)])
        writer.submit_all([reading("tag.presence", n) for n in range(3, LINGER_MAX_RECORDS + 3)],
                          acks)
        assert acks.done.wait(10)
        assert acks.records[0].seq == LINGER_MAX_RECORDS + 2
        assert writer.stats.lingered == 0  # the first had no spacing yet, the next was full
        writer.submit(reading("tag.presence", 100))
        assert writer.flush(10)  # a barrier commits what is pending at once
        assert writer.stats.committed == LINGER_MAX_RECORDS + 3
    finally:
        writer.stop()
        store.close()


def test_the_state_of_lingered_groups_survives_a_reopen(tmp_path: Path) -> None:
    store, writer = writer_for(tmp_path)
    acks = Acks(20)
    try:
        for n in range(1, 21):
            writer.submit(reading("tag.presence", n), acks)
        assert acks.done.wait(10)
        assert writer.flush(10)
    finally:
        writer.stop()
    ledger, state, usage = store.device_ledger(), store.state, store.usage
    del store  # no close: the tables are not written, the newest record holds the state
    reopened = Store(tmp_path / "r.db", STORAGE)
    try:
        assert reopened.device_ledger() == ledger
        assert (reopened.state.last_seq, reopened.state.last_digest) == \
            (state.last_seq, state.last_digest)
        assert reopened.usage == usage
        assert sum(c for c, _ in reopened.usage.values()) == 20
    finally:
        reopened.close()


def test_a_stop_and_wait_device_alone_is_not_held_back(tmp_path: Path) -> None:
    """A device that sends its next reading only once the last is acknowledged: a linger
    gains nothing, so after one wasted linger its source is quiet (LINGER_QUIET_S) and
    its readings commit at once."""
    store, writer = writer_for(tmp_path)
    try:
        for n in range(1, 61):
            acks = Acks(1)
            writer.submit(reading("tag.presence", n), acks)
            assert acks.done.wait(10)
        assert writer.stats.committed == 60
        assert writer.stats.linger_wasted >= 1
        # every linger was wasted, and each made the device quiet for 8 s: one or two
        assert writer.stats.lingered == writer.stats.linger_wasted <= 5
    finally:
        writer.stop()
        store.close()
