"""The store writer: the one thread that seals records and owns the store.

Group commit: it takes everything queued (up to :data:`MAX_GROUP`), seals it,
commits it in one fsynced transaction, and only then runs each reading's
``on_committed`` callback (which acknowledges the device). Deletions after a
PUBACK travel through the same queue, so they join the next transaction.

When a commit fails (disk full, I/O error) the sealer is rolled back, the
batch is kept and retried after :data:`RETRY_S`: nothing is acknowledged that
is not on disk, and no seq is skipped.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from buffer.record import (
    JSON,
    Priority,
    Reading,
    SealedRecord,
    Sealer,
    Source,
    rotation_body,
)
from buffer.store import NONCE_BYTES, ROW_OVERHEAD, Evicted, Store
from smartcorr.clock import Clock

log = logging.getLogger(__name__)

MAX_GROUP = 2000  # readings in one transaction
MAX_DELETES = 5_000  # rows deleted in one transaction: bounds how long an alarm waits
#: Deletions wait up to this long for a transaction of readings to ride along with,
#: unless this many are waiting: at low rates it halves the fsyncs (the SD card).
DELETE_LINGER_S = 1.0
DELETE_BATCH_ROWS = 1_000
RETRY_S = 0.5

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
    by_class: dict[str, JSON] = {}
    for e in evicted:
        label = Priority(e.prio).label
        by_class[label] = int(by_class.get(label, 0)) + 1
    body: dict[str, JSON] = {
        "reason": "quota",
        "count": len(evicted),
        "by_class": by_class,
        "evicted": seq_ranges([e.seq for e in evicted]),
    }
    return Reading("gap", source, body, mono_ns)


@dataclass(frozen=True, slots=True)
class _Submit:
    """Readings committed together (never split across transactions)."""

    readings: tuple[Reading, ...]
    on_committed: OnCommitted | None  # called with the last record


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


@dataclass(frozen=True, slots=True)
class _Rotate:
    """Announce *key* in a record signed by the current key, then sign with *key*."""

    key: Ed25519PrivateKey
    on_committed: OnCommitted | None


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event
    deletes_before: int = 0  # deletions received before it: committed when it fires


_Item = _Submit | _Delete | _Barrier | _Health | _Rotate


@dataclass
class WriterStats:
    committed: int = 0
    deleted: int = 0
    transactions: int = 0
    commit_failures: int = 0
    callback_errors: int = 0
    evicted: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)


class StoreWriter:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        clock: Clock,
        *,
        on_commit: Callable[[list[SealedRecord]], None] | None = None,
        source: Source | None = None,
    ) -> None:
        self._gateway_source = source or Source("gateway", sealer.gateway_id)
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
        self._waiting_barriers: list[_Barrier] = []
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._stopped = threading.Event()

    # -- API for other threads -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, reading: Reading, on_committed: OnCommitted | None = None) -> None:
        self._inbox.put(_Submit((reading,), on_committed))

    def submit_all(self, readings: list[Reading], on_committed: OnCommitted | None = None) -> None:
        """Commit *readings* in one transaction; *on_committed* gets the last record."""
        if readings:
            self._inbox.put(_Submit(tuple(readings), on_committed))

    def submit_health(self, extra: Callable[[], dict[str, JSON]]) -> None:
        """Queue a gateway.health record: buffer depth and age per class, evictions,
        commit failures, and whatever *extra()* (called on the writer's thread) adds."""
        self._inbox.put(_Health(extra))

    def rotate_key(self, key: Ed25519PrivateKey, on_committed: OnCommitted | None = None) -> None:
        """Key rotation: a ``key.rotate`` record signed by the current key announces *key*;
        every later record is signed by *key*. *on_committed* runs once that is durable."""
        self._inbox.put(_Rotate(key, on_committed))

    def delete_range(self, prio: int, lo: int, hi: int, rows: int) -> None:
        """Delete the rows of class *prio* with seq in [lo, hi] (forwarded and PUBACKed)."""
        self._inbox.put(_Delete(prio, lo, hi, rows))

    @property
    def deletions_waiting(self) -> int:
        """Rows PUBACKed and not yet deleted (read from other threads: a plain integer)."""
        return self._deletes_received - self._deletes_committed

    def last_committed_event(self, serial: str) -> int | None:
        """The last device event committed for *serial* (the links' duplicate filter)."""
        with self._ledger_lock:
            return self._ledger.get(serial)

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
        stopping = False
        pending: list[_Item] = []
        while True:
            try:
                if pending or stopping:
                    item = self._inbox.get_nowait()
                elif self._deletes and not stopping:
                    item = self._inbox.get(timeout=self._deletes_due_in())
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
                    elif isinstance(item, _Barrier):
                        pending.append(_Barrier(item.done, self._deletes_received))
                    else:
                        pending.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if not pending and not self._deletes:
                if stopping:
                    return
                continue
            if not pending and not stopping and self._deletes_due_in() > 0:
                continue  # deletions alone: not worth an fsync yet
            consumed = self._commit(pending)
            if consumed >= 0:
                del pending[:consumed]
            elif stopping:
                log.error("store writer stopping with %d items not committed", len(pending))
                return
            else:
                self._stopped.wait(RETRY_S)

    def _commit(self, pending: list[_Item]) -> int:
        """Seal and commit a prefix of *pending*, and up to :data:`MAX_DELETES` queued
        deletions, in one transaction; how many items of *pending* it took (-1: the
        commit failed). A group holds at most :data:`MAX_GROUP` readings and, under a
        quota, a quarter of it."""
        saved = (self._sealer.last_seq, self._sealer.last_digest, self._sealer.signing_key)
        limit = self._store.quota_bytes // 4 if self._store.quota_bytes else None
        callbacks: list[tuple[OnCommitted, int]] = []  # (callback, index of its record)
        events: dict[str, int] = {}
        sealed: list[SealedRecord] = []
        size = 0
        taken = 0
        for item in pending:
            if (limit is not None and size > limit) or len(sealed) >= MAX_GROUP:
                break
            if isinstance(item, _Health) and taken:
                break  # a health record opens its own group: it reports committed state
            taken += 1
            if isinstance(item, _Health):
                item = _Submit((self._health_reading(item),), None)  # noqa: PLW2901
            new_key = item.key if isinstance(item, _Rotate) else None
            if isinstance(item, _Rotate):
                body = rotation_body(item.key.public_key())
                reading = Reading("key.rotate", self._gateway_source, body, time.monotonic_ns())
                item = _Submit((reading,), item.on_committed)  # noqa: PLW2901
            if isinstance(item, _Submit):
                for reading in item.readings:
                    rec = self._sealer.seal(reading, self._clock.timestamp(reading.mono_ns))
                    sealed.append(rec)
                    size += len(rec.data) + ROW_BYTES
                    if reading.device_event is not None:
                        events[reading.device_event[0]] = reading.device_event[1]
                    events.update(reading.ledger)
                if item.on_committed is not None:
                    callbacks.append((item.on_committed, len(sealed) - 1))
                if new_key is not None:
                    self._sealer.use_key(new_key)
        deletes: list[_Delete] = []
        rows = 0
        for d in self._deletes:
            if deletes and rows + d.rows > MAX_DELETES:
                break
            deletes.append(d)
            rows += d.rows
        items = pending[:taken]
        evict = self._store.plan_eviction(size)
        if evict:
            gap = gap_reading(evict, self._gateway_source, time.monotonic_ns())
            sealed.append(self._sealer.seal(gap, self._clock.timestamp(gap.mono_ns)))
        try:
            self._store.commit(sealed, device_events=events,
                               delete_ranges=[(d.prio, d.lo, d.hi) for d in deletes], evict=evict)
        except sqlite3.Error as exc:
            self._sealer.last_seq, self._sealer.last_digest = saved[0], saved[1]
            self._sealer.use_key(saved[2])
            self.stats.commit_failures += 1
            log.error(  # noqa: TRY400 - the cause is in the message; no traceback wanted
                "commit of %d records failed (%s); devices stay unacknowledged, retrying in %.1fs",
                len(sealed), exc, RETRY_S,
            )
            return -1
        del self._deletes[: len(deletes)]
        self._deletes_committed += rows
        with self._ledger_lock:
            self._ledger.update(events)
        self.stats.transactions += 1
        self.stats.committed += len(sealed)
        self.stats.deleted += rows
        for e in evict:
            label = Priority(e.prio).label
            self.stats.evicted[label] = self.stats.evicted.get(label, 0) + 1
        if evict:
            log.warning("quota reached: evicted %d records (%s); a gap record says so",
                        len(evict), self.stats.evicted)
        for rec in sealed:
            self.stats.by_kind[rec.kind] = self.stats.by_kind.get(rec.kind, 0) + 1
        for callback, index in callbacks:
            self._call(callback, sealed[index])
        if (sealed or deletes) and self.on_commit is not None:
            # also after deletions alone: a forwarder held back by backpressure resumes
            self._call(self.on_commit, sealed)
        self._release_barriers(items)
        return taken

    def _deletes_due_in(self) -> float:
        """Seconds before queued deletions deserve a transaction of their own (0: now)."""
        if self.deletions_waiting >= DELETE_BATCH_ROWS or self._waiting_barriers:
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
            "committed": self.stats.committed,
        }
        try:
            body.update(item.extra())
        except Exception:
            log.exception("health: a contributor failed")
        return Reading("gateway.health", self._gateway_source, body, time.monotonic_ns())

    def _call(self, fn: Callable[[Any], None], arg: object) -> None:
        try:
            fn(arg)
        except Exception:
            # One faulty listener must not stop the writer; it is counted and logged.
            self.stats.callback_errors += 1
            log.exception("commit listener failed")
