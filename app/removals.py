"""What the gateway keeps of an unpaired tag or kiosk, removed once delivered (issue 11).

``provision unpair-tag`` removes the tag's registry entry and its key at once (nothing
still to be delivered needs them). What stays is in the store: the records sealed while
the tag was paired, waiting for the broker, and the ledger entries the gateway keeps of
the tag (its last rolling counter, ``tag:<ref>``; for a kiosk its last device event
``dev:<serial>``, counter and flags). Those go only once every record that may mention
the device has left the store, so nothing undelivered is lost:

1. the unpairing's ``local.action`` record puts a mark in the ledger, in its own
   transaction (``unpaired:tag:<ref>`` = 1; pairing the device again sets it to 0);
2. once the running gateway no longer takes the device's readings, the first poll that
   sees the mark waits until every reading submitted so far is committed (the writer's
   barrier) and takes the last committed seq as the mark's bound: every record about
   the device has a seq at or below it (the mark's own record included). The gateway
   stops taking them at once when the platform's ``unpair-tag`` (``unpair-kiosk``)
   command unpaired it (app/commands.py: its drivers drop the pairing, and the poll
   waits until each has); after ``provision unpair-tag``, at the next start (the daemon
   reads the registries at start: until it restarts it still takes the tag's beacons);
3. once the store holds no record at or below the bound (the broker acknowledged them,
   or a ``gap`` record names those evicted), the ``tag.data_removed`` (or
   ``kiosk.data_removed``) record is sealed and the device's ledger entries and the mark
   are deleted in the same transaction.

A mark set to 0 (paired again before its data went) is deleted alone: the device keeps
its counter, so a beacon replayed from before stays refused. The bound is not kept: a
restart takes a later one, which is only later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from core.devices import device_ledger_key
from core.record import JSON, Reading, SealedRecord, Source
from drivers import kiosk as kiosk_driver
from drivers import tag_receiver

log = logging.getLogger(__name__)

#: The ledger's marks: ``unpaired:<device>:<id>`` = 1 (remove once delivered) or 0 (kept).
PENDING_PREFIX = "unpaired:"
TAG, KIOSK = "tag", "kiosk"
#: Marks looked at per poll, in key order from where the last poll stopped (round robin):
#: bounds the work of a poll, and a mark that must wait never hides the others.
MAX_MARKS_PER_POLL = 256
#: Which local action marks which device, and how (1: unpaired, 0: paired again).
MARKS: Mapping[str, tuple[str, str, int]] = {
    "tag.unpaired": (TAG, "tag", 1), "tag.paired": (TAG, "tag", 0),
    "tag.replaced": (TAG, "tag", 0),
    "kiosk.unpaired": (KIOSK, "serial", 1), "kiosk.paired": (KIOSK, "serial", 0),
    "kiosk.replaced": (KIOSK, "serial", 0),
}


def pending_key(device: str, ident: str) -> str:
    return f"{PENDING_PREFIX}{device}:{ident}"


def mark_of(action: str, details: Mapping[str, object]) -> tuple[str, int] | None:
    """The ledger entry a local action puts on its device (None: it names none)."""
    found = MARKS.get(action)
    if found is None:
        return None
    device, field, value = found
    ident = details.get(field)
    return (pending_key(device, ident), value) if isinstance(ident, str) and ident else None


def device_entries(device: str, ident: str) -> dict[str, str]:
    """The ledger entries the gateway keeps of a device, by what they are."""
    if device == TAG:  # its counter, and its presence interval's fields (one entry each)
        return {"counter": tag_receiver.counter_key(ident)} | {
            f"interval.{name}": tag_receiver.interval_key(ident, name)
            for name in tag_receiver.IVAL_FIELDS}
    return {"event": device_ledger_key(ident), "counter": kiosk_driver.counter_key(ident),
            "flags": kiosk_driver.flags_key(ident)}


#: How long a poll waits for the writer's barrier before a bound is taken, s (else the
#: next poll tries again).
FLUSH_S = 5.0
#: Whether the running gateway still takes a device's readings (*device*, *ident*):
#: None when it cannot tell (its registry was unreadable at the start: nothing removed).
InUse = Callable[[str, str], "bool | None"]


class Writer(Protocol):
    """What this needs of the store writer."""

    def ledger_items(self, prefix: str, limit: int,
                     after: str = "") -> list[tuple[str, int]]: ...
    def ledger_value(self, key: str) -> int | None: ...
    @property
    def last_seq(self) -> int: ...
    def forget(self, keys: tuple[str, ...], reading: Reading | None = None,
               on_committed: Callable[[SealedRecord], None] | None = None) -> None: ...
    def flush(self, timeout: float = 10.0) -> bool: ...


class Queue(Protocol):
    """What this needs of a store reader (its own: it runs on the health thread)."""

    def lowest_seq(self) -> int | None: ...


class Removals:
    """Removes what the gateway keeps of unpaired devices once delivered. :meth:`poll`
    from the health loop; it never raises. *paired* says whether the running gateway
    still takes a device's readings (:data:`InUse`), or holds, per device class (``tag``,
    ``kiosk``), the devices the registries held at this start (None: the registry could
    not be read, so none of that class is removed)."""

    def __init__(self, writer: Writer, queue: Queue,
                 paired: Mapping[str, frozenset[str] | None] | InUse,
                 source: Source, now_ns: Callable[[], int]) -> None:
        self._writer = writer
        self._queue = queue
        self._in_use: InUse = paired if callable(paired) else _at_start(paired)
        self._source = source
        self._now_ns = now_ns
        #: mark -> the last seq that may mention its device; at most one per mark in the
        #: ledger (pruned at each poll)
        self._bounds: dict[str, int] = {}
        self._submitted: set[str] = set()  # marks whose removal is on its way
        self._cursor = ""  # the last mark looked at
        self.removed = 0  # data_removed records submitted
        self.errors = 0
        self.polls = 0

    def poll(self) -> None:
        self.polls += 1
        try:
            self._poll()
        except Exception:  # one failing helper must not end the health thread
            self.errors += 1
            log.exception("removal of unpaired devices' data failed")

    def _poll(self) -> None:
        marks = self._writer.ledger_items(PENDING_PREFIX, MAX_MARKS_PER_POLL, self._cursor)
        self._cursor = marks[-1][0] if len(marks) == MAX_MARKS_PER_POLL else ""
        held = self._writer.ledger_value  # a mark gone from the ledger is done with
        self._bounds = {k: v for k, v in self._bounds.items() if held(k) is not None}
        self._submitted = {k for k in self._submitted if held(k) is not None}
        lowest: int | None = None
        looked = False
        for key, value in marks:
            device, _, ident = key[len(PENDING_PREFIX):].partition(":")
            if key in self._submitted or device not in (TAG, KIOSK) or not ident:
                continue
            if value == 0:  # paired again before its data went: it keeps it
                self._submitted.add(key)
                self._writer.forget((key,))
                continue
            in_use = self._in_use(device, ident)
            if in_use is None or in_use:
                continue  # its readings are still taken (or the registry is unreadable)
            if key not in self._bounds:
                if not self._writer.flush(FLUSH_S):
                    continue  # a reading about it may still wait for its seq: next poll
                self._bounds[key] = self._writer.last_seq
            bound = self._bounds[key]
            if not looked:
                lowest, looked = self._queue.lowest_seq(), True
            if lowest is not None and lowest <= bound:
                continue  # records that may mention it still wait for the broker
            self._remove(key, device, ident, bound)

    def _remove(self, key: str, device: str, ident: str, bound: int) -> None:
        entries = device_entries(device, ident)
        held = sorted({role.split(".")[0] for role, k in entries.items()
                       if self._writer.ledger_value(k) is not None})
        body: dict[str, JSON] = {("tag" if device == TAG else "serial"): ident,
                                 "ledger": held, "delivered_through": bound}
        reading = Reading(f"{device}.data_removed", self._source, body, self._now_ns())
        self._submitted.add(key)
        self._writer.forget((*entries.values(), key), reading)
        self.removed += 1
        log.info("an unpaired %s's data is removed: every record up to seq %d was "
                 "delivered", device, bound)


def _at_start(paired: Mapping[str, frozenset[str] | None]) -> InUse:
    """:data:`InUse` from the registries as the start read them."""
    def in_use(device: str, ident: str) -> bool | None:
        held = paired.get(device)
        return None if held is None else ident in held
    return in_use
