"""The store writer: the one thread that seals records and owns the store.

Group commit: it takes everything queued (up to :data:`MAX_GROUP`), seals it,
commits it in one fsynced transaction, and only then runs each reading's
``on_committed`` callback (which acknowledges the device). Deletions after a
PUBACK travel through the same queue, so they join the next transaction.

The transaction (and then the WAL's checkpoint) runs on a second thread, ``store-commit``,
while the writer seals the readings queued after the group on the draft that follows
it: the signature, SQLite's steps and the fsync release the GIL, so on two cores the
commit costs the writer little. The next group is handed over only once this one is
committed and finished (the sealer moved on, the ACKs sent: as soon as the commit is
seen, between two records); if the commit failed, the group sealed after it is dropped
(nothing of it was acknowledged or stored) and both are sealed again. Only plain
submissions are sealed ahead; anything that reads the store (health, evictions) or ends
the chain waits until the store is the writer's again, and while commits fail every
commit is waited for.

The linger: at home rates a group is one reading, and every fsync costs the SD card
whole pages. So while readings arrive closer together than :data:`LINGER_S` (a moving
average of their spacing), the writer holds a group open until :data:`LINGER_S` after
its oldest reading was submitted, or until the next reading is not expected before
then: readings a few ms apart share one fsync, and a device's ACK waits at most that
long more (the ACK budget, :data:`ACK_BUDGET_S`, less a commit). An alarm, a flush, a
stop, the final record or a full group (:data:`LINGER_MAX_RECORDS`) commits at once;
so do the gateway's own readings (no device waits for them; they ride along with a
held group); at low rates (readings seconds apart) nothing lingers. A group is held only while a
source (a device, or the gateway itself) active in the last :data:`LINGER_ACTIVE_S` is
not marked quiet. A linger during which nothing arrived marks every active source quiet
for :data:`LINGER_QUIET_S` (a stop-and-wait device sends its next reading only once
this one is acknowledged: waiting for it would only slow it down); a source that
submits while a group is held is not quiet.

When a commit fails (disk full, I/O error) the sealer is rolled back, the
batch is kept and retried after :data:`RETRY_S`: nothing is acknowledged that
is not on disk, and no seq is skipped. The failure is classified (disk full or
another error) and logged once, then every :data:`FAILURE_LOG_S`. While commits
fail, deletions are committed on their own first; when the disk is full (another
process filled it: the quota keeps the store itself below), the store's reserve
file is released so that they can, a ``storage.full`` record says so, and
readings wait (devices keep them) until the filesystem has room again: then the
reserve is re-created, and once the next group has committed, a
``storage.recovered`` record follows it.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from math import inf
from typing import Any

from buffer.seal import Draft, Sealer
from buffer.store import NONCE_BYTES, ROW_OVERHEAD, Evicted, Store, free_bytes, is_disk_full
from core.clock import Clock
from core.devices import device_ledger_key
from core.head import make_head
from core.kinds import Priority
from core.record import JSON, Reading, SealedRecord, Source
from core.suites import Signer

log = logging.getLogger(__name__)

MAX_GROUP = 2000  # readings in one transaction
MAX_DELETES = 5_000  # rows deleted in one transaction: bounds how long an alarm waits
#: Deletions wait up to this long for a transaction of readings to ride along with,
#: unless this many are waiting (or someone flushes): at home rates (a GNSS fix a minute,
#: health every 5 minutes) every deletion rides the next reading's commit, where it costs
#: no block of its own (measured at 60 s: half of the fixes' deletions came due just
#: before the next fix, each a commit of two pages); a commit of ledger entries alone
#: (the state file) does not take them. Delivered rows waiting are not counted as
#: queued (:meth:`StoreWriter.deletions_waiting_by_class`); after a crash they go out
#: again, and the platform keeps one copy of each (gateway, seq).
DELETE_LINGER_S = 300.0
DELETE_BATCH_ROWS = 1_000
RETRY_S = 0.5
#: A device's ACK, from its reading's submission, should leave within this (seconds).
ACK_BUDGET_S = 0.1
#: The longest a group of readings is held open for more to join (half the budget:
#: the rest is the commit and the link).
LINGER_S = 0.05
#: A group this large commits at once: the fsync is already shared (full-speed rates).
LINGER_MAX_RECORDS = 64
#: Weight of the newest spacing in the moving average of submissions' spacing.
LINGER_EWMA = 0.2
#: A source that submitted within this long may submit again (seconds).
LINGER_ACTIVE_S = 1.0
#: A linger during which nothing arrived was wasted: the sources active then are not
#: waited for during this long (seconds; then tried again).
LINGER_QUIET_S = 8.0
#: Sources remembered (last submission, quiet mark); older ones are forgotten first.
LINGER_SOURCES_MAX = 64
#: How much of the error a device.error record of an unsealable reading keeps.
UNSEALABLE_DETAIL_CHARS = 200
#: While commits keep failing, the failure is logged again this often (seconds).
FAILURE_LOG_S = 60.0

#: The store's ledger entry holding the seq of the final record (``submit_final``): once
#: it is committed the writer seals nothing more, across restarts too.
FINAL_LEDGER_KEY = "chain:final_seq"

OnCommitted = Callable[[SealedRecord], None]
#: What a sealed record costs in the store beyond its bytes (nonce, GCM tag, row).
ROW_BYTES = NONCE_BYTES + 16 + ROW_OVERHEAD


def seq_ranges(seqs: list[int]) -> list[list[int]]:
    """[[lo, hi], ...] covering *seqs* exactly."""
    out: list[list[int]] = []
    for seq in sorted(seqs):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def gap_reading(evicted: list[Evicted], source: Source, mono_ns: int) -> Reading:
    """The signed trace of an eviction: which seqs left the buffer unsent, and why."""
    by_class: dict[str, JSON] = dict(Counter(Priority(e.prio).label for e in evicted))
    body: dict[str, JSON] = {
        "reason": "quota",
        "count": len(evicted),
        "by_class": by_class,
        "evicted": seq_ranges([e.seq for e in evicted]),
    }
    return Reading("gap", source, body, mono_ns)


def unsealable(reading: Reading, exc: Exception) -> Reading:
    """The evidence of a reading that cannot be sealed as it is: its kind, why, and its
    body with every value JSON cannot sign (floats, other objects) written as text."""
    body: dict[str, JSON] = {"error": "unsealable", "kind": reading.kind,
                             "detail": str(exc)[:UNSEALABLE_DETAIL_CHARS],
                             "body": _signable(dict(reading.body))}
    return Reading("device.error", reading.source, body, reading.mono_ns,
                   reading.device_event, reading.ledger)


def _signable(value: object) -> JSON:
    if isinstance(value, dict):
        return {str(k): _signable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_signable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return repr(value)


@dataclass(frozen=True, slots=True)
class _Submit:
    """Readings committed together (never split across transactions)."""

    readings: tuple[Reading, ...]
    on_committed: OnCommitted | None  # called with the last record
    forget: tuple[str, ...] = ()  # ledger entries removed in the same transaction
    final: bool = False  # the last reading is the chain's last record
    at: float = field(default_factory=time.monotonic)  # when submitted
    #: committed at the latest then (monotonic s), as ledger entries with a deadline: the
    #: readings of a device whose ACK may wait (a serial window); None: linger rules
    due: float | None = None

    @property
    def urgent(self) -> bool:
        """Committed without lingering: an alarm, the final record."""
        if self.final:
            return True
        for reading in self.readings:
            try:
                if reading.priority == Priority.ALARM:
                    return True
            except KeyError:  # an unknown kind: sealed as device.error, at once
                return True
        return False


def _source(item: _Submit) -> str | None:
    """The device whose reading *item* holds (None: the gateway's own readings)."""
    for reading in item.readings:
        if reading.device_event is not None:
            return reading.device_event[0]
    return None


def _bound(found: dict[Any, float]) -> None:
    """Keep the LINGER_SOURCES_MAX most recent entries of *found*."""
    if len(found) > LINGER_SOURCES_MAX:
        for key in sorted(found, key=found.__getitem__)[: len(found) - LINGER_SOURCES_MAX]:
            del found[key]


@dataclass(frozen=True, slots=True)
class _Ledger:
    """Ledger entries committed without a record (:meth:`StoreWriter.submit_ledger`): with
    the next transaction, or in one of their own at *due* (monotonic s) at the latest."""

    updates: tuple[tuple[str, int], ...]
    on_committed: Callable[[], None] | None
    due: float | None  # None: as soon as a reading would be


def _merged(deletes: list[_Delete]) -> list[tuple[int, int, int]]:
    """The ranges of *deletes*, adjacent ones of a class merged (a class's PUBACKed batches
    follow each other)."""
    out: list[list[int]] = []
    for d in sorted(deletes, key=lambda d: (d.prio, d.lo)):
        if out and out[-1][0] == d.prio and out[-1][2] + 1 >= d.lo:
            out[-1][2] = max(out[-1][2], d.hi)
        else:
            out.append([d.prio, d.lo, d.hi])
    return [(p, lo, hi) for p, lo, hi in out]


def _without_record(done: Callable[[], None]) -> OnCommitted:
    return lambda _rec: done()


@dataclass(frozen=True, slots=True)
class _Delete:
    """Rows of one class with seq in [lo, hi] (a PUBACKed batch: every row of its class
    in that range, since seqs only grow), *rows* of them."""

    prio: int
    lo: int
    hi: int
    rows: int


class _Stop:
    pass


@dataclass(frozen=True, slots=True)
class _Health:
    """Seal a gateway.health record; the writer adds what only the store owner knows."""

    extra: Callable[[], dict[str, JSON]]


#: The body of a key record, given where it lands in the chain: (seq, boot) -> body.
KeyBody = Callable[[int, int], dict[str, JSON]]


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """A ``key.session`` (signed by *session*, as every record after it) or a
    ``key.rotate``; its certificate names the seq it lands at, so the body is made when
    it is sealed."""

    kind: str
    body: KeyBody
    session: Signer | None
    mono_ns: int
    on_committed: OnCommitted | None
    ledger: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event
    deletes_before: int = 0  # deletions received before it: committed when it fires


_Item = _Submit | _Delete | _Barrier | _Health | _KeyRecord | _Ledger


@dataclass
class _Group:
    """Records sealed on a draft, waiting for their transaction."""

    draft: Draft
    records: list[SealedRecord] = field(default_factory=list)
    callbacks: list[tuple[OnCommitted, int]] = field(default_factory=list)  # (callback, index)
    events: dict[str, int] = field(default_factory=dict)  # device ledger entries
    size: int = 0  # bytes in the store
    taken: int = 0  # items of the pending list
    forget: set[str] = field(default_factory=set)  # ledger entries removed
    final: bool = False  # holds the final record: nothing is sealed after it
    ledgers: int = 0  # submit_ledger's items (each counts in the backlog)

    def add(self, reading: Reading, clock: Clock, on_committed: OnCommitted | None = None) -> None:
        ts = clock.timestamp(reading.mono_ns)
        try:
            rec = self.draft.seal(reading, ts)
        except (TypeError, ValueError) as exc:
            # a reading our own code made wrong (a float, an object JSON cannot hold) must
            # not stop the writer nor vanish: it is recorded as what it is
            log.exception("cannot seal a %s reading: recorded as device.error", reading.kind)
            reading = unsealable(reading, exc)
            rec = self.draft.seal(reading, ts)
        self.records.append(rec)
        self.size += len(rec.data) + ROW_BYTES
        event = reading.device_event
        if event is not None:
            self.events[device_ledger_key(event[0])] = event[1]
        if reading.ledger:
            self.events.update(reading.ledger)
            self.forget.difference_update(reading.ledger)  # set again after it was forgotten
        if on_committed is not None:
            self.callbacks.append((on_committed, len(self.records) - 1))


@dataclass
class _Trouble:
    """Commits are failing: since when (monotonic s), why, how often, what was said."""

    since: float
    disk_full: bool
    error: str
    failures: int = 0
    logged_at: float = 0.0
    full_recorded: bool = False  # the storage.full record is committed


@dataclass(eq=False)
class _Flight:
    """A group whose transaction runs on the commit thread; the writer meanwhile seals
    what follows it on a draft after it, and finishes it (advances the sealer, runs the
    callbacks) once it is committed."""

    group: _Group
    items: list[_Item]  # the pending items it took: put back in front if it fails
    deletes: list[_Delete]
    evict: list[Evicted]
    delivered: list[tuple[int, int, int]]
    trouble: _Trouble | None  # commits were failing when it was handed over
    urgent: bool
    done: threading.Event = field(default_factory=threading.Event)  # committed, or failed
    idle: threading.Event = field(default_factory=threading.Event)  # maintained: store free
    error: BaseException | None = None  # of the commit
    maintain_error: BaseException | None = None


@dataclass
class WriterStats:
    committed: int = 0
    deleted: int = 0
    transactions: int = 0
    commit_failures: int = 0
    disk_full: int = 0  # times the disk filled up (storage.full)
    callback_errors: int = 0
    key_failures: int = 0  # key records that could not be certified (logged)
    after_final: int = 0  # readings refused once the final record was committed (logged)
    evicted: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    lingered: int = 0  # transactions held open for more readings to join
    linger_wasted: int = 0  # of them, held open while nothing arrived
    #: The longest a group was planned to stay open after its oldest reading was
    #: submitted (seconds): at most LINGER_S by construction, checked by the tests.
    linger_planned_max_s: float = 0.0
    #: The same for groups holding an alarm (or the final record): 0, they never linger.
    urgent_linger_planned_max_s: float = 0.0
    urgent_groups: int = 0  # transactions with an alarm or the final record


class StoreWriter:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        clock: Clock,
        *,
        on_commit: Callable[[list[SealedRecord]], None] | None = None,
        source: Source | None = None,
        linger_s: float = LINGER_S,
    ) -> None:
        self._gateway_source = source or Source("gateway", sealer.gateway_id)
        self.linger_s = min(linger_s, ACK_BUDGET_S)
        self._spacing = inf  # moving average of the spacing of submissions (seconds)
        self._last_submit: float | None = None
        self._arrived_while_held = 0
        self._held = False  # the pending group was held open (lingered)
        #: source (a device's serial; None: the gateway's own) -> last submission
        self._seen: dict[str | None, float] = {}
        #: source -> until when it is not waited for (monotonic s)
        self._quiet: dict[str | None, float] = {}
        self._store = store
        self._sealer = sealer
        self._clock = clock
        self.on_commit = on_commit
        self._inbox: queue.SimpleQueue[_Item | _Stop] = queue.SimpleQueue()
        self._ledger_lock = threading.Lock()
        self._ledger = store.device_ledger()
        self._deletes: list[_Delete] = []
        self._deletes_received = 0
        self._deletes_since = 0.0
        self._deletes_committed = 0
        # per class, the same two counts (each written by the writer's thread alone)
        self._deletes_received_by = [0] * len(Priority)
        self._deletes_committed_by = [0] * len(Priority)
        self._waiting_barriers: list[_Barrier] = []
        self._trouble: _Trouble | None = None
        #: The seq of the final record once committed (then nothing more is sealed).
        self._final_seq = self._ledger.get(FINAL_LEDGER_KEY)
        self._backlog_lock = threading.Lock()
        self._backlog = 0  # readings submitted and not yet committed
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._stopped = threading.Event()
        #: The commit thread: one transaction at a time, handed over by the writer, which
        #: seals the next group meanwhile (the signature, SQLite's steps and the fsync
        #: release the GIL). The group in flight, and the one whose maintenance (WAL
        #: checkpoint) may still run: the writer touches the store only once it is idle.
        self._jobs: queue.SimpleQueue[_Flight | None] = queue.SimpleQueue()
        self._committer = threading.Thread(target=self._commit_loop, name="store-commit",
                                           daemon=True)
        self._inflight: _Flight | None = None
        self._busy: _Flight | None = None
        self._pending: list[_Item] = []

    # -- API for other threads -------------------------------------------------
    def start(self) -> None:
        self._committer.start()
        self._thread.start()

    def submit(self, reading: Reading, on_committed: OnCommitted | None = None) -> None:
        self._add_backlog(1)
        self._inbox.put(_Submit((reading,), on_committed))

    def submit_all(self, readings: list[Reading], on_committed: OnCommitted | None = None,
                   within_s: float | None = None) -> None:
        """Commit *readings* in one transaction; *on_committed* gets the last record.
        With *within_s* (a device whose ACK may wait: a serial window), they ride the
        next transaction and are committed at the latest *within_s* seconds from now, as
        :meth:`submit_ledger`'s entries; an alarm among them commits at once all the same."""
        if readings:
            self._add_backlog(len(readings))
            due = None if within_s is None else time.monotonic() + within_s
            self._inbox.put(_Submit(tuple(readings), on_committed, due=due))

    def submit_final(self, reading: Reading, on_committed: OnCommitted | None = None) -> None:
        """Seal *reading* as the chain's last record (``gateway.decommissioned``): once it
        is committed (its seq in the ledger, :data:`FINAL_LEDGER_KEY`) every later
        reading, health or key record is refused (counted, logged once: a device keeps
        what is not acknowledged), at this start and every later one. Deletions go on."""
        self._add_backlog(1)
        self._inbox.put(_Submit((reading,), on_committed, final=True))

    def submit_ledger(self, updates: tuple[tuple[str, int], ...],
                      on_committed: Callable[[], None] | None = None,
                      within_s: float | None = None) -> None:
        """Commit ledger entries without a record (a beacon that only extends its tag's
        open interval): they ride along with the next transaction, and are committed on
        their own at the latest *within_s* seconds from now (None: as a reading would
        be). *on_committed* runs once they are durable."""
        due = None if within_s is None else time.monotonic() + within_s
        self._add_backlog(1)  # the ports' backpressure counts it as a reading
        self._inbox.put(_Ledger(updates, on_committed, due))

    def forget(self, keys: tuple[str, ...], reading: Reading | None = None,
               on_committed: OnCommitted | None = None, *,
               more: tuple[Reading, ...] = ()) -> None:
        """Remove the ledger entries *keys* (an unpaired device's) in one transaction with
        *reading* (the record saying so) and *more* after it, or alone."""
        readings = (() if reading is None else (reading,)) + more
        self._add_backlog(len(readings))
        self._inbox.put(_Submit(readings, on_committed, forget=keys))

    @property
    def final_seq(self) -> int | None:
        """The seq of the final record, once committed (any thread)."""
        return self._final_seq

    @property
    def last_seq(self) -> int:
        """The seq of the last committed record (any thread: a plain integer)."""
        return self._sealer.last_seq

    def ledger_items(self, prefix: str, limit: int, after: str = "") -> list[tuple[str, int]]:
        """At most *limit* ledger entries whose key starts with *prefix* and sorts after
        *after*, by key (a caller walks them *limit* at a time)."""
        with self._ledger_lock:
            found = sorted(item for item in self._ledger.items()
                           if item[0].startswith(prefix) and item[0] > after)
        return found[:limit]

    @property
    def backlog(self) -> int:
        """Readings submitted and not yet committed (any thread): the ports stop reading
        above a bound (``firmware_bridge.framed``), so this queue stays bounded."""
        with self._backlog_lock:
            return self._backlog

    def _add_backlog(self, readings: int) -> None:
        with self._backlog_lock:
            self._backlog += readings

    def submit_health(self, extra: Callable[[], dict[str, JSON]]) -> None:
        """Queue a gateway.health record: buffer depth and age per class, evictions,
        commit failures, and whatever *extra()* (called on the writer's thread) adds."""
        self._add_backlog(1)
        self._inbox.put(_Health(extra))

    def key_record(self, kind: str, body: KeyBody, *, session: Signer | None, mono_ns: int,
                   on_committed: OnCommitted | None = None,
                   ledger: tuple[tuple[str, int], ...] = ()) -> None:
        """Seal a key record: ``key.session`` with *session* (which signs it and every
        later record) or ``key.rotate`` (*session* None). *body(seq, boot)* is called on
        the writer's thread when its seq is known (a certificate names it); if it fails,
        the key record is left out (logged, counted) and the current key goes on.
        *on_committed* runs once it is durable; *ledger* entries commit with it."""
        self._add_backlog(1)
        self._inbox.put(_KeyRecord(kind, body, session, mono_ns, on_committed, ledger))

    def delete_range(self, prio: int, lo: int, hi: int, rows: int) -> None:
        """Delete the rows of class *prio* with seq in [lo, hi] (forwarded and PUBACKed)."""
        self._inbox.put(_Delete(prio, lo, hi, rows))

    @property
    def disk_full(self) -> bool:
        """Whether commits are failing because the disk is full (read from other threads)."""
        trouble = self._trouble
        return trouble is not None and trouble.disk_full

    @property
    def deletions_waiting(self) -> int:
        """Rows PUBACKed and not yet deleted (read from other threads: a plain integer)."""
        return self._deletes_received - self._deletes_committed

    def deletions_waiting_by_class(self) -> dict[Priority, int]:
        """Per class, rows delivered (PUBACKed) whose deletion waits for a commit to ride
        (read from other threads: they are no longer queued)."""
        received, committed = list(self._deletes_received_by), list(self._deletes_committed_by)
        return {p: received[p] - committed[p] for p in Priority if received[p] > committed[p]}

    def last_committed_event(self, serial: str) -> int | None:
        """The last device event committed for *serial* (the links' duplicate filter)."""
        with self._ledger_lock:
            found = self._ledger.get(device_ledger_key(serial))
            if found is None and ":" not in serial:  # a store from before the prefix
                found = self._ledger.get(serial)
            return found

    def head_line(self, before: bytes | None = None) -> bytes | None:
        """The signed head statement of the chain as committed now (core/head.py): called
        by the uplink for every message, with *before* the message's bytes that precede
        it, which it covers. None before the first key.session."""
        sealer = self._sealer
        key = sealer.signing_key
        if key is None:
            return None
        # read without the writer's lock: a head may name the seq of a key.session whose
        # key it is not signed with yet; it says only that so much is committed
        return make_head(sealer.gateway_id, sealer.boot, sealer.last_seq,
                         self._clock.now_ns() // 1_000_000, key, before=before)

    def ledger_value(self, key: str) -> int | None:
        """A value the gateway committed in the ledger with a reading (``Reading.ledger``:
        a tag's counter, the clock's floor, ...); never a device's event."""
        with self._ledger_lock:
            return self._ledger.get(key)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted before this call is committed."""
        done = threading.Event()
        self._inbox.put(_Barrier(done))
        return done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop."""
        self._inbox.put(_Stop())
        self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._inflight is not None:  # an exception: the store is left as it is
                self._inflight.done.wait()
            self._jobs.put(None)
            self._committer.join()

    def _commit_loop(self) -> None:
        """The commit thread: each group's transaction, then the store's maintenance."""
        while (flight := self._jobs.get()) is not None:
            group = flight.group
            try:
                self._store.commit(group.records, device_events=group.events,
                                   delete_ranges=[(d.prio, d.lo, d.hi) for d in flight.deletes],
                                   evict=flight.evict, forget=group.forget, maintain=False,
                                   delivered=flight.delivered)
            except BaseException as exc:  # noqa: BLE001 (the writer's thread counts or raises it)
                flight.error = exc
            flight.done.set()
            if flight.error is None:
                try:  # the ACKs are on their way: a checkpoint delays none
                    self._store.maintain()
                except BaseException as exc:  # noqa: BLE001 (raised on the writer's thread)
                    flight.maintain_error = exc
            flight.idle.set()

    def _loop(self) -> None:
        stopping = False
        pending = self._pending
        due = 0.0  # when the pending group commits (monotonic s)
        while True:
            # nothing to seal meanwhile: the group in flight is finished (its ACKs sent)
            # before the writer waits for anything
            if (self._inflight is not None and self._inbox.empty()
                    and not (pending and due <= time.monotonic())
                    and not self._finish_flight(requeue=True)):
                if stopping:
                    log.error("store writer stopping with %d items not committed",
                              len(pending))
                    return
                self._stopped.wait(RETRY_S)
                continue
            try:
                if stopping or (pending and due <= time.monotonic()):
                    item = self._inbox.get_nowait()
                elif pending or self._deletes:
                    wake = due if pending else time.monotonic() + self._deletes_due_in()
                    if pending and self._deletes:  # held: deletions may come due first
                        wake = min(wake, time.monotonic() + self._deletes_due_in())
                    item = self._inbox.get(timeout=max(0.0, wake - time.monotonic()))
                else:
                    item = self._inbox.get()
                while True:
                    if isinstance(item, _Stop):
                        stopping = True
                    elif isinstance(item, _Delete):
                        # deletions commute with everything else: they wait so that
                        # new readings (an alarm) never queue behind a drained backlog,
                        # and at low rates they ride along with the next readings
                        if not self._deletes:
                            self._deletes_since = time.monotonic()
                        self._deletes.append(item)
                        self._deletes_received += item.rows
                        self._deletes_received_by[item.prio] += item.rows
                    elif isinstance(item, _Barrier):
                        pending.append(_Barrier(item.done, self._deletes_received))
                    elif self._final_seq is not None:
                        self._refuse(item)  # after the final record: nothing is sealed
                    else:
                        if isinstance(item, _Submit) and item.due is None:
                            self._arrived(item, held=self._held)
                            self._arrived_while_held += self._held
                        pending.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if not pending and not self._deletes:
                if stopping and self._inflight is None:
                    self._wait_idle()
                    return
                continue
            if not pending and not stopping and self._deletes_due_in() > 0:
                continue  # deletions alone: not worth an fsync yet
            if pending and not stopping:
                due = self._group_due(pending)
                if due > time.monotonic() and not (self._deletes and
                                                   self._deletes_due_in() <= 0):
                    # held open: more readings are expected within the linger, or ledger
                    # entries alone wait for company until their deadline
                    self._held = self._held or any(isinstance(i, _Submit) for i in pending)
                    continue
            consumed = self._commit(pending)
            if consumed >= 0:
                del pending[:consumed]
                if self._final_seq is not None:  # the final record went in with it
                    for item in [i for i in pending if not isinstance(i, _Barrier)]:
                        pending.remove(item)
                        self._refuse(item)
            elif stopping:
                log.error("store writer stopping with %d items not committed", len(pending))
                self._wait_idle()
                return
            else:
                self._stopped.wait(RETRY_S)

    def _linger_done(self, *, gained: bool) -> None:
        """A held group committed: if nothing arrived while it was held, every source
        active lately is marked quiet (for LINGER_QUIET_S)."""
        self.stats.lingered += 1
        self._arrived_while_held = 0
        if gained:
            return
        self.stats.linger_wasted += 1
        now = time.monotonic()
        for source, seen in self._seen.items():
            if now - seen <= LINGER_ACTIVE_S + self.linger_s:
                self._quiet[source] = now + LINGER_QUIET_S
        _bound(self._quiet)

    def _arrived(self, item: _Submit, *, held: bool) -> None:
        """A submission: the moving average of their spacing, its source's last
        submission; joining a held group, its source is not quiet."""
        at = item.at
        if self._last_submit is not None:
            gap = max(0.0, at - self._last_submit)
            self._spacing = (gap if self._spacing == inf
                             else (1 - LINGER_EWMA) * self._spacing + LINGER_EWMA * gap)
        self._last_submit = at
        source = _source(item)
        if held:
            self._quiet.pop(source, None)
        self._seen[source] = at
        _bound(self._seen)

    def _may_join(self, now: float) -> bool:
        """Whether a source active lately and not quiet may submit before the group
        commits."""
        return any(now - seen <= LINGER_ACTIVE_S and self._quiet.get(source, 0.0) < now
                   for source, seen in self._seen.items())

    def _group_due(self, pending: list[_Item]) -> float:
        """When the pending group commits (monotonic s): at once for an alarm, a flush,
        a full group, or when the next reading is not expected (at the readings' mean
        spacing) before :attr:`linger_s` after the group's oldest submission; otherwise
        then. Recorded in the stats.

        Ledger entries and readings with a deadline (:meth:`submit_ledger`,
        :meth:`submit_all` with *within_s*: a windowed device, whose ACK may wait) wait
        until their earliest deadline; with other readings they commit with them, and
        never make them wait longer."""
        oldest = inf
        records = 0
        urgent = False
        ledger_due = inf  # the earliest deadline of ledger entries
        only_ledger = True  # every pending item is ledger entries with a deadline
        for item in pending:
            if isinstance(item, _Submit):
                if _source(item) is not None and item.due is None:
                    oldest = min(oldest, item.at)  # the gateway's own readings never linger
                records += len(item.readings)
                urgent = urgent or item.urgent
            elif isinstance(item, _Barrier):
                urgent = True  # someone waits for the commit (flush)
            else:
                records += 1
            if isinstance(item, (_Ledger, _Submit)) and item.due is not None:
                ledger_due = min(ledger_due, item.due)
            else:
                only_ledger = False
        now = time.monotonic()
        if oldest != inf:
            due = oldest + self.linger_s
            if (urgent or records >= LINGER_MAX_RECORDS or self._trouble is not None
                    or now + self._spacing > due or not self._may_join(now)):
                due = now  # nobody else is expected before the deadline: no use waiting
            due = min(due, ledger_due)
        elif (only_ledger and not urgent and records < LINGER_MAX_RECORDS
              and self._trouble is None):
            due = ledger_due
        else:
            due = now
        # due - oldest is at most the linger by construction; (oldest + linger) - oldest
        # may come back a few ulps above it in floating point
        planned = min(self.linger_s, max(0.0, due - oldest)) if oldest != inf else 0.0
        if urgent and any(isinstance(i, _Submit) and i.urgent for i in pending):
            self.stats.urgent_linger_planned_max_s = max(
                self.stats.urgent_linger_planned_max_s, planned if due > now else 0.0)
        elif due > now:
            self.stats.linger_planned_max_s = max(self.stats.linger_planned_max_s, planned)
        return due

    def _commit(self, pending: list[_Item]) -> int:
        """Seal a prefix of *pending* and hand it, with up to :data:`MAX_DELETES` queued
        deletions, to the commit thread as one transaction; how many items of *pending*
        it took (-1: a commit failed, and nothing moved: the sealer advances only after a
        commit). While the group before it is in flight, its readings are sealed on the
        draft after that group's; it is handed over only once that group is committed
        and finished (its ACKs sent), and dropped if that commit failed (its items are
        then back in front of *pending*). While commits fail, every commit is waited for,
        deletions go first on their own, and on a full disk readings wait until there is
        room again."""
        ahead: _Group | None = None
        flight = self._inflight
        if flight is not None:
            if (self._trouble is None and flight.trouble is None and not flight.group.final
                    and self._final_seq is None):
                ahead = self._seal_ahead(pending, flight)
                if ahead is None:  # the flight failed while the next group was sealed
                    return -1
            if self._inflight is not None and not self._finish_flight(requeue=True):
                return -1
            if ahead is not None and (not ahead.taken
                                      or ahead.draft.base_seq != self._sealer.last_seq):
                ahead = None  # nothing sealed ahead (or a chain that moved: sealed again)
        self._wait_idle()
        trouble = self._trouble
        if trouble is not None:
            self._relieve(trouble)
            if trouble.disk_full and not self._store.restore_reserve():
                return -1  # no room yet
        group = ahead if ahead is not None else self._seal_group(pending)
        # ledger entries alone go to the state file: deletions wait for a reading, unless due
        deletes = self._take_deletes() if (group.records or group.forget or not pending
                                           or self._deletes_due_in() <= 0) else []
        # nothing after the final record, not even a gap record
        evict = [] if self._final_seq is not None else self._store.plan_eviction(group.size)
        if evict:
            gap = gap_reading(evict, self._gateway_source, self._clock.now_ns())
            group.records.append(group.draft.seal(gap, self._clock.timestamp(gap.mono_ns)))
        taken = pending[: group.taken]
        if self._held:
            self._linger_done(gained=self._arrived_while_held > 0)
            self._held = False
        self._inflight = _Flight(
            group, taken, deletes, evict, [] if deletes else _merged(self._deletes), trouble,
            any(isinstance(i, _Submit) and i.urgent for i in taken))
        self._jobs.put(self._inflight)
        if trouble is not None or group.final:
            # while commits fail each is waited for (a retry every RETRY_S); after the
            # final record nothing is sealed
            return group.taken if self._finish_flight(requeue=False) else -1
        return group.taken

    def _finish_flight(self, *, requeue: bool) -> bool:
        """Wait for the group in flight to be committed, then move the sealer on and run
        the listeners; False if its commit failed (counted, logged; its items are put
        back in front of the pending ones if *requeue*: they had been taken)."""
        flight = self._inflight
        if flight is None:
            return True
        self._inflight = None
        flight.done.wait()
        self._busy = flight
        error = flight.error
        if error is not None:
            self._wait_idle()
            if not isinstance(error, sqlite3.Error):
                raise error
            if requeue:
                self._pending[:0] = flight.items
            self._failed(error, len(flight.group.records))
            return False
        self._sealer.advance(flight.group.draft)
        # counted before the listeners run: one that reads the stats sees this group
        self.stats.urgent_groups += flight.urgent
        self._committed(flight.group, flight.deletes, flight.evict)
        if any(isinstance(i, _Barrier) for i in flight.items):
            self._wait_idle()  # a flush returns once the store is maintained too
        self._release_barriers(flight.items)
        trouble = flight.trouble
        if trouble is not None and self._trouble is trouble:
            self._trouble = None
            log.warning("commits work again after %.1f s and %d failures%s",
                        time.monotonic() - trouble.since, trouble.failures,
                        ": room on the disk again, recording resumes" if trouble.disk_full
                        else "")
            if trouble.disk_full:
                self._wait_idle()
                self._record_storage("storage.recovered", trouble)
        return True

    def _wait_idle(self) -> None:
        """Wait until the commit thread is done with the store (the last group's commit
        and maintenance): the writer's thread uses the store only then."""
        busy = self._busy
        if busy is None:
            return
        busy.idle.wait()
        self._busy = None
        if busy.maintain_error is not None:
            raise busy.maintain_error

    def _failed(self, exc: sqlite3.Error, records: int) -> None:
        """Count a failed commit; log it when it starts, changes cause, or every
        :data:`FAILURE_LOG_S` (never once per retry)."""
        self.stats.commit_failures += 1
        full = is_disk_full(exc)
        now = time.monotonic()
        trouble = self._trouble
        if trouble is None or trouble.disk_full != full:
            trouble = self._trouble = _Trouble(trouble.since if trouble else now, full, str(exc))
            if full:
                self.stats.disk_full += 1
                log.error("disk full: commit of %d records failed (%s) on the filesystem of "
                          "%s (%d bytes free): devices stay unacknowledged, deletions go on, "
                          "recording resumes once there is room", records, exc,
                          self._store.path.parent, free_bytes(self._store.path))
            else:
                log.error("commit of %d records failed: %s (an I/O error, not a full disk): "
                          "devices stay unacknowledged, retrying every %.1fs", records, exc,
                          RETRY_S)
            trouble.logged_at = now
        elif now - trouble.logged_at >= FAILURE_LOG_S:
            trouble.logged_at = now
            log.error("commits still failing after %.0f s (%d failures): %s",
                      now - trouble.since, trouble.failures, exc)
        trouble.failures += 1
        trouble.error = str(exc)

    def _relieve(self, trouble: _Trouble) -> None:
        """While commits fail: commit the queued deletions on their own (the reserve
        released first when the disk is full), then the ``storage.full`` record."""
        if trouble.disk_full:
            released = self._store.release_reserve()
            if released:
                log.warning("released the store's reserve file (%d bytes) so that "
                            "deletions can commit", released)
        while self._deletes:
            deletes = self._take_deletes()
            try:
                self._store.commit([], delete_ranges=[(d.prio, d.lo, d.hi) for d in deletes])
            except sqlite3.Error as exc:
                self._failed(exc, 0)
                return
            self._committed(_Group(self._sealer.draft()), deletes, [])
            self._release_barriers([])
        if trouble.disk_full and not trouble.full_recorded:
            trouble.full_recorded = self._record_storage("storage.full", trouble)

    def _record_storage(self, kind: str, trouble: _Trouble) -> bool:
        """Commit a ``storage.full`` or ``storage.recovered`` record in a transaction of
        its own; False if that failed too."""
        if self._final_seq is not None:
            return True  # nothing after the final record
        group = _Group(self._sealer.draft())
        group.add(self._storage_reading(kind, trouble), self._clock)
        try:
            self._store.commit(group.records)
        except sqlite3.Error as exc:
            self._failed(exc, 1)
            return False
        self._sealer.advance(group.draft)
        self.stats.transactions += 1
        self.stats.committed += 1
        self.stats.by_kind[kind] += 1
        if self.on_commit is not None:
            self._call(self.on_commit, group.records)
        return True

    def _storage_reading(self, kind: str, trouble: _Trouble) -> Reading:
        """``storage.full`` (what failed) or ``storage.recovered`` (after how long; sealed
        after the first group that committed again)."""
        body: dict[str, JSON] = {
            "reason": "disk_full",
            "error": trouble.error,
            "failures": trouble.failures,
            "free_bytes": free_bytes(self._store.path),
            "store_bytes": self._store.used_bytes,
            "quota_bytes": self._store.quota_bytes,
        }
        if kind == "storage.recovered":
            body["full_ms"] = int((time.monotonic() - trouble.since) * 1000)
        return Reading(kind, self._gateway_source, body, self._clock.now_ns())

    def _seal_group(self, pending: list[_Item]) -> _Group:
        """Seal a prefix of *pending* on a draft: at most :data:`MAX_GROUP` records and,
        under a quota, about a quarter of it in bytes. A health record opens its own group
        (it reports committed state)."""
        limit = self._store.limits.group_bytes if self._store.quota_bytes else None
        group = _Group(self._sealer.draft())
        for item in pending:
            if (limit is not None and group.size > limit) or len(group.records) >= MAX_GROUP:
                break
            if isinstance(item, _Health) and group.taken:
                break
            group.taken += 1
            if isinstance(item, _Submit):  # the common case first
                for reading in item.readings:
                    group.add(reading, self._clock)
                if item.on_committed is not None and item.readings:
                    group.callbacks.append((item.on_committed, len(group.records) - 1))
                for key in item.forget:
                    group.events.pop(key, None)
                    group.forget.add(key)
                if item.final and item.readings:
                    group.events[FINAL_LEDGER_KEY] = group.records[-1].seq
                    group.final = True
                    break  # the chain ends here
            elif isinstance(item, _Ledger):
                group.ledgers += 1
                group.events.update(item.updates)
                group.forget.difference_update(k for k, _ in item.updates)
                if item.on_committed is not None:  # in submission order with the others
                    group.callbacks.append((_without_record(item.on_committed), -1))
            elif isinstance(item, _Health):
                group.add(self._health_reading(item), self._clock)
            elif isinstance(item, _KeyRecord):
                self._add_key_record(group, item)
        return group

    def _seal_ahead(self, pending: list[_Item], flight: _Flight) -> _Group | None:
        """While *flight* commits: seal the readings at the head of *pending* (plain
        submissions only, within :meth:`_seal_group`'s bounds) on a draft after its
        group's. The flight is finished as soon as it is committed, so that its ACKs do
        not wait for this group; None if its commit failed (this group is dropped)."""
        after = flight.group.draft
        group = _Group(Draft(after.gateway_id, after.key, boot=after.boot,
                             last_seq=after.last_seq, last_digest=after.last_digest))
        limit = self._store.limits.group_bytes if self._store.quota_bytes else None
        records = group.records
        for item in pending:
            if (limit is not None and group.size > limit) or len(records) >= MAX_GROUP:
                break
            if type(item) is not _Submit or item.final:
                break  # anything else is sealed once the store is the writer's again
            if (self._inflight is flight and flight.done.is_set()
                    and not self._finish_flight(requeue=True)):
                return None
            group.taken += 1
            for reading in item.readings:
                group.add(reading, self._clock)
            if item.on_committed is not None and item.readings:
                group.callbacks.append((item.on_committed, len(records) - 1))
            for key in item.forget:
                group.events.pop(key, None)
                group.forget.add(key)
        return group

    def _add_key_record(self, group: _Group, item: _KeyRecord) -> None:
        draft = group.draft
        try:
            body = item.body(draft.last_seq + 1, draft.boot)
        except Exception:  # a TPM that stopped answering: keep signing with the current key
            log.exception("cannot certify the %s record: the current key goes on", item.kind)
            self.stats.key_failures += 1
            return
        previous = draft.key
        if item.session is not None:
            draft.use_key(item.session)
        try:
            group.add(Reading(item.kind, self._gateway_source, body, item.mono_ns,
                              ledger=item.ledger), self._clock, item.on_committed)
        except Exception:
            if previous is not None:
                draft.use_key(previous)
            raise

    def _take_deletes(self) -> list[_Delete]:
        """The queued deletions that fit in one transaction (at least one)."""
        deletes: list[_Delete] = []
        rows = 0
        for d in self._deletes:
            if deletes and rows + d.rows > MAX_DELETES:
                break
            deletes.append(d)
            rows += d.rows
        return deletes

    def _committed(self, group: _Group, deletes: list[_Delete], evict: list[Evicted]) -> None:
        """After the commit: bookkeeping, the device ledger, then the listeners."""
        rows = sum(d.rows for d in deletes)
        del self._deletes[: len(deletes)]
        self._deletes_committed += rows
        for d in deletes:
            self._deletes_committed_by[d.prio] += d.rows
        with self._ledger_lock:
            self._ledger.update(group.events)
            for key in group.forget:
                self._ledger.pop(key, None)
        if group.final:
            self._final_seq = group.events[FINAL_LEDGER_KEY]
            log.warning("the final record (seq %d) is committed: nothing more is sealed",
                        self._final_seq)
        self.stats.transactions += 1
        self.stats.committed += len(group.records)
        # every record of the group was submitted (one per health or rotation request)
        # but the gap record the writer adds itself when it evicts
        self._add_backlog(-(len(group.records) - bool(evict) + group.ledgers))
        self.stats.deleted += rows
        self.stats.evicted.update(Priority(e.prio).label for e in evict)
        if evict:
            log.warning("quota reached: evicted %d records (%s); a gap record says so",
                        len(evict), dict(self.stats.evicted))
        self.stats.by_kind.update(rec.kind for rec in group.records)
        for callback, index in group.callbacks:
            self._call(callback, group.records[index] if index >= 0 else None)
        if (group.records or deletes) and self.on_commit is not None:
            # also after deletions alone: a forwarder held back by backpressure resumes
            self._call(self.on_commit, group.records)

    def _refuse(self, item: _Item) -> None:
        """A reading (or health, key record) that came after the final record: not sealed,
        counted, logged once (a device keeps what is not acknowledged)."""
        count = len(item.readings) if isinstance(item, _Submit) else 1
        self._add_backlog(-count)
        if not self.stats.after_final:
            log.warning("readings after the final record (seq %s) are not sealed: the "
                        "gateway is decommissioned", self._final_seq)
        self.stats.after_final += count

    def _deletes_due_in(self) -> float:
        """Seconds before queued deletions deserve a transaction of their own (0: now)."""
        if (self.deletions_waiting >= DELETE_BATCH_ROWS or self._waiting_barriers
                or self._final_seq is not None):  # decommissioning watches the rows go
            return 0.0
        return max(0.0, self._deletes_since + DELETE_LINGER_S - time.monotonic())

    def _release_barriers(self, items: list[_Item]) -> None:
        """Set each barrier whose deletions are all committed; keep the others waiting."""
        self._waiting_barriers.extend(i for i in items if isinstance(i, _Barrier))
        still = []
        for barrier in self._waiting_barriers:
            if self._deletes_committed >= barrier.deletes_before:
                barrier.done.set()
            else:
                still.append(barrier)
        self._waiting_barriers = still

    def _health_reading(self, item: _Health) -> Reading:
        body: dict[str, JSON] = {
            "buffer": self._store.health(),
            "used_bytes": self._store.used_bytes,
            "quota_bytes": self._store.quota_bytes,
            "evicted": dict(self.stats.evicted),
            "commit_failures": self.stats.commit_failures,
            "key_failures": self.stats.key_failures,  # session keys the TPM did not certify
            "disk_full": self.stats.disk_full,
            "committed": self.stats.committed,
        }
        try:
            body.update(item.extra())
        except Exception:
            log.exception("health: a contributor failed")
        return Reading("gateway.health", self._gateway_source, body, self._clock.now_ns())

    def _call(self, fn: Callable[[Any], None], arg: object) -> None:
        try:
            fn(arg)
        except Exception:
            # One faulty listener must not stop the writer; it is counted and logged.
            self.stats.callback_errors += 1
            log.exception("commit listener failed")
