"""The uplink's delivery logic, sans-IO: no broker, no store, no thread, no clock.

A fake store answers ``next_batch`` as :class:`buffer.store.StoreReader` does
(the next rows of the highest class above that class's cursor) and applies
deletions late, as the store writer does. A hypothesis state machine runs random
interleavings of commits, publishes, PUBACKs (accepted, refused, late),
disconnects and reconnects, and checks the safety invariant at every step: a
seq leaves the store only after an accepted PUBACK of a message carrying it; and
once the broker accepts everything, every committed seq is deleted (no loss).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from core.kinds import Priority
from uplink.delivery import (
    HOLD_BACKPRESSURE,
    HOLD_OFFLINE,
    HOLD_WINDOW_FULL,
    MAX_DELETIONS_WAITING,
    WINDOW,
    Delete,
    Delivery,
    Hold,
    Ignored,
    ReadFrom,
    Refused,
)
from uplink.forwarder import (
    Connected,
    ConnectFailed,
    Disconnected,
    Forwarder,
    Published,
)

BATCH = 3


class FakeStore:
    """Committed rows per class; ``next_batch`` as the real reader; deletions applied late."""

    def __init__(self) -> None:
        self.rows: dict[Priority, list[int]] = {p: [] for p in Priority}
        self._seq = itertools.count(1)
        self.committed: set[int] = set()
        self.waiting: list[Delete] = []  # PUBACKed, not yet deleted by the writer

    def commit(self, prio: Priority, n: int = 1) -> list[int]:
        seqs = [next(self._seq) for _ in range(n)]
        self.rows[prio].extend(seqs)
        self.committed.update(seqs)
        return seqs

    def next_batch(self, after: Mapping[Priority, int],
                   limit: int = BATCH) -> tuple[Priority, list[int]] | None:
        for prio in Priority:
            rows = [s for s in self.rows[prio] if s > after.get(prio, 0)][:limit]
            if rows:
                return prio, rows
        return None

    def delete_range(self, d: Delete) -> None:
        self.waiting.append(d)

    @property
    def deletions_waiting(self) -> int:
        return sum(d.rows for d in self.waiting)

    def catch_up(self) -> None:
        for d in self.waiting:
            self.rows[d.prio] = [s for s in self.rows[d.prio] if not d.lo <= s <= d.hi]
        self.waiting.clear()

    def queued(self) -> set[int]:
        return {s for rows in self.rows.values() for s in rows}


class Glue:
    """What the forwarder thread does, with mids counted as paho counts them."""

    def __init__(self, delivery: Delivery, store: FakeStore) -> None:
        self.delivery = delivery
        self.store = store
        self.mids = itertools.count(1)
        self.sent: dict[int, tuple[Priority, list[int]]] = {}

    def pump(self) -> list[int]:
        """Publish until the delivery holds or the store has nothing; the new mids."""
        out = []
        while isinstance(step := self.delivery.next_read(self.store.deletions_waiting),
                         ReadFrom):
            batch = self.store.next_batch(step.cursors)
            if batch is None:
                self.delivery.nothing_to_read()
                break
            mid = next(self.mids)
            self.delivery.published(mid, *batch)
            self.sent[mid] = batch
            out.append(mid)
        return out


@pytest.fixture
def rig() -> tuple[Delivery, FakeStore, Glue]:
    delivery = Delivery()
    store = FakeStore()
    glue = Glue(delivery, store)
    delivery.connection_made()
    return delivery, store, glue


def test_nothing_is_read_while_offline() -> None:
    delivery = Delivery()
    assert delivery.next_read(0) == Hold(HOLD_OFFLINE)
    delivery.connection_made()
    assert isinstance(delivery.next_read(0), ReadFrom)
    assert delivery.connection_lost()
    assert delivery.next_read(0) == Hold(HOLD_OFFLINE)
    assert not delivery.connection_lost()  # a second loss is not counted


def test_the_window_fills_and_stops_at_eight(rig: tuple[Delivery, FakeStore, Glue]) -> None:
    delivery, store, glue = rig
    store.commit(Priority.HEARTBEAT, 100 * BATCH)
    assert len(glue.pump()) == WINDOW == 8
    assert delivery.in_flight == WINDOW
    assert delivery.next_read(0) == Hold(HOLD_WINDOW_FULL)
    delivery.puback(1)
    assert glue.pump() == [WINDOW + 1]  # one PUBACK frees one slot


def test_a_puback_deletes_the_batchs_range_of_its_class(
    rig: tuple[Delivery, FakeStore, Glue],
) -> None:
    delivery, store, glue = rig
    store.commit(Priority.POSITION, 2)
    store.commit(Priority.HEARTBEAT, 1)
    store.commit(Priority.POSITION, 2)  # seqs 4, 5: the class's rows are not contiguous
    assert glue.pump() == [1, 2, 3]
    assert glue.sent[1] == (Priority.POSITION, [1, 2, 4])
    assert delivery.puback(1) == Delete(1, Priority.POSITION, 1, 4, 3, (1, 2, 4))
    assert delivery.puback(2) == Delete(2, Priority.POSITION, 5, 5, 1, (5,))
    assert delivery.puback(3) == Delete(3, Priority.HEARTBEAT, 3, 3, 1, (3,))
    assert delivery.in_flight == 0


def test_a_refused_puback_keeps_the_rows_until_the_next_connection(
    rig: tuple[Delivery, FakeStore, Glue],
) -> None:
    delivery, store, glue = rig
    store.commit(Priority.ALARM, 2)
    assert glue.pump() == [1]
    outcome = delivery.puback(1, refused=True, reason="Not authorized")
    assert outcome == Refused(1, Priority.ALARM, 2, "Not authorized")
    assert glue.pump() == []  # not sent again on this connection
    delivery.connection_lost()
    delivery.connection_made()
    assert glue.pump() == [2]
    assert glue.sent[2] == (Priority.ALARM, [1, 2])


def test_a_reconnect_sends_again_everything_not_deleted(
    rig: tuple[Delivery, FakeStore, Glue],
) -> None:
    delivery, store, glue = rig
    store.commit(Priority.CHECKIN, 4 * BATCH)
    assert glue.pump() == [1, 2, 3, 4]
    d = delivery.puback(1)
    assert isinstance(d, Delete)
    store.delete_range(d)
    store.catch_up()
    delivery.connection_lost()
    assert delivery.in_flight == 0
    delivery.connection_made()
    assert glue.pump() == [5, 6, 7]
    resent = [s for mid in (5, 6, 7) for s in glue.sent[mid][1]]
    assert resent == sorted(store.queued()) == list(range(BATCH + 1, 4 * BATCH + 1))


def test_acked_rows_not_yet_deleted_are_sent_again_and_deleted_again(
    rig: tuple[Delivery, FakeStore, Glue],
) -> None:
    delivery, store, glue = rig
    store.commit(Priority.STATUS, 2)
    glue.pump()
    assert isinstance(delivery.puback(1), Delete)  # the writer has not deleted them yet
    delivery.connection_lost()
    delivery.connection_made()
    assert glue.pump() == [2]
    assert delivery.puback(2) == Delete(2, Priority.STATUS, 1, 2, 2, (1, 2))


def test_a_late_or_unknown_puback_is_ignored(rig: tuple[Delivery, FakeStore, Glue]) -> None:
    delivery, store, glue = rig
    store.commit(Priority.ALARM, 1)
    assert glue.pump() == [1]
    delivery.connection_lost()
    delivery.connection_made()
    assert glue.pump() == [2]
    assert delivery.puback(1) == Ignored(1)  # from before the reconnect
    assert delivery.puback(99, refused=True, reason="x") == Ignored(99)
    assert delivery.puback(2) == Delete(2, Priority.ALARM, 1, 1, 1, (1,))
    assert delivery.puback(2) == Ignored(2)  # a duplicate


def test_backpressure_holds_while_deletions_wait() -> None:
    delivery = Delivery(max_deletions_waiting=10)
    delivery.connection_made()
    assert isinstance(delivery.next_read(10), ReadFrom)
    assert delivery.next_read(11) == Hold(HOLD_BACKPRESSURE)
    assert Delivery().next_read(MAX_DELETIONS_WAITING + 1) == Hold(HOLD_OFFLINE)
    online = Delivery()
    online.connection_made()
    assert online.next_read(MAX_DELETIONS_WAITING + 1) == Hold(HOLD_BACKPRESSURE)


def test_classes_go_out_highest_first_and_alarms_overtake_the_backlog(
    rig: tuple[Delivery, FakeStore, Glue],
) -> None:
    delivery, store, glue = rig
    store.commit(Priority.HEARTBEAT, 3 * BATCH)
    assert glue.pump() == [1, 2, 3]
    assert delivery.nothing_to_read() is False  # three in flight
    store.commit(Priority.POSITION, 1)
    store.commit(Priority.ALARM, 1)
    for mid in (1, 2, 3):
        delivery.puback(mid)
    assert glue.pump() == [4, 5]
    assert [glue.sent[m][0] for m in (4, 5)] == [Priority.ALARM, Priority.POSITION]


def test_idle_only_with_nothing_in_flight_and_nothing_to_read(
    rig: tuple[Delivery, FakeStore, Glue],
) -> None:
    delivery, store, glue = rig
    assert not delivery.idle
    glue.pump()
    assert delivery.idle  # nothing committed, nothing in flight
    store.commit(Priority.ALARM, 1)
    glue.pump()
    assert not delivery.idle  # one in flight
    assert not delivery.nothing_to_read()
    delivery.puback(1)
    assert not delivery.idle
    glue.pump()
    assert delivery.idle


def test_published_must_follow_a_read() -> None:
    delivery = Delivery()
    with pytest.raises(RuntimeError):
        delivery.published(1, Priority.ALARM, [1])
    delivery.connection_made()
    with pytest.raises(ValueError, match="empty"):
        delivery.published(1, Priority.ALARM, [])
    delivery.published(1, Priority.ALARM, [1])
    with pytest.raises(ValueError, match="in flight"):
        delivery.published(1, Priority.ALARM, [2])


# -- paho's callbacks only queue facts; stats change on the uplink thread -------------


class _NoStore:
    deletions_waiting = 0

    def next_batch(self, *_args: object) -> None:
        return None


class _Reason:
    def __init__(self, failure: bool) -> None:
        self.is_failure = failure

    def __str__(self) -> str:
        return "Not authorized" if self.is_failure else "Success"


def test_paho_callbacks_only_queue_facts() -> None:
    from paho.mqtt.client import DisconnectFlags

    from core.mqtt import BrokerConfig

    fwd = Forwarder("gw-test-0001", BrokerConfig("localhost", tls=False),
                    _NoStore(), _NoStore())  # type: ignore[arg-type]
    before = repr(fwd.stats)
    fwd._on_connect_fail(fwd.client, None)
    fwd._on_disconnect(fwd.client, None, DisconnectFlags(is_disconnect_packet_from_server=False),
                       "lost", None)
    fwd._on_publish(fwd.client, None, 7, _Reason(failure=False), None)
    assert repr(fwd.stats) == before  # nothing written from paho's thread
    events = [fwd._events.get_nowait() for _ in range(3)]
    assert events == [ConnectFailed(), Disconnected("lost"), Published(7, False, "Success")]
    for event in [*events, Connected(session_present=False, session_expiry_s=3600),
                  Published(7, True, "Not authorized")]:
        fwd._apply(event)
    assert fwd.stats.connect_failures == 1
    assert fwd.stats.connects == 1
    assert fwd.stats.connected
    assert fwd.stats.ignored_acks == 2  # neither mid was in flight
    assert fwd.stats.last_error == "disconnected: lost"


# -- random interleavings -------------------------------------------------------------


class DeliveryMachine(RuleBasedStateMachine):
    """Commits, publishes, PUBACKs, refusals, late PUBACKs, disconnects, reconnects."""

    def __init__(self) -> None:
        super().__init__()
        self.delivery = Delivery(window=3, max_deletions_waiting=4)
        self.store = FakeStore()
        self.glue = Glue(self.delivery, self.store)
        self.wire: list[int] = []  # mids published on this connection, PUBACK not yet seen
        self.stale: list[int] = []  # mids published before the last disconnect
        self.accepted: set[int] = set()  # seqs in messages the broker accepted
        self.connection = 0
        self.sent_on: dict[int, int] = {}  # mid -> connection

    def _publish(self) -> None:
        for mid in self.glue.pump():
            self.wire.append(mid)
            self.sent_on[mid] = self.connection

    @rule(prio=st.sampled_from(Priority), n=st.integers(1, 5))
    def commit(self, prio: Priority, n: int) -> None:
        self.store.commit(prio, n)

    @rule()
    def publish(self) -> None:
        self._publish()

    @rule(pick=st.integers(0, 100), accept=st.booleans())
    def puback(self, pick: int, *, accept: bool) -> None:
        if not self.wire:
            return
        mid = self.wire.pop(pick % len(self.wire))
        outcome = self.delivery.puback(mid, refused=not accept, reason="refused")
        prio, seqs = self.glue.sent[mid]
        if accept:
            assert outcome == Delete(mid, prio, seqs[0], seqs[-1], len(seqs), tuple(seqs))
            self.accepted.update(seqs)
            self.store.delete_range(outcome)
        else:
            assert outcome == Refused(mid, prio, len(seqs), "refused")

    @rule(pick=st.integers(0, 100), accept=st.booleans())
    def late_puback(self, pick: int, *, accept: bool) -> None:
        if not self.stale:
            return
        mid = self.stale.pop(pick % len(self.stale))
        assert self.delivery.puback(mid, refused=not accept) == Ignored(mid)

    @rule()
    def writer_catches_up(self) -> None:
        self.store.catch_up()

    @rule()
    def disconnect(self) -> None:
        self.delivery.connection_lost()
        self.stale.extend(self.wire)
        self.wire.clear()

    @rule()
    def reconnect(self) -> None:
        if self.delivery.connected:
            self.disconnect()
        self.connection += 1
        self.delivery.connection_made()

    @rule()
    def broker_accepts_everything(self) -> None:
        """Liveness: reconnect, then the broker accepts every message; the store empties."""
        self.reconnect()
        for _ in range(10_000):
            self._publish()
            if not self.wire and not self.store.waiting:
                break
            while self.wire:
                self.puback(0, accept=True)
            self.store.catch_up()
        assert self.store.queued() == set()
        assert self.accepted == self.store.committed
        self._publish()
        assert self.delivery.idle

    @invariant()
    def only_accepted_seqs_leave_the_store(self) -> None:
        deleted = self.store.committed - self.store.queued()
        assert deleted <= self.accepted

    @invariant()
    def the_window_is_bounded(self) -> None:
        assert self.delivery.in_flight == len(self.wire) <= 3

    @invariant()
    def each_class_goes_out_in_seq_order_on_a_connection(self) -> None:
        last: dict[Priority, int] = {}
        for mid in self.wire:  # published in this order on this connection
            prio, seqs = self.glue.sent[mid]
            assert seqs == sorted(seqs)
            assert seqs[0] > last.get(prio, 0)
            last[prio] = seqs[-1]

    def teardown(self) -> None:
        self.broker_accepts_everything()


DeliveryMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60,
                                             deadline=None)
test_delivery_machine = DeliveryMachine.TestCase
