"""The daemon's side of local human actions (issue 9, item 6): nothing changes unseen.

* **The action journal** (:mod:`provisioning.actions`): at start and then at every turn
  of the health loop, each entry not yet recorded becomes a ``local.action`` record
  (alarm class) whose reading carries, in the store's ledger and in the same
  transaction, the entry's number (:data:`RECORDED_KEY`) and the journal's id: across a
  kill -9 an entry is recorded exactly once. Once committed, the journal is compacted.
  A line that cannot be read is recorded too (``journal.unreadable``), never skipped.
* **Whatever route changed the files** (the command line, a text editor, a copied
  file): at each start the configuration file, ``tags.json`` and ``kiosks.json`` are
  hashed as they are on disk; ``config.loaded`` (status) gives the hashes, and when one
  differs from the previous start's (the first 8 bytes of each, kept in the ledger)
  ``config.changed`` (alarm) names it and says whether a recorded action explains it:
  ``explained: false`` is a change no one owned up to.

The pairings are read at start only (``app/assembly.py``), so the start is where a
change takes effect and where it is hashed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.removals import mark_of
from core.record import JSON, Reading, SealedRecord, Source
from provisioning.actions import (
    OWN_KINDS,
    BadLine,
    Entry,
    Journal,
    compact,
    journal_aead,
    journal_path,
    line_digest,
    locked,
    read,
)
from provisioning.identity import Identity
from provisioning.kiosks import KIOSKS_FILE
from provisioning.registry import REGISTRY_FILE

log = logging.getLogger(__name__)

#: Ledger keys (the store's ledger of committed values, ``StoreWriter.ledger_value``).
RECORDED_KEY = "actions:recorded"  # the last journal entry recorded
JOURNAL_KEY = "actions:journal"  # the id of the journal it belongs to
COUNT_KEY = "actions:count"  # local.action records so far (never goes back)
TOUCHED_KEY = "actions:touched:"  # + file role: COUNT_KEY at the last action on that file
HASH_KEY = "config:sha256:"  # + file role: first 8 bytes of its SHA-256 (0: absent)
LOADED_AT_KEY = "config:actions_at_load"  # COUNT_KEY at the last config.loaded
#: The platform's commands (app/commands.py): the last cseq answered, per file role the
#: cseq of the last command that changed the file, and the first at the last config.loaded:
#: a change made by a recorded command is explained too.
COMMAND_LAST_KEY = "cmd:last"
COMMAND_TOUCHED_KEY = "cmd:touched:"
COMMANDS_AT_LOAD_KEY = "config:cmd_at_load"
#: The files whose changes are recorded, by role, and the actions that change each.
TAGS, KIOSKS, CONFIG = "tags", "kiosks", "config"
TOUCHES: Mapping[str, str] = {"tag.paired": TAGS, "tag.unpaired": TAGS, "tag.replaced": TAGS,
                              "kiosk.paired": KIOSKS, "kiosk.unpaired": KIOSKS,
                              "kiosk.replaced": KIOSKS}
#: The action that ends the chain: sealed as :data:`FINAL_KIND`, the last record
#: (``StoreWriter.submit_final``); the entries after it are not recorded.
DECOMMISSION, FINAL_KIND = "decommission", "gateway.decommissioned"
#: Readings handed to the writer per call (each carries its own ledger values).
SUBMIT_CHUNK = 256


class Sink(Protocol):
    """What this needs of the store writer."""

    def submit_all(self, readings: list[Reading],
                   on_committed: Callable[[SealedRecord], None] | None = None) -> None: ...
    def submit_final(self, reading: Reading,
                     on_committed: Callable[[SealedRecord], None] | None = None) -> None: ...
    def ledger_value(self, serial: str) -> int | None: ...


def hash_value(hex_digest: str | None) -> int:
    """A file's hash as a ledger value (a signed 64-bit integer); 0 for no file."""
    if hex_digest is None:
        return 0
    return int.from_bytes(bytes.fromhex(hex_digest)[:8], "big", signed=True) or 1


@dataclass
class ActionStats:
    recorded: int = 0  # local.action records submitted for journal entries
    unreadable: int = 0  # journal lines reported as journal.unreadable
    compacted: int = 0  # lines dropped from the journal once recorded
    busy: int = 0  # polls that found the journal locked by a command
    errors: int = 0  # polls that failed (logged)


class LocalActions:
    """Records the action journal and the configuration's hashes. :meth:`start` once the
    writer runs, then :meth:`poll` from the health loop; neither raises."""

    def __init__(self, sink: Sink, identity: Identity, config_file: Path | None,
                 source: Source, now_ns: Callable[[], int], *,
                 on_final: Callable[[], None] | None = None) -> None:
        self._sink = sink
        #: Called once the final record (a decommission) is submitted.
        self._on_final = on_final
        self.final = False
        self._dir = identity.directory
        self._aead = journal_aead(identity)
        self._source = source
        self._now_ns = now_ns
        self.files: dict[str, Path | None] = {CONFIG: config_file,
                                              TAGS: identity.directory / REGISTRY_FILE,
                                              KIOSKS: identity.directory / KIOSKS_FILE}
        ledger = sink.ledger_value
        self._journal_id = ledger(JOURNAL_KEY) or 0
        self._upto = ledger(RECORDED_KEY) or 0  # the last entry submitted (this journal)
        self._count = ledger(COUNT_KEY) or 0
        self._touched = {role: ledger(TOUCHED_KEY + role) or 0 for role in self.files}
        self._lock = threading.Lock()
        self._reported: set[bytes] = set()  # bad lines submitted (their digests)
        self._reported_committed: set[bytes] = set()  # ... and committed: may be compacted
        self._journal_seen = False
        self._journal_stat: tuple[int, int, int] | None = None  # what journal_changed saw
        self._marked: set[str] = set()  # device marks set in this batch (not committed yet)
        self.stats = ActionStats()

    # -- the two doors -------------------------------------------------------------------
    def start(self) -> None:
        """Record what the journal holds, then ``config.loaded`` (and ``config.changed``)."""
        self.poll()
        if self.final:
            return
        try:
            self._record_config()
        except Exception:
            self.stats.errors += 1
            log.exception("local actions: the configuration's hashes could not be recorded")

    def poll(self) -> None:
        """Record new journal entries and compact what is committed (health thread)."""
        try:
            self._compact()
            if not self.final:  # nothing is sealed after the final record
                self._consume()
        except Exception:
            # one failing helper must not end the health thread: counted and logged
            self.stats.errors += 1
            log.exception("local actions: the action journal could not be read")

    def journal_changed(self) -> bool:
        """Whether the journal file changed since the last call (a stat: cheap enough for
        the health loop to ask twice a second)."""
        try:
            st = journal_path(self._dir).stat()
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        changed, self._journal_stat = seen != self._journal_stat, seen
        return changed

    # -- the journal ---------------------------------------------------------------------
    def _consume(self) -> None:
        with locked(self._dir, wait=False) as held:
            if not held:
                self.stats.busy += 1
                return  # a command is writing: the next poll
            journal = read(self._dir, self._aead)
        if not journal.entries and not journal.bad:
            return
        self._journal_seen = True
        if journal.journal_id != self._journal_id:
            if self._journal_id:
                log.warning("the action journal in %s is not the one recorded so far (id %d, "
                            "was %d): it was deleted or replaced; every entry it holds is "
                            "recorded", self._dir, journal.journal_id, self._journal_id)
            self._journal_id, self._upto = journal.journal_id, 0
        readings: list[Reading] = []
        digests: list[bytes] = []
        self._marked.clear()
        items: list[Entry | BadLine] = [*journal.entries, *journal.bad]
        final: Reading | None = None
        for item in sorted(items, key=_order):
            if isinstance(item, Entry):
                if item.number <= self._upto:
                    continue  # recorded already (committed before a kill, not compacted)
                if item.action == DECOMMISSION:
                    final = self._entry_reading(item, journal)
                    break  # the chain ends with it
                readings.append(self._entry_reading(item, journal))
            else:
                digest = line_digest(item.raw)
                if digest in self._reported or (item.number is not None
                                                and item.number <= self._upto):
                    continue
                self._reported.add(digest)
                digests.append(digest)
                readings.append(self._bad_reading(item, journal))
        for start in range(0, len(readings), SUBMIT_CHUNK):
            chunk = readings[start:start + SUBMIT_CHUNK]
            done = digests if start + SUBMIT_CHUNK >= len(readings) else []
            self._sink.submit_all(chunk, self._on_committed(done))
        if final is not None:
            self.final = True
            log.warning("decommission: the final record is submitted; nothing is recorded "
                        "after it")
            self._sink.submit_final(final)
            if self._on_final is not None:
                self._on_final()

    def _on_committed(self, digests: list[bytes]) -> Callable[[SealedRecord], None]:
        def committed(_record: SealedRecord) -> None:  # the writer's thread
            with self._lock:
                self._reported_committed.update(digests)
        return committed

    def _entry_reading(self, entry: Entry, journal: Journal) -> Reading:
        self._upto = entry.number
        self._count += 1
        self.stats.recorded += 1
        ledger = [(RECORDED_KEY, entry.number), (JOURNAL_KEY, journal.journal_id),
                  (COUNT_KEY, self._count)]
        role = TOUCHES.get(entry.action)
        if role is not None:
            self._touched[role] = self._count
            ledger.append((TOUCHED_KEY + role, self._count))
        mark = mark_of(entry.action, entry.details)  # an unpaired device's data: app/removals
        if mark is not None and (mark[1] or mark[0] in self._marked
                                 or self._sink.ledger_value(mark[0]) is not None):
            ledger.append(mark)  # 0 (paired again) only over a removal still to come
            self._marked.add(mark[0])
        body: dict[str, JSON] = {"action": entry.action, "details": dict(entry.details),
                                 "operator": dict(entry.operator), "entry": entry.number,
                                 "journal": journal.journal_id, "at_ms": entry.at_ms}
        log.warning("local action %s by %s (%s) recorded (journal entry %d)", entry.action,
                    entry.operator.get("role"), entry.operator.get("os_user"), entry.number)
        kind = entry.action if entry.action in OWN_KINDS else "local.action"
        kind = FINAL_KIND if entry.action == DECOMMISSION else kind
        return Reading(kind, self._source, body, self._now_ns(), ledger=tuple(ledger))

    def _bad_reading(self, bad: BadLine, journal: Journal) -> Reading:
        self.stats.unreadable += 1
        self._count += 1
        ledger = [(COUNT_KEY, self._count)]
        if bad.number is not None:  # a numbered line: exactly once, as an entry
            self._upto = max(self._upto, bad.number)
            ledger += [(RECORDED_KEY, self._upto), (JOURNAL_KEY, journal.journal_id)]
        log.error("action journal %s: line %d cannot be read (%s): recorded as "
                  "journal.unreadable (%d so far)", self._dir, bad.index + 1, bad.error,
                  self.stats.unreadable)
        body: dict[str, JSON] = {
            "action": "journal.unreadable", "operator": None, "entry": bad.number,
            "journal": journal.journal_id, "at_ms": None,
            "details": {"line": bad.index + 1, "error": bad.error, "bytes": len(bad.raw),
                        "sha256": hashlib.sha256(bad.raw).hexdigest()}}
        return Reading("local.action", self._source, body, self._now_ns(), ledger=tuple(ledger))

    def _compact(self) -> None:
        """Drop from the journal what the store has committed."""
        if not self._journal_seen:
            return
        ledger = self._sink.ledger_value
        recorded = ledger(RECORDED_KEY) or 0
        if (ledger(JOURNAL_KEY) or 0) != self._journal_id:
            recorded = 0  # nothing of this journal committed yet
        with self._lock:
            reported = frozenset(self._reported_committed)
        with locked(self._dir, wait=False) as held:
            if not held:
                self.stats.busy += 1
                return
            dropped = compact(self._dir, recorded, self._journal_id, reported)
        if dropped:
            self.stats.compacted += dropped
            with self._lock:
                self._reported_committed -= reported
            self._reported -= reported
        self._journal_seen = recorded < self._upto or bool(self._reported)

    # -- the configuration ---------------------------------------------------------------
    def _record_config(self) -> None:
        ledger = self._sink.ledger_value
        loaded_at = ledger(LOADED_AT_KEY) or 0
        commands_at = ledger(COMMANDS_AT_LOAD_KEY) or 0
        files: dict[str, JSON] = {}
        changed: dict[str, JSON] = {}
        values: list[tuple[str, int]] = []
        for role, path in self.files.items():
            digest = _sha256(path)
            value = hash_value(digest)
            files[role] = {"path": None if path is None else str(path), "sha256": digest}
            values.append((HASH_KEY + role, value))
            before = ledger(HASH_KEY + role)
            if before is not None and before != value:
                changed[role] = {"path": None if path is None else str(path),
                                 "sha256": digest, "before_prefix": _prefix(before),
                                 "explained": self._touched[role] > loaded_at
                                 or (ledger(COMMAND_TOUCHED_KEY + role) or 0) > commands_at}
        readings: list[Reading] = []
        if changed:
            explained = all(isinstance(c, dict) and c["explained"] for c in changed.values())
            log.warning("configuration changed since the last start: %s (%s)",
                        ", ".join(changed), "explained by recorded actions" if explained
                        else "NOT explained by any recorded action")
            readings.append(Reading("config.changed", self._source, {
                "changed": sorted(changed), "files": changed, "explained": explained,
            }, self._now_ns()))
        readings.append(Reading("config.loaded", self._source, {"files": files},
                                self._now_ns(),
                                ledger=(*values, (LOADED_AT_KEY, self._count),
                                        (COMMANDS_AT_LOAD_KEY,
                                         ledger(COMMAND_LAST_KEY) or 0))))
        self._sink.submit_all(readings)


def _order(item: Entry | BadLine) -> tuple[int, int]:
    """Entries by number; a bad line without one where it stood (after what precedes it)."""
    if isinstance(item, Entry):
        return (item.number, 0)
    return (item.number if item.number is not None else 0, 1 + item.index)


def _sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _prefix(value: int) -> str | None:
    """The first 8 bytes of a hash in hex, from its ledger value (None: no file)."""
    return None if value == 0 else value.to_bytes(8, "big", signed=True).hex()
